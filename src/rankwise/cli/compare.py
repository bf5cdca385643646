"""``rankwise compare``: fine-tune several methods on one task under one budget and tabulate them.

Every method gets the same split, examples, seed, classifier-head initialisation, epochs or steps,
batch size, learning-rate schedule and target layers (``--targets``, default ``all-linear``: the
default of every method's own config, so no method is judged on layers it was not designed for);
its hyper-parameters are its registry defaults (with the method's ``comparison_defaults``, e.g. SURM's
``rectangular="native"``, so that it runs on rectangular layers) unless ``--set METHOD.KEY=VALUE`` changes them
(``--set METHOD.lr=...`` gives one method its own peak learning rate). The
table gives each method's key hyper-parameters, trainable parameters (adapter + head), test accuracy,
macro-F1, the training loss over the last tenth of the steps, the wall time of its training loop and
its median step time, beside the majority-class and linear-probe baselines. A method that allocates
rank (AdaLoRA) runs like the others (its schedule fitted to the run's length) and its row in
``comparison.json`` also holds its final per-layer ``ranks``.
A method that fails (say a config that does not fit the model) becomes an error row; the others still
run, and the exit status is 1. ``comparison.json`` and ``comparison.md`` go to ``--output-dir``.

Matched budgets and seeds (``--budget N`` or ``--budget-like lora:r=8``, ``--seeds K``, ``--workers N``): every
method's size hyper-parameter is chosen so that its trainable adapter parameters on ``--targets`` land closest to
the budget; the table prints the achieved count's ratio to the budget, and a method more than 10 % off or
without a size knob is marked † with its reason. Each method x seed (seeds --seed, --seed+1, ...; a seed draws
the split, head initialisation and example order, so runs are paired by seed) is one run of a resumable sweep
(OUTPUT/sweep.json, one result file per finished run in OUTPUT/results/; rerunning the same command skips the
finished runs; ``python -m rankwise.experiment.sweep OUTPUT/sweep.json INDEX`` runs one of them, e.g. per SLURM
array task). Rows: mean ± standard deviation of test accuracy and macro-F1; the best method in bold and every
method within two standard errors of the paired per-seed differences marked (tie); the majority-class and
linear-probe baselines in the same table. ``--lrs`` is tuned ONCE per method on seed 0's validation macro-F1
(not per seed: that would multiply the cost by the seeds, and seeds should differ only in their randomness).
Outputs: comparison.json, comparison.csv, report.md and PNG plots in OUTPUT. Without --budget, --budget-like,
--seeds and --workers the command runs the single-seed comparison below (comparison.json, comparison.md).

One learning rate for all is a same-budget comparison, not a tuned one: a method whose best rate
differs from ``--lr`` is shown at a disadvantage. Times come from whatever else runs on the machine.
"""

from __future__ import annotations

import argparse

from ..experiment.comparison import JSON_FILE, MARKDOWN_FILE, CompareConfig, compare, markdown_report
from ..experiment.matched import compare_matched
from ..experiment.pipeline import is_main_process, parse_targets
from . import launch
from .options import (
    add_data_options,
    add_targets_option,
    add_training_options,
    data_config,
    per_method_options,
    selected_methods,
    threads,
    train_settings,
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "compare",
        help="fine-tune several methods on one task under one budget, side by side",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    add_data_options(parser)
    method = parser.add_argument_group("methods")
    method.add_argument("--methods", help="comma list of registered methods; default: all of rankwise.methods()")
    add_targets_option(method, default="all-linear")
    method.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="change one method's config field or its peak lr (repeatable), "
                             "e.g. --set lora.r=16 --set miss.lr=3e-3")
    method.add_argument("--lrs", type=learning_rates, default=None, metavar="LR,LR,...",
                        help="tune each method's peak lr: train at each, keep the best validation macro-F1, report "
                             "its test scores (methods given --set METHOD.lr keep theirs)")
    method.add_argument("--budget", type=positive_int, default=None, metavar="N",
                        help="match every method's size to N trainable adapter parameters on --targets")
    method.add_argument("--budget-like", default=None, metavar="METHOD:KEY=VALUE,...",
                        help="match every method's size to the count of this configuration, e.g. lora:r=8")
    method.add_argument("--seeds", type=positive_int, default=None, metavar="K",
                        help="paired seeds per method (sweep mode; 3 when --budget/--budget-like/--workers is given)")
    method.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="run the sweep's runs in N processes (each with --threads threads)")
    method.add_argument("--save-adapters", action="store_true", help="also save each trained adapter to OUTPUT/<method>")
    add_training_options(parser, output_help="where comparison.json and comparison.md go; unset: runs/compare-<task>")
    parser.set_defaults(func=run)
    return parser


def learning_rates(text: str) -> list[float]:
    """``--lrs 1e-3,3e-3``: distinct positive numbers."""
    try:
        rates = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not rates or any(not rate > 0 for rate in rates) or len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"expected distinct positive learning rates, got {text!r}")
    return rates


def positive_int(text: str) -> int:
    """A positive integer option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def sweep_mode(args: argparse.Namespace) -> bool:
    """Whether the options ask for the matched-budget, multi-seed sweep."""
    return any(getattr(args, name) is not None for name in ("budget", "budget_like", "seeds", "workers"))


def compare_config(args: argparse.Namespace) -> CompareConfig:
    """The parsed options as the pipeline's :class:`CompareConfig` (every value checked, nothing loaded)."""
    names = selected_methods(args.methods)
    if args.budget is not None and args.budget_like is not None:
        raise ValueError("compare: give --budget N or --budget-like METHOD:KEY=VALUE, not both")
    return CompareConfig(methods=names, options=per_method_options(args.overrides, names, training_keys=("lr",)),
                         targets=parse_targets(args.targets), data=data_config(args), model=args.model,
                         settings=train_settings(args), lrs=args.lrs, probe=not args.no_probe, probe_lr=args.probe_lr,
                         threads=threads(args), output_dir=args.output_dir, save_adapters=args.save_adapters,
                         budget=args.budget, budget_like=args.budget_like,
                         seeds=args.seeds or (3 if sweep_mode(args) else 1), workers=args.workers or 1)


def run(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand: exit status 1 when a method failed."""
    config = compare_config(args)
    if sweep_mode(args):
        result = compare_matched(config)
        print(result["table"])
        for method, match in result["matches"].items():
            count = "—" if match["count"] is None else f"{match['count']:,}"
            ratio = "" if match["ratio"] is None else f" ({match['ratio']:.3f} × budget)"
            print(f"- {method}: {count} adapter parameters{ratio}" + (f" † {match['reason']}" if match["reason"] else ""))
        failed = [row["method"] for row in result["rows"] if row["error"]]
        print(f"wrote {', '.join(sorted(result['paths']))} to {result['output_dir']}")
        return 1 if failed else 0
    if (status := launch.launch_workers(args, config.threads)) is not None:
        return status
    main = is_main_process()
    payload = compare(config, log=launch.rank_zero_print)
    failed = [row["name"] for row in payload["rows"] if row["error"]]
    if main:
        print(markdown_report(payload))
        output = payload["output_dir"]
        print(f"wrote {output}/{JSON_FILE} and {output}/{MARKDOWN_FILE} in {payload['wall_seconds']:.0f} s"
              + (f"; {len(failed)} of {len(config.methods)} methods failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
