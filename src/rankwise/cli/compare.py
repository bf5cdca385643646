"""``rankwise compare``: which low-rank method for my model and budget? Every method fine-tuned on one task at a
matched budget over paired seeds, with baselines, ties, plots and a resumable sweep.

Every entry (default: every registered method and ``lorapro``, LoRA trained with the LoRA-Pro optimizer) gets the
same split, examples, schedule, batch size and target layers (``--targets``, default ``all-linear``); its
hyper-parameters are its registry defaults (with the method's ``comparison_defaults``, e.g. SURM's
``rectangular="native"``) unless ``--set METHOD.KEY=VALUE`` changes them (``--set METHOD.lr=...`` gives one its own
peak learning rate).

Budget: ``--budget-like lora:r=8`` (the default) or ``--budget N``: every entry's size hyper-parameter (rank,
block size, MiSS's r, GraLoRA's r and k, SURM's block, ...) is chosen so that its trainable adapter parameters on
``--targets`` land closest to the budget; the table prints the achieved count's ratio to the budget, and an entry
more than 10 % off or without a size knob is marked † with its reason. ``--budget-like none``: every entry at its
own size.

Seeds: ``--seeds 3`` (seeds --seed, --seed+1, ...; a seed draws the split, head initialisation and example order, so
runs are paired by seed). Rows: mean ± standard deviation of test accuracy and macro-F1; the best method in bold and
every method within two standard errors of the paired per-seed differences marked (tie); the majority-class,
linear-probe and full fine-tuning (every weight trained, the upper reference; ``--full-lrs``) baselines in the same
table. ``--lrs`` is tuned ONCE per method on the first seed's validation macro-F1 (not per seed: that would multiply
the cost by the seeds, and seeds should differ only in their randomness); the table prints each chosen lr.

Defaults that finish: with no options (movie-reviews, every entry, 3 seeds) the run is sized to finish in under
30 minutes on 2 CPU cores (the default scale: ``--max-examples``, ``--epochs``,
``--batch-size``, ``--max-length``; ``--workers`` defaults to one run per core, up to 4, on a machine without
a GPU); ``--full`` trains on the whole training split (and tests on the whole test split).

Resumable: each entry x seed is one run of a sweep (OUTPUT/sweep.json, one result file per finished run in
OUTPUT/results/); the same command after a crash or kill skips the finished runs. ``--workers N`` runs N at a time;
``python -m rankwise.experiment.sweep OUTPUT/sweep.json [INDEX]`` runs one of them, e.g. per SLURM array task or
torchrun rank on other machines sharing the folder. Outputs in --output-dir: comparison.json, comparison.csv,
report.md, claims.md (each paper's headline claim over LoRA: holds / tie / does not hold) and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..experiment.comparison import SKIPPED, CompareConfig, compare, entries, entry_method
from ..experiment.pipeline import parse_targets
from ..experiment.threads import available_cores
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

#: The scale of a default run: every entry x 3 seeds and the baselines on 2 CPU cores in under 30 minutes
#: (benchmarks/results/compare_default.md measures it).
DEFAULT_SCALE = {"max_examples": 720, "epochs": 2.0, "batch_size": 16, "max_length": 48}
DEFAULT_BUDGET_LIKE = "lora:r=8"
#: The most runs at a time without ``--workers`` (each holds its own copy of the model).
MAX_DEFAULT_WORKERS = 4


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "compare",
        help="which method for my model and budget: every method at a matched budget over seeds, side by side",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    add_data_options(parser)
    parser.add_argument_group("data").add_argument(
        "--full", action="store_true", help="use the whole training split (no --max-examples cap)")
    method = parser.add_argument_group("methods")
    method.add_argument("--methods", help="comma list of registered methods and lorapro; default: all of them")
    add_targets_option(method, default="all-linear")
    method.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="change one method's config field or its peak lr (repeatable), "
                             "e.g. --set lora.alpha=16 --set miss.lr=3e-3")
    method.add_argument("--lrs", type=learning_rates, default=None, metavar="LR,LR,...",
                        help="tune each method's peak lr once, on the first seed's validation macro-F1 "
                             "(methods given --set METHOD.lr keep theirs)")
    method.add_argument("--budget", type=positive_int, default=None, metavar="N",
                        help="match every method's size to N trainable adapter parameters on --targets")
    method.add_argument("--budget-like", default=None, metavar="METHOD:KEY=VALUE,...|none",
                        help=f"match every method's size to the count of this configuration (without --budget: "
                             f"{DEFAULT_BUDGET_LIKE}); none: each method at its own size")
    method.add_argument("--seeds", type=positive_int, default=3, metavar="K", help="paired seeds per method")
    method.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="run the sweep's runs in N processes, each with --threads threads (default: "
                             f"min({MAX_DEFAULT_WORKERS}, cores) on a machine without a GPU, each with cores / N threads; "
                             "1 with a GPU)")
    method.add_argument("--full-lrs", type=learning_rates, default=[1e-4], metavar="LR,LR,...",
                        help="learning rate(s) of the full fine-tuning baseline (several: tuned like --lrs)")
    method.add_argument("--no-full-finetune", action="store_true", help="skip the full fine-tuning baseline")
    method.add_argument("--save-adapters", action="store_true",
                        help="also save each trained adapter to OUTPUT/results/<run>/adapter")
    add_training_options(parser, output_help="where the comparison's files go; unset: runs/compare-<task>")
    parser.set_defaults(func=run, **DEFAULT_SCALE)
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


def compare_config(args: argparse.Namespace) -> CompareConfig:
    """The parsed options as the pipeline's :class:`CompareConfig` (every value checked, nothing loaded)."""
    if args.nproc != 1:
        raise ValueError("compare runs many independent runs: spread them with --workers N (processes on this "
                         "machine) or `python -m rankwise.experiment.sweep OUTPUT/sweep.json` under torchrun / SLURM, "
                         "not --nproc (which splits one run's batches)")
    names = selected_methods(args.methods, everything=entries, method_of=entry_method)
    if args.budget is not None and args.budget_like is not None:
        raise ValueError("compare: give --budget N or --budget-like METHOD:KEY=VALUE, not both")
    budget_like = None if args.budget is not None or args.budget_like == "none" else (args.budget_like or DEFAULT_BUDGET_LIKE)
    workers = args.workers if args.workers is not None else default_workers()
    data = data_config(args)
    if args.full:
        data = dataclasses.replace(data, max_examples=0)
    return CompareConfig(methods=names,
                         options=per_method_options(args.overrides, names, training_keys=("lr",), method_of=entry_method),
                         targets=parse_targets(args.targets), data=data, model=args.model,
                         settings=train_settings(args), lrs=args.lrs, probe=not args.no_probe, probe_lr=args.probe_lr,
                         full_finetune=not args.no_full_finetune, full_lrs=args.full_lrs,
                         threads=threads(args, processes=workers),
                         output_dir=args.output_dir, save_adapters=args.save_adapters,
                         budget=args.budget, budget_like=budget_like,
                         seeds=args.seeds, workers=workers)


def default_workers() -> int:
    """Runs at a time by default: one per core up to :data:`MAX_DEFAULT_WORKERS` on a machine without a GPU (a small
    model's run uses one core better than several: benchmarks/results/threads.md times a step at 10.7 s on 1 thread and
    6.9 s on 2, so two 1-thread runs make 1.3x the steps of one 2-thread run), 1 with a GPU (runs would share it)."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(MAX_DEFAULT_WORKERS, available_cores()))


def run(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand: exit status 1 when a run failed."""
    result = compare(compare_config(args))
    print(result["table"])
    for method, match in result["matches"].items():
        count = "—" if match["count"] is None else f"{match['count']:,}"
        ratio = "" if match["ratio"] is None else f" ({match['ratio']:.3f} × budget)"
        print(f"- {method}: {count} adapter parameters{ratio}" + (f" † {match['reason']}" if match["reason"] else ""))
    for line in result["claims"]:
        print(line)
    failed = [row for row in result["rows"] if row["error"] and not row["error"].startswith(SKIPPED)]
    if failed:
        print(f"{len(failed)} failed: " + "; ".join(f"{row['method']}: {row['error']}" for row in failed))
    print(f"wrote {', '.join(sorted(result['paths']))} to {result['output_dir']}")
    return 1 if failed else 0
