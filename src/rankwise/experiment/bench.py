"""``rankwise bench``: how much a training step costs with each method, on your model, side by side.

Every method (default: all of ``rankwise.methods()``, each at its registry defaults unless
``--set METHOD.KEY=VALUE``) is put on its own copy of one base model and timed with the frozen
floor (the base model's forward + backward to its input embeddings, no trainable weight) in one
process, interleaved round by round after warm-up, medians (:mod:`rankwise.experiment.timing`).
Printed per method: trainable parameters, the median step (forward, loss, backward, AdamW), the
step as a multiple of the floor, and merged inference as a multiple of the plain model's.
A method that does not fit the model is an error row. For rankwise against HF PEFT on the same
configs, and peak memory, use the repository's ``benchmarks/step.py``.
"""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Any

import torch
from torch import nn

from ..core.inject import adapt, merge, trainable_parameters
from ..core.registry import config as make_config
from .compare import per_method_options, selected_methods
from .finetune import LONG_RUN, SHIPPED_MODEL, model_path, parse_targets, with_run_length
from .report import markdown_table
from .timing import floor_step, inference_step, interleaved_times, medians, random_batch, training_step

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers."""
    parser = subparsers.add_parser("bench", help="time a training step of every method against the frozen floor",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma list of registered methods; default: all of rankwise.methods()")
    parser.add_argument("--targets", default="all-linear", help="layers to adapt: suffixes, a regex, or all-linear")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="change one method's config field (repeatable), e.g. --set lora.r=16")
    parser.add_argument("--model", default=SHIPPED_MODEL, help="model id or local path (an encoder or decoder)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.set_defaults(func=run)
    return parser


def load_base(model: str) -> nn.Module:
    """The model's backbone (``AutoModel``) in float32 and train mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path(model), dtype=torch.float32).train()


def benchmark(base: nn.Module, configs: dict[str, Any], batch: int, seq: int, rounds: int,
              warmup: int) -> tuple[list[list[str]], float]:
    """Table rows (method, trainable, step ms, × floor, merged inference × base) and the floor in ms."""
    inputs = random_batch(base, batch, seq)
    steps = {"floor": floor_step(copy.deepcopy(base), inputs)}
    inference = {"plain": inference_step(copy.deepcopy(base), inputs)}
    trainable: dict[str, int] = {}
    errors: dict[str, str] = {}
    for name, config in configs.items():
        try:
            model = adapt(copy.deepcopy(base), config)
        except ValueError as error:
            errors[name] = str(error)
            continue
        trainable[name] = trainable_parameters(model)
        steps[name] = training_step(model, inputs)
        inference[name] = inference_step(merge(copy.deepcopy(model)), inputs)
    logger.info("timing %d training steps and %d inference steps", len(steps), len(inference))
    step_s = medians(interleaved_times(steps, rounds, warmup))
    inference_s = medians(interleaved_times(inference, rounds, warmup))
    floor = step_s["floor"]
    rows = [["frozen floor", "0", f"{floor * 1e3:.1f}", "1.00", "—"]]
    for name in configs:
        if name in errors:
            rows.append([name, f"error: {errors[name]}", "—", "—", "—"])
        else:
            rows.append([name, f"{trainable[name]:,}", f"{step_s[name] * 1e3:.1f}", f"{step_s[name] / floor:.2f}",
                         f"{inference_s[name] / inference_s['plain']:.2f}"])
    return rows, floor * 1e3


def run(args: argparse.Namespace) -> int:
    """Build every method's config, time them against the floor, print the table; 1 if any method failed."""
    for option in ("batch", "seq", "rounds", "threads"):
        if getattr(args, option) <= 0:
            raise ValueError(f"--{option} must be a positive integer, got {getattr(args, option)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    names = selected_methods(args.methods)
    options = per_method_options(args.overrides, names)
    targets = parse_targets(args.targets)
    # A schedule that needs the run length (AdaLoRA, ElaLoRA) gets a long one: timing never steps the allocator.
    configs = {name: make_config(name, **{"targets": targets, **with_run_length(name, options[name], LONG_RUN)})
               for name in names}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, _ = benchmark(load_base(args.model), configs, args.batch, args.seq, args.rounds, args.warmup)
    print(f"Training step, {args.model}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up, medians:\n")
    print(markdown_table(["method", "trainable", "step ms", "x floor", "merged inference x base"], rows))
    return 1 if any(row[1].startswith("error") for row in rows) else 0
