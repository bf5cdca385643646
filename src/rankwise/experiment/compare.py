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

One learning rate for all is a same-budget comparison, not a tuned one: a method whose best rate
differs from ``--lr`` is shown at a disadvantage. Times come from whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from ..core.io import atomic_write, save, save_json
from ..core.registry import get_method, methods
from . import report
from .finetune import (
    COMMON_FIELDS,
    Prepared,
    Trained,
    adapted_classifier,
    add_data_options,
    add_targets_option,
    add_training_options,
    check_options,
    final_ranks,
    linear_probe,
    parse_assignment,
    parse_targets,
    prepare,
    run_name,
    settings_from,
    setup_torch,
    train_and_test,
)
from .train import TrainSettings, majority_metrics

logger = logging.getLogger(__name__)

JSON_FILE = "comparison.json"
MARKDOWN_FILE = "comparison.md"


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
    method.add_argument("--save-adapters", action="store_true", help="also save each trained adapter to OUTPUT/<method>")
    add_training_options(parser, output_help="where comparison.json and comparison.md go; unset: runs/compare-<task>")
    parser.set_defaults(func=run)
    return parser


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def learning_rates(text: str) -> list[float]:
    """``--lrs 1e-3,3e-3``: distinct positive numbers."""
    try:
        rates = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not rates or any(not rate > 0 for rate in rates) or len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"expected distinct positive learning rates, got {text!r}")
    return rates


def selected_methods(text: str | None) -> list[str]:
    """The methods named by ``--methods`` (each checked against the registry), or all registered ones."""
    if text is None:
        return methods()
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--methods needs at least one method name")
    for name in names:
        get_method(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"--methods names {duplicates} more than once")
    return names


def per_method_options(items: list[str], names: list[str],
                       training_keys: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` items as {method: {key: value}}, each key checked against that method's config,
    over the method's ``comparison_defaults`` (SURM: ``rectangular="native"``, so it runs on all-linear).

    Keys in ``training_keys`` (``lr`` for ``compare``) are training settings, not config fields.
    """
    options = {name: dict(get_method(name).config_cls.comparison_defaults) for name in names}
    for item in items:
        target, value = parse_assignment(item, form="METHOD.KEY=VALUE")
        method, dot, key = target.partition(".")
        if not dot or not key:
            raise ValueError(f"--set expects METHOD.KEY=VALUE (e.g. lora.r=16), got {item!r}")
        if method not in options:
            raise ValueError(f"--set {item!r} names method {method!r}, which is not compared (--methods: {names})")
        options[method][key] = value
    for method, values in options.items():
        check_options(method, {k: v for k, v in values.items() if k not in training_keys})
        if "lr" in training_keys and "lr" in values:
            lr = values["lr"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"--set {method}.lr must be a positive number, got {lr!r}")
    return options


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


def default_fields(method: str) -> dict[str, Any]:
    """The method's own hyper-parameters at their registry defaults."""
    fields = dataclasses.fields(get_method(method).config_cls)
    return {f.name: f.default for f in fields if f.name not in COMMON_FIELDS and f.default is not dataclasses.MISSING}


def config_summary(values: dict[str, Any], overrides: dict[str, Any]) -> str:
    """The key hyper-parameters as ``k=v``: every value except None and flags, plus whatever was overridden."""
    shown = []
    for key, value in values.items():
        if key in COMMON_FIELDS or (key not in overrides and (value is None or isinstance(value, bool))):
            continue
        shown.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(shown)


def final_loss(losses: list[float]) -> float:
    """The mean training loss over the last tenth of the steps (at least one step)."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def trained_row(name: str, kind: str, trained: Trained, config: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "config": config,
        "trainable": trained.trainable,
        **report.metrics_dict(trained.test),
        "steps": trained.steps,
        "final_train_loss": round(final_loss(trained.history.losses), 4),
        "train_seconds": round(trained.train_seconds, 3),
        "median_step_seconds": round(trained.seconds_per_step, 4),
        "error": None,
        **extra,
    }


def run_one(prepared: Prepared, method: str, options: dict[str, Any], args: argparse.Namespace,
            settings: TrainSettings, output: Path) -> dict[str, Any]:
    """Fine-tune ``method`` (at each ``--lrs`` rate, keeping the best on validation) and return its row.

    Any failure becomes an error row with the message.
    """
    config_options = {k: v for k, v in options.items() if k != "lr"}
    rates = [float(options["lr"])] if "lr" in options else (args.lrs or [settings.lr])
    shown_lr = "" if rates == [settings.lr] else f" lr={rates[0]:g}"
    best: tuple[float, float, nn.Module, Any, Trained] | None = None
    scores: dict[str, float] = {}
    try:
        for lr in rates:
            model, config = adapted_classifier(prepared, method, config_options, parse_targets(args.targets), args.seed,
                                               settings.total_steps(len(prepared.train)), settings.batch_size)
            trained = train_and_test(model, prepared, dataclasses.replace(settings, lr=lr), method,
                                     validate=len(rates) > 1)
            score = trained.history.evaluations[-1][1].macro_f1 if trained.history.evaluations else 0.0
            scores[f"{lr:g}"] = round(score, 4)
            if best is None or score > best[0]:
                best = (score, lr, model, config, trained)
            del model, trained
            gc.collect()
        _, lr, model, config, trained = best
        if len(rates) > 1:
            shown_lr = f" lr={lr:g} (best of {len(rates)})"
        if args.save_adapters:
            save(model, output / method)
        extra: dict[str, Any] = {"validation_macro_f1_by_lr": scores} if len(rates) > 1 else {}
        ranks = final_ranks(model)
        if ranks is not None:
            extra["ranks"] = ranks
        return trained_row(method, "method", trained, config_summary(config.to_dict(), options) + shown_lr,
                           method_config=config.to_dict(), overrides=options, lr=lr, **extra)
    except Exception as error:  # one method failing must not end the comparison of the others
        logger.debug("%s failed", method, exc_info=True)
        message = f"{type(error).__name__}: {error}"
        return {
            "name": method, "kind": "method",
            "config": config_summary({**default_fields(method), **config_options}, config_options) + shown_lr,
            "trainable": None, "accuracy": None, "macro_f1": None, "loss": None, "steps": None, "final_train_loss": None,
            "train_seconds": None, "median_step_seconds": None, "error": message, "overrides": options,
        }
    finally:
        best = None
        gc.collect()


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


COLUMNS = ("method", "config", "trainable", "test accuracy", "macro-F1", "final train loss", "train time (s)",
           "median step (ms)")


def _cells(row: dict[str, Any]) -> list[str]:
    def number(key: str, form: str, scale: float = 1.0) -> str:
        return "—" if row.get(key) is None else format(row[key] * scale if scale != 1.0 else row[key], form)

    failed = row["error"] is not None
    return [
        row["name"],
        row["config"] or "—",
        "error" if failed else number("trainable", ","),
        number("accuracy", ".4f"),
        number("macro_f1", ".4f"),
        number("final_train_loss", ".4f"),
        number("train_seconds", ".1f"),
        number("median_step_seconds", ".0f", 1000.0),
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned Markdown table, then one line per failed method with its error."""
    body = [[cell.replace("|", "\\|") for cell in _cells(row)] for row in rows]
    widths = [max(len(column), *(len(cells[i]) for cells in body)) for i, column in enumerate(COLUMNS)]
    right = set(range(2, len(COLUMNS)))

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    lines = [line(COLUMNS), rule, *(line(cells) for cells in body)]
    errors = [f"- {row['name']}: {row['error']}" for row in rows if row["error"] is not None]
    if errors:
        lines += ["", "Failed:", *errors]
    return "\n".join(lines)


def lr_text(payload: dict[str, Any]) -> str:
    """The shared peak lr, or the tuned grid."""
    rates = payload.get("lrs")
    if rates:
        return f"chosen per method from {', '.join(f'{r:g}' for r in rates)} by validation macro-F1"
    return f"{payload['settings']['lr']:g}"


def budget_line(payload: dict[str, Any]) -> str:
    """One sentence saying what every row shares."""
    settings = payload["settings"]
    sizes = payload["split_sizes"]
    length = f"{settings['steps']} steps" if settings["steps"] else f"{settings['epochs']:g} epoch{'' if settings['epochs'] == 1 else 's'}"
    return (f"Task {payload['task']}, model {payload['model']}; train {sizes['train']}, test {sizes['test']} examples; "
            f"{length} ({payload['steps']} steps) of batch {settings['batch_size']}, max length {payload['max_length']}, "
            f"AdamW peak lr {lr_text(payload)} with linear decay (probe lr {payload['probe_lr']:g}), seed {settings['seed']}; "
            f"targets {payload['targets']}; trainable counts include the classification head.")


def markdown_report(payload: dict[str, Any]) -> str:
    return f"# rankwise compare: {payload['task']}\n\n{budget_line(payload)}\n\n{markdown_table(payload['rows'])}\n"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand."""
    started = time.perf_counter()
    names = selected_methods(args.methods)
    options = per_method_options(args.overrides, names, training_keys=("lr",))
    targets = parse_targets(args.targets)
    settings = settings_from(args, args.lr)  # check the budget before loading anything
    setup_torch(args)
    prepared = prepare(args)
    labels = prepared.splits.train.label_names
    output = Path(args.output_dir or f"runs/compare-{run_name(args)}")

    majority = majority_metrics(prepared.splits.train.labels, prepared.test.labels, len(labels))
    rows: list[dict[str, Any]] = [{
        "name": "majority class", "kind": "baseline", "config": "", "trainable": 0, **report.metrics_dict(majority),
        "steps": 0, "final_train_loss": None, "train_seconds": None, "median_step_seconds": None, "error": None,
    }]
    if not args.no_probe:
        probe = linear_probe(prepared, args)
        rows.append(trained_row("linear probe (head only)", "baseline", probe, f"lr={args.probe_lr:g}"))
    for i, method in enumerate(names, 1):
        row = run_one(prepared, method, options[method], args, settings, output)
        rows.append(row)
        outcome = (f"failed: {row['error']}" if row["error"] else
                   f"{row['trainable']:,} trainable, accuracy {row['accuracy']:.4f}, {row['train_seconds']:.1f} s")
        print(f"[{i}/{len(names)}] {method}: {outcome}")

    payload = {
        "task": args.data or args.task,
        "model": args.model,
        "methods": names,
        "targets": targets,
        "settings": dataclasses.asdict(settings),
        "steps": settings.total_steps(len(prepared.train)),
        "lrs": args.lrs,
        "probe_lr": args.probe_lr,
        "max_length": args.max_length,
        "split_sizes": prepared.splits.sizes(),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    markdown = markdown_report(payload)
    save_json(output / JSON_FILE, payload)
    atomic_write(output / MARKDOWN_FILE, lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
    print(markdown)
    failed = [row["name"] for row in rows if row["error"]]
    print(f"wrote {output / JSON_FILE} and {output / MARKDOWN_FILE} in {payload['wall_seconds']:.0f} s"
          + (f"; {len(failed)} of {len(names)} methods failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
