"""Several methods on one task under one budget, side by side: ``compare(CompareConfig(...))``.

Every method gets the same split, examples, seed, head initialisation, steps, batch size, schedule and
targets (:class:`CompareConfig`); its row holds its key hyper-parameters, trainable parameters, test
accuracy and macro-F1, final training loss, training time and median step time, beside the
majority-class and linear-probe baselines. ``rankwise compare`` (:mod:`rankwise.cli.compare`) is
the command line over it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.io import atomic_write, save, save_json
from ..core.registry import get_method, methods
from . import report
from .pipeline import (
    CHECKPOINTS,
    COMMON_FIELDS,
    SHIPPED_MODEL,
    DataConfig,
    Log,
    Prepared,
    adapted_classifier,
    final_ranks,
    is_main_process,
    linear_probe,
    prepare,
    setup_torch,
    train_method,
)
from .train import Trained, TrainSettings, majority_metrics, world_size

logger = logging.getLogger(__name__)

JSON_FILE = "comparison.json"
MARKDOWN_FILE = "comparison.md"


@dataclass(frozen=True)
class CompareConfig:
    """One ``compare`` run. ``options[method]`` holds that method's config fields and, optionally, its own
    peak ``lr``; ``lrs`` (a grid) tunes the lr of every method without one, by validation macro-F1.

    ``budget`` (trainable adapter parameters) or ``budget_like`` (``"lora:r=8"``) sets every method's size knob,
    ``seeds`` the number of paired seeds from ``settings.seed`` and ``workers`` the sweep's processes; these are
    read by :func:`rankwise.experiment.matched.compare_matched` (:func:`compare` is one seed, in this process)."""

    methods: list[str] = field(default_factory=methods)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[str] | str = "all-linear"
    data: DataConfig = field(default_factory=DataConfig)
    model: str = SHIPPED_MODEL
    settings: TrainSettings = field(default_factory=TrainSettings)
    lrs: list[float] | None = None
    probe: bool = True
    probe_lr: float = 5e-3
    threads: int | None = None
    output_dir: str | None = None
    save_adapters: bool = False
    budget: int | None = None
    budget_like: str | None = None
    seeds: int = 1
    workers: int = 1


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


def run_one(prepared: Prepared, method: str, options: dict[str, Any], config: CompareConfig,
            output: Path) -> dict[str, Any]:
    """Fine-tune ``method`` (at each ``--lrs`` rate, keeping the best on validation) and return its row.

    Any failure becomes an error row with the message.
    """
    settings = config.settings
    config_options = {k: v for k, v in options.items() if k != "lr"}
    rates = [float(options["lr"])] if "lr" in options else (config.lrs or [settings.lr])
    shown_lr = "" if rates == [settings.lr] else f" lr={rates[0]:g}"
    best: tuple[float, float, nn.Module, Any, Trained] | None = None
    scores: dict[str, float] = {}
    try:
        for lr in rates:
            model, adapter = adapted_classifier(prepared, method, config_options, config.targets, settings.seed,
                                                settings.total_steps(len(prepared.train)))
            trained = train_method(model, prepared, dataclasses.replace(settings, lr=lr),
                                   output / CHECKPOINTS / method, validate=len(rates) > 1)
            score = trained.history.evaluations[-1][1].macro_f1 if trained.history.evaluations else 0.0
            scores[f"{lr:g}"] = round(score, 4)
            if best is None or score > best[0]:
                best = (score, lr, model, adapter, trained)
            del model, trained
            gc.collect()
        _, lr, model, adapter, trained = best
        if len(rates) > 1:
            shown_lr = f" lr={lr:g} (best of {len(rates)})"
        if config.save_adapters and is_main_process():
            save(model, output / method)
        extra: dict[str, Any] = {"validation_macro_f1_by_lr": scores} if len(rates) > 1 else {}
        ranks = final_ranks(model)
        if ranks is not None:
            extra["ranks"] = ranks
        return trained_row(method, "method", trained, config_summary(adapter.to_dict(), options) + shown_lr,
                           method_config=adapter.to_dict(), overrides=options, lr=lr, **extra)
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
            f"{settings['optimizer']} peak lr {lr_text(payload)}, {settings['schedule']} after {settings['warmup']:g} warm-up "
            f"(probe lr {payload['probe_lr']:g}), seed {settings['seed']}; "
            f"targets {payload['targets']}; trainable counts include the classification head.")


def markdown_report(payload: dict[str, Any]) -> str:
    return f"# rankwise compare: {payload['task']}\n\n{budget_line(payload)}\n\n{markdown_table(payload['rows'])}\n"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def compare(config: CompareConfig, log: Log = logger.info) -> dict[str, Any]:
    """Fine-tune every method of ``config`` under one budget, write ``comparison.json`` and ``comparison.md``
    (rank 0) and return the payload; ``log`` receives one line per method. A method that fails is an error
    row (``payload["rows"]``), the others still run."""
    started = time.perf_counter()
    settings = config.settings
    for method in config.methods:
        get_method(method)
    setup_torch(config.threads)
    prepared = prepare(config.data, config.model, settings.seed, log)
    labels = prepared.splits.train.label_names
    output = Path(config.output_dir or f"runs/compare-{config.data.name}")

    majority = majority_metrics(prepared.splits.train.labels, prepared.test.labels, len(labels))
    rows: list[dict[str, Any]] = [{
        "name": "majority class", "kind": "baseline", "config": "", "trainable": 0, **report.metrics_dict(majority),
        "steps": 0, "final_train_loss": None, "train_seconds": None, "median_step_seconds": None, "error": None,
    }]
    if config.probe:
        probe = linear_probe(prepared, settings, config.probe_lr, output / CHECKPOINTS / "probe")
        rows.append(trained_row("linear probe (head only)", "baseline", probe, f"lr={config.probe_lr:g}"))
    for i, method in enumerate(config.methods, 1):
        row = run_one(prepared, method, config.options.get(method, {}), config, output)
        rows.append(row)
        outcome = (f"failed: {row['error']}" if row["error"] else
                   f"{row['trainable']:,} trainable, accuracy {row['accuracy']:.4f}, {row['train_seconds']:.1f} s")
        log(f"[{i}/{len(config.methods)}] {method}: {outcome}")

    payload = {
        "task": config.data.data or config.data.task,
        "model": config.model,
        "methods": list(config.methods),
        "targets": config.targets,
        "settings": dataclasses.asdict(settings),
        "steps": settings.total_steps(len(prepared.train)),
        "lrs": config.lrs,
        "probe_lr": config.probe_lr,
        "max_length": config.data.max_length,
        "split_sizes": prepared.splits.sizes(),
        "world_size": world_size(),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if is_main_process():
        markdown = markdown_report(payload)
        save_json(output / JSON_FILE, payload)
        atomic_write(output / MARKDOWN_FILE, lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
    payload["output_dir"] = str(output)
    return payload
