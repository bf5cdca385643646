"""Precision and speed modes of one training step, side by side: bf16 autocast, torch.compile, gradient
checkpointing and gradient accumulation against the float32 eager step, for LoRA r8 and DoRA r8 on all-linear.

Usage::

    python benchmarks/precision.py                       # MiniLM, writes results/precision.md (~5 min on a quiet box)
    python benchmarks/precision.py --compile-backend aot_eager --rounds 3
    python benchmarks/precision.py --quick --batch 4 --modes eager,bf16 --no-memory --out ''   # smoke run

Every mode trains on the same global batch (32 × 64 tokens of the shipped all-MiniLM-L6-v2, 2 threads):

* ``eager``: float32, the reference step (forward, scalar loss, backward, AdamW, zero_grad).
* ``bf16``: the forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``; the backward follows
  autocast's dtypes; adapter parameters and AdamW stay float32.
* ``compile``: the model under ``torch.compile`` (``--compile-backend``, inductor by default); compiled before
  the timing starts (the compile time is reported on its own; the memory subprocess compiles a throwaway copy
  first, so that the measured steps, like every other mode's, start with a fresh optimizer).
* ``checkpointing``: transformers' ``gradient_checkpointing_enable(use_reentrant=False)``: every encoder
  layer's activations are recomputed in the backward.
* ``accum``: ``--accum`` micro-batches of batch/accum examples, each loss divided by accum, one optimizer
  step: the same update as the eager step, with a smaller activation peak.

Times are interleaved round by round after warm-up (medians, ratios to the eager step of the same method).
A disturbed run (some candidate's slowest round over 1.5× its median: another process took the cores) is
re-timed once with as many rounds again, and the medians are taken over all rounds; the report says so and
gives the load average before and after. Memory is the peak RSS growth over 3 steps in a fresh subprocess
per candidate (``common.peak_rss_growth_mib``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

import rankwise

METHODS = {"LoRA r8": ("lora", {"r": 8, "alpha": 8}), "DoRA r8": ("dora", {"r": 8, "alpha": 8})}
MODES = ("eager", "bf16", "compile", "checkpointing", "accum")
DISTURBED = 1.5  # slowest round / median above which a run is re-timed


def micro_batches(batch: common.Batch, count: int) -> list[common.Batch]:
    """``batch`` cut into ``count`` equal micro-batches along the examples (``count`` divides the batch size)."""
    return [{key: value[i::count] for key, value in batch.items()} for i in range(count)]


def accumulating_step(model: nn.Module, batch: common.Batch, accum: int = 1,
                      autocast: bool = False, lr: float = 1e-4) -> common.Step:
    """One AdamW step over ``batch`` in ``accum`` micro-batches (each loss / accum), the forward and loss
    under bfloat16 autocast when ``autocast``; ``accum=1`` without autocast is ``common.training_step``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    parts = micro_batches(batch, accum)

    def step() -> None:
        for part in parts:
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with context:
                loss = common.scalar_loss(model(**part).last_hidden_state) / accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(key: str, base: nn.Module, batch: common.Batch, args: argparse.Namespace) -> common.Step:
    """Candidate ``"<method label>|<mode>"``: its training step on a private adapted copy of ``base`` (the
    compile mode compiles at its first call)."""
    label, mode = key.split("|")
    method, kwargs = METHODS[label]
    model = rankwise.adapt(copy.deepcopy(base), rankwise.config(method, targets=common.ALL_LINEAR, **kwargs))
    if mode == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "compile":
        model = torch.compile(model, backend=args.compile_backend)
    return accumulating_step(model, batch, accum=args.accum if mode == "accum" else 1, autocast=mode == "bf16")


def candidate_keys(args: argparse.Namespace) -> list[str]:
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or "eager" not in modes:
        raise ValueError(f"--modes: unknown {unknown} (choose from {', '.join(MODES)}; eager is the reference)")
    return [f"{label}|{mode}" for label in METHODS for mode in modes]


def measure_memory(key: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one candidate, in this process (the subprocess side of ``common.memory_in_subprocess``)."""
    common.setup_torch(args.threads)
    base = common.load_model(args.quick)
    batch = common.random_batch(base, args.batch, args.seq)
    if key.endswith("|compile"):
        build(key, base, batch, args)()  # compile on a throwaway copy: the measured one reuses the compiled code
        gc.collect()
    step = build(key, base, batch, args)
    del base
    return common.peak_rss_growth_mib(step)


def timed(steps: dict[str, common.Step], args: argparse.Namespace) -> tuple[dict[str, list[float]], bool]:
    """Interleaved samples of every step; re-timed once (samples pooled) if the run was disturbed."""
    samples = common.interleaved_times(steps, args.rounds, args.warmup)
    disturbed = any(max(s) > DISTURBED * common.medians({k: s})[k] for k, s in samples.items())
    if disturbed:
        print("a round ran over 1.5x its median: re-timing", file=sys.stderr)
        again = common.interleaved_times(steps, args.rounds, 0)
        samples = {key: samples[key] + again[key] for key in samples}
    return samples, disturbed


def run(args: argparse.Namespace) -> str:
    """Build, compile, time and measure every candidate; return the markdown report."""
    common.setup_torch(args.threads)
    base = common.load_model(args.quick)
    batch = common.random_batch(base, args.batch, args.seq)
    load_before = os.getloadavg()
    steps, compile_s = {}, {}
    for key in candidate_keys(args):
        steps[key] = build(key, base, batch, args)
        if key.endswith("|compile"):
            start = time.perf_counter()
            steps[key]()  # compiles the forward and the backward
            compile_s[key] = time.perf_counter() - start
    print(f"timing {len(steps)} candidates, {args.rounds} rounds after {args.warmup} warm-up", file=sys.stderr)
    samples, disturbed = timed(steps, args)
    options = ["--accum", str(args.accum), "--compile-backend", args.compile_backend]
    memory = {key: common.memory_in_subprocess(__file__, args, key, options) for key in steps} if args.memory else {}
    return report(args, samples, compile_s, memory, disturbed, load_before, os.getloadavg())


def report(args: argparse.Namespace, samples: dict[str, list[float]], compile_s: dict[str, float],
           memory: dict[str, float | None], disturbed: bool, load_before: tuple[float, ...],
           load_after: tuple[float, ...]) -> str:
    step_s = common.medians(samples)
    rows = []
    for key, seconds in step_s.items():
        label, mode = key.split("|")
        reference = f"{label}|eager"
        name = f"{mode} ({args.compile_backend}, compiled in {compile_s[key]:.0f} s)" if mode == "compile" else (
            f"accum ({args.accum} × {args.batch // args.accum})" if mode == "accum" else mode)
        rows.append([
            label, name, f"{seconds:.3f}", f"**{common.ratio(seconds, step_s[reference])}**",
            f"{min(samples[key]):.3f}–{max(samples[key]):.3f}",
            "—" if memory.get(key) is None else f"{memory[key]:.0f}",
            f"**{common.ratio(memory.get(key), memory.get(reference))}**",
        ])
    setup = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    rounds = f"{len(next(iter(samples.values())))} interleaved rounds after {args.warmup} warm-up"
    retimed = " (re-timed: the first run was disturbed, samples pooled)" if disturbed else ""
    load = [", ".join(f"{value:.1f}" for value in loads) for loads in (load_before, load_after)]
    return "\n".join([
        f"# Precision and speed modes ({setup}, batch {args.batch}, seq {args.seq}, all-linear, train mode)",
        "",
        f"{common.environment_line(args.threads)}; {rounds}{retimed}, medians.",
        f"Load average (1, 5, 15 min) {load[0]} before timing, {load[1]} after.",
        ("Memory: peak RSS growth (VmHWM after reset) over 3 steps, one fresh subprocess per candidate. "
         "Each ratio is to the float32 eager step of the same method."),
        "",
        common.markdown_table(
            ["config", "mode", "step s (median)", "× eager", "step s min–max", "RSS MiB", "RSS × eager"], rows),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.step_parser(__doc__, rounds=5, out="precision.md")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches of the accum mode")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile mode")
    args = common.parse_step_args(parser, argv)
    candidate_keys(args)  # a bad --modes fails before anything is built
    if args.accum < 1 or args.batch % args.accum:
        parser.error(f"--accum {args.accum} must divide the batch size {args.batch}")
    return args


def main(argv: list[str] | None = None) -> None:
    common.step_main(parse_args(argv), measure_memory, run)


if __name__ == "__main__":
    main()
