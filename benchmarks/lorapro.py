"""LoRA-Pro benchmark: a LoRA-Pro training step against the same adapter's AdamW step, side by side.

Usage::

    python benchmarks/lorapro.py                      # shipped MiniLM, LoRA r8 all-linear; writes results/lorapro.md
    python benchmarks/lorapro.py --rounds 3
    python benchmarks/lorapro.py --quick              # tiny random BERT, seconds (the smoke test's mode)

Candidates, each on its own copy of one adapted model (same init), timed in one process, interleaved
round by round after warm-up (medians; see benchmarks/README.md): the frozen floor, LoRA with
``torch.optim.AdamW`` (the baseline), ``rankwise.LoRAPro`` in its default ``"efficient"`` mode, and
in ``"full"`` mode (m×n Adam moments per layer). One step = forward, scalar loss, backward,
optimizer step, ``zero_grad``. A second table times ``optimizer.step()`` alone (the gradients of one
backward kept in place), which isolates the optimizer's own cost from the noise of the whole step.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

import rankwise

LR = 1e-4
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AdamW": lambda model: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR),
    "LoRA-Pro efficient": lambda model: rankwise.LoRAPro(model, lr=LR),
    "LoRA-Pro full": lambda model: rankwise.LoRAPro(model, lr=LR, mode="full"),
}


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: common.Batch) -> common.Step:
    """``optimizer.step()`` alone, on the gradients of one backward pass left in place."""
    common.scalar_loss(model(**batch).last_hidden_state).backward()
    return optimizer.step


def run(args: argparse.Namespace) -> str:
    """Time the floor and every optimizer (whole step, then step alone) and return the markdown report."""
    common.setup_torch(args.threads)
    base = common.load_model(args.quick)
    batch = common.random_batch(base, args.batch, args.seq)
    adapted = rankwise.adapt(copy.deepcopy(base), rankwise.config("lora", r=8, alpha=8, targets=common.ALL_LINEAR))
    steps = {"frozen floor": common.floor_step(copy.deepcopy(base), batch)}
    alone = {}
    for name, build in OPTIMIZERS.items():
        model = copy.deepcopy(adapted)
        steps[name] = common.training_step(model, batch, optimizer=build(model))
        other = copy.deepcopy(adapted)
        alone[name] = optimizer_step(other, build(other), batch)
    print(f"timing {len(steps)} whole steps and {len(alone)} optimizer steps, {args.rounds} rounds after "
          f"{args.warmup} warm-up", file=sys.stderr)
    step_s = common.medians(common.interleaved_times(steps, args.rounds, args.warmup))
    alone_s = common.medians(common.interleaved_times(alone, args.rounds, args.warmup))
    return report(args, rankwise.trainable_parameters(adapted), step_s, alone_s)


def report(args: argparse.Namespace, trainable: int, step_s: dict[str, float], alone_s: dict[str, float]) -> str:
    floor, adamw = step_s["frozen floor"], step_s["AdamW"]
    step_rows = [[name, f"{seconds:.3f}", common.ratio(seconds, floor),
                  "—" if name == "frozen floor" else f"**{common.ratio(seconds, adamw)}**"]
                 for name, seconds in step_s.items()]
    alone_rows = [[name, f"{1000 * seconds:.2f}", common.ratio(seconds, alone_s["AdamW"])]
                  for name, seconds in alone_s.items()]
    setup = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    return "\n".join([
        f"# LoRA-Pro vs AdamW ({setup}, LoRA r8 α8 all-linear, batch {args.batch}, seq {args.seq}, float32, train mode)",
        "",
        f"{common.environment_line(args.threads)}; {args.rounds} interleaved rounds after {args.warmup} warm-up, medians.",
        *([f"**{args.note}**"] if args.note else []),
        (f"all-linear = {', '.join(common.ALL_LINEAR)}; {trainable:,} trainable parameters; lr {LR}. Goal: LoRA-Pro "
         "(efficient, the default) ≤ 1.10× AdamW; the published overhead is 1.66× (60.2 % throughput)."),
        "",
        "## Whole training step (forward, loss, backward, optimizer step, zero_grad)",
        "",
        common.markdown_table(["optimizer", "step s (median)", "× floor", "× AdamW"], step_rows),
        "",
        "## optimizer.step() alone",
        "",
        common.markdown_table(["optimizer", "ms (median)", "× AdamW"], alone_rows),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (32; 2 with --quick)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (64; 8 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="a line printed in bold under the set-up (e.g. a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, for smoke tests")
    parser.add_argument("--out", default="lorapro.md", help="file name under benchmarks/results/ ('' to not write)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 32)
    args.seq = args.seq or (8 if args.quick else 64)
    return args


def main(argv: list[str] | None = None) -> None:
    common.publish(run(args := parse_args(argv)), args.out)


if __name__ == "__main__":
    main()
