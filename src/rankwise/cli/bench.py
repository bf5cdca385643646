"""``rankwise bench``: how much a training step costs with each method, on your model, side by side.

Every method (default: all of ``rankwise.methods()``, each at its registry defaults unless
``--set METHOD.KEY=VALUE``) is put on its own copy of one base model and timed with the frozen
floor (the base model's forward + backward to its input embeddings, no trainable weight) in one
process, interleaved round by round after warm-up, medians (:mod:`rankwise.experiment.timing`).
Printed per method: trainable parameters, the median step (forward, loss, backward, AdamW), the
step as a multiple of the floor, and merged inference as a multiple of the plain model's.
A method that does not fit the model is an error row; one that trains but cannot merge (a bias update
on a bias-less layer) keeps its step time and says why in the merged-inference column. For rankwise
against HF PEFT on the same configs, and peak memory, use the repository's ``benchmarks/step.py``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ..experiment.bench import BenchConfig, bench, method_configs
from ..experiment.pipeline import SHIPPED_MODEL, parse_targets
from ..experiment.report import markdown_table
from .options import per_method_options, selected_methods


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


def run(args: argparse.Namespace) -> int:
    """Build every method's config, time them against the floor, print the table; 1 if any method failed."""
    config = BenchConfig(configs={}, model=args.model, batch=args.batch, seq=args.seq, rounds=args.rounds,
                         warmup=args.warmup, threads=args.threads)  # the numbers are checked before the methods
    names = selected_methods(args.methods)
    configs = method_configs(per_method_options(args.overrides, names), parse_targets(args.targets))
    rows, _ = bench(dataclasses.replace(config, configs=configs))
    print(f"Training step, {args.model}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up, medians:\n")
    print(markdown_table(["method", "trainable", "step ms", "x floor", "merged inference x base"], rows))
    return 1 if any(row[1].startswith("error") for row in rows) else 0
