"""``rankwise finetune``: fine-tune a sequence classifier with any registered method.

It trains the adapter on a fixed split, then prints its test accuracy and macro-F1 beside two baselines:
the majority class and a frozen-encoder linear probe (only the classification head trained, on the same
examples, steps and batch size). The adapter, ``metrics.json`` and a training-curve PNG go to
``--output-dir``; metrics.json's ``label_names`` is the label of each output of the classification head,
in index order (sorted as strings: with labels 1..10, output 1 is "10"); for a method that allocates
rank (AdaLoRA), metrics.json also holds the final rank of every layer (``ranks``), drawn as a heat map
of rank per layer index and module type (``rank_heatmap.png``). Training runs on transformers.Trainer:
``--nproc`` processes, ``--save-every`` checkpoints and ``--resume``, ``--precision bf16``,
``--report-to``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..core.registry import registered
from ..experiment import report
from ..experiment.pipeline import COMMON_FIELDS, RunConfig, check_options, finetune, is_main_process, parse_targets
from . import launch
from .options import (
    add_data_options,
    add_targets_option,
    add_training_options,
    data_config,
    parse_assignment,
    parse_value,
    threads,
    train_settings,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``finetune`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a classifier with an adapter and compare it with two baselines",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_options(parser)
    method = parser.add_argument_group("method")
    method.add_argument("--method", default="lora", help="registered method (rankwise.methods())")
    add_targets_option(method, default="query,value")
    method.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field of the method (repeatable), e.g. --set use_rslora=true")
    _add_method_options(parser)
    add_training_options(parser, output_help="where the adapter and reports go; unset: runs/finetune-<task>-<method>")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue from a checkpoint: a checkpoint-N folder, or a run's --output-dir (its newest); "
                             "the options that shape the run (method options, --targets, --lr, schedule, batch size, "
                             "seed, steps, ...) must be the checkpoint's run's, or the resume is refused")
    parser.set_defaults(func=run)
    return parser


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per hyper-parameter of any registered method, named after its config field."""
    group = parser.add_argument_group("method hyper-parameters (default: the method's own)")
    taken = set(parser._option_string_actions)
    owners: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for method in registered():
        for f in dataclasses.fields(method.config_cls):
            if f.name not in COMMON_FIELDS:
                owners.setdefault(f.name, []).append(method.name)
                helps.setdefault(f.name, f.metadata.get("help", ""))
    for name, methods in owners.items():
        flag = "--" + name.replace("_", "-")
        if flag not in taken:
            group.add_argument(flag, dest=f"hp_{name}", type=parse_value, default=argparse.SUPPRESS, metavar="V",
                               help=f"{helps[name]} [{', '.join(methods)}]".replace("%", "%%"))


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameters given for --method by its options and --set, checked against its config."""
    values = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
    values.update(parse_assignment(item) for item in args.overrides)
    check_options(args.method, values)
    return values


def run_config(args: argparse.Namespace) -> RunConfig:
    """The parsed options as the pipeline's :class:`RunConfig` (every value checked, nothing loaded)."""
    return RunConfig(method=args.method, options=method_options(args), targets=parse_targets(args.targets),
                     data=data_config(args), model=args.model, settings=train_settings(args), probe=not args.no_probe,
                     probe_lr=args.probe_lr, threads=threads(args), output_dir=args.output_dir, resume=args.resume)


def run(args: argparse.Namespace) -> int:
    """The ``finetune`` subcommand."""
    config = run_config(args)
    if (status := launch.launch_workers(args, config.threads)) is not None:
        return status
    main = is_main_process()
    result = finetune(config, log=launch.rank_zero_print)
    if not main:
        return 0
    print(report.results_table(result.rows))
    ranks = result.metrics.get("ranks")
    if ranks is not None:
        print(f"final ranks: {sum(ranks.values())} components over {len(ranks)} layers, "
              f"{min(ranks.values())} to {max(ranks.values())} per layer")
    test = result.adapted.test
    names = ", ".join(path.name for path in result.files)
    print(f"test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}; "
          f"wrote {result.output_dir} ({names}, adapter) in {result.metrics['wall_seconds']:.0f} s"
          + (f" on {result.adapted.world_size} processes" if result.adapted.world_size > 1 else ""))
    return 0
