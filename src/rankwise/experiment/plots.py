"""The comparison's outputs: one row per method over its seeds, ``comparison.json`` / ``comparison.csv`` with a
fixed column set, the PNG plots and a ``report.md`` that links them.

Input: one :class:`RunRecord` per finished run (one method or baseline, one seed, at its chosen learning
rate), as a sweep's run function returns it. :func:`comparison_rows` turns them into rows (:data:`COLUMNS`):
mean and sample standard deviation of test accuracy and macro-F1 over the seeds, the tie marks of
:mod:`rankwise.experiment.stats` among the methods (``best``, ``tie``: tied with the best; baselines are not
ranked), the trainable count and its ratio to the budget, the chosen learning rates, and the median step
time and peak memory, also as ratios to LoRA's (measured in the same sweep; empty without a LoRA row).

Plots (matplotlib, Agg backend):

* ``accuracy_vs_parameters.png``: mean test accuracy against trainable parameters, one point per method with
  ± one standard deviation error bars, log x-axis; baselines without trainable parameters (majority
  class) as a horizontal line.
* ``validation_curves.png``: validation accuracy against the optimizer step, mean over seeds.
* ``training_loss.png``: training loss against the step, mean over seeds, smoothed by a moving average.
* ``cost.png``: median step time and peak memory per method as ratios to LoRA.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.io import atomic_write, save_json
from . import stats
from .report import markdown_table

JSON_FILE = "comparison.json"
CSV_FILE = "comparison.csv"
REPORT_FILE = "report.md"
ACCURACY_PLOT = "accuracy_vs_parameters.png"
VALIDATION_PLOT = "validation_curves.png"
LOSS_PLOT = "training_loss.png"
COST_PLOT = "cost.png"
REFERENCE = "lora"

#: The columns of every row, in ``comparison.json`` and ``comparison.csv`` alike.
COLUMNS = (
    "method", "kind", "config", "seeds", "trainable", "budget_ratio", "budget_note", "lr",
    "accuracy_mean", "accuracy_std", "accuracy_mark", "macro_f1_mean", "macro_f1_std", "macro_f1_mark",
    "step_seconds", "step_time_vs_lora", "peak_memory_mb", "peak_memory_vs_lora", "failed_runs", "error",
)


@dataclass
class RunRecord:
    """One finished run.

    Args:
        method: entry name (``"lora"``, ``"lorapro"``) or baseline name (``"linear probe"``).
        seed: the run's seed (runs of two methods with one seed are paired).
        kind: ``"method"`` (ranked) or ``"baseline"`` (shown, not ranked).
        trainable: trainable parameters (adapter and head).
        accuracy, macro_f1: test metrics (None when the run failed; a non-finite one makes the record failed).
        lr: the learning rate the run trained with (the one tuned on validation).
        budget_ratio: the trained adapter's parameters / the budget (:mod:`rankwise.experiment.budget`).
        budget_note: why the method is not at the budget, when it is not.
        train_loss: the loss at every optimizer step.
        validation: ``[{"step": s, "accuracy": a, "macro_f1": f}, ...]`` at each evaluation.
        step_seconds: median wall time of one optimizer step.
        peak_memory_bytes: peak memory of the run (allocator or resident set, as the engine measures it).
        error: the failure message of a run that failed.
        config: the adapter's own hyper-parameters as ``k=v`` (``r=8 alpha=8``), all of them.
        options: the hyper-parameters the comparison set (the budget's size knob, ``--set``, comparison defaults);
            the table's ``config`` column shows these.
        ranks: ``{layer: rank}`` after training, for a method that allocates rank.
        steps: optimizer steps trained.
        train_seconds: wall time of the training loop.
        optimizer: what trained the adapter (``adamw``, ``lorapro``).
    """

    method: str
    seed: int
    kind: str = "method"
    trainable: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    lr: float | None = None
    budget_ratio: float | None = None
    budget_note: str | None = None
    train_loss: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    step_seconds: float | None = None
    peak_memory_bytes: int | None = None
    error: str | None = None
    config: str | None = None
    options: dict[str, Any] | None = None
    ranks: dict[str, int] | None = None
    steps: int | None = None
    train_seconds: float | None = None
    optimizer: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunRecord:
        """A record from a run's JSON result; unknown keys are ignored (a run may report more)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def __post_init__(self) -> None:
        if self.kind not in ("method", "baseline"):
            raise ValueError(f"RunRecord {self.method!r}: kind must be 'method' or 'baseline', got {self.kind!r}")
        # A NaN or infinite test metric is a failed run, never a score: it would sort and average as a number.
        bad = {name: value for name, value in (("accuracy", self.accuracy), ("macro_f1", self.macro_f1))
               if value is not None and not math.isfinite(value)}
        if bad and self.error is None:
            self.error = f"non-finite test metric(s) {bad}"


def options_text(values: Mapping[str, Any]) -> str:
    """Hyper-parameters as ``k=v k=v`` (floats in ``%g``), ``defaults`` when there are none."""
    shown = [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()]
    return " ".join(shown) or "defaults"


def _mean(values: list[float]) -> float | None:
    return stats.mean(values) if values else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def _lrs(records: list[RunRecord]) -> str:
    return ",".join(f"{lr:g}" for lr in sorted({r.lr for r in records if r.lr is not None}))


def comparison_rows(records: Sequence[RunRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (:data:`COLUMNS`, in first-seen method order) and the notes of the tie rule."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.method, []).append(record)
    for name, group in groups.items():
        seeds = [r.seed for r in group]
        if len(set(seeds)) != len(seeds) or len({r.kind for r in group}) != 1:
            raise ValueError(f"comparison_rows: method {name!r} has several runs for one seed or several kinds; "
                             "give each (method, seed) one record")
    notes: list[str] = []
    marks: dict[str, dict[str, str]] = {}
    for metric in ("accuracy", "macro_f1"):
        scores = {name: {r.seed: getattr(r, metric) for r in group if r.error is None and getattr(r, metric) is not None}
                  for name, group in groups.items() if group[0].kind == "method"}
        if any(scores.values()):
            ranking = stats.rank(scores)
            marks[metric] = ranking.marks
            if ranking.note and ranking.note not in notes:
                notes.append(ranking.note)

    def cost(name: str) -> tuple[float | None, float | None]:
        ok = [r for r in groups.get(name, []) if r.error is None]
        memory = _mean([r.peak_memory_bytes for r in ok if r.peak_memory_bytes is not None])
        return _mean([r.step_seconds for r in ok if r.step_seconds is not None]), memory

    reference_time, reference_memory = cost(REFERENCE)
    rows = []
    for name, group in groups.items():
        ok = [r for r in group if r.error is None]
        failed = [r for r in group if r.error is not None]
        step, memory = cost(name)
        counts = [r.trainable for r in ok if r.trainable is not None]
        ratios = [r.budget_ratio for r in ok if r.budget_ratio is not None]
        if len(set(counts)) > 1:
            notes.append(f"{name}: the trained size differs across seeds ({min(counts):,}–{max(counts):,} trainable; "
                         "its rank allocation depends on the data), so its row shows the means")
        row: dict[str, Any] = {
            "method": name,
            "kind": group[0].kind,
            "config": options_text(group[0].options) if group[0].options is not None else None,
            "seeds": len(ok),
            "trainable": round(stats.mean(counts)) if counts else group[0].trainable,
            "budget_ratio": stats.mean(ratios) if ratios else group[0].budget_ratio,
            "budget_note": group[0].budget_note,
            "lr": _lrs(ok),
            "step_seconds": step,
            "step_time_vs_lora": _ratio(step, reference_time),
            "peak_memory_mb": None if memory is None else memory / 2**20,
            "peak_memory_vs_lora": _ratio(memory, reference_memory),
            "failed_runs": len(failed),
            "error": failed[0].error if failed else None,
        }
        for metric in ("accuracy", "macro_f1"):
            values = [getattr(r, metric) for r in ok if getattr(r, metric) is not None]
            row[f"{metric}_mean"] = _mean(values)
            row[f"{metric}_std"] = stats.sample_std(values)
            row[f"{metric}_mark"] = marks.get(metric, {}).get(name, "")
        rows.append({column: row[column] for column in COLUMNS})
    return rows, notes


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None is written as an empty cell
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _number(value: float | None, form: str) -> str:
    return "—" if value is None else format(value, form)


def _score(row: dict[str, Any], metric: str) -> str:
    mean, std, mark = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_mark"]
    text = _number(mean, ".4f") + ("" if std is None else f" ± {std:.4f}")
    return f"**{text}**" if mark == "best" else (f"{text} (tie)" if mark == "tie" else text)


TABLE_HEADERS = ("method", "config", "seeds", "trainable", "× budget", "lr", "test accuracy", "macro-F1", "step time × LoRA",
                 "peak memory × LoRA")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (also the terminal table): the best method's scores in bold, every method
    tied with it marked ``(tie)``; baselines in italics."""
    body = []
    for row in rows:
        name = row["method"] if row["kind"] == "method" else f"*{row['method']}*"
        ratio = _number(row["budget_ratio"], ".3f") + (" †" if row["budget_note"] else "")
        body.append([name, row["config"] or "—", row["seeds"], _number(row["trainable"], ","), ratio, row["lr"] or "—",
                     _score(row, "accuracy"), _score(row, "macro_f1"),
                     _number(row["step_time_vs_lora"], ".2f"), _number(row["peak_memory_vs_lora"], ".2f")])
    return markdown_table(TABLE_HEADERS, body)


def _report(title: str, rows: list[dict[str, Any]], notes: list[str], context: Mapping[str, Any],
            plots: list[str], links: Mapping[str, str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    legend = (f"Mean ± sample standard deviation over seeds. A difference to the best method smaller than "
              f"{stats.TIE_SE:g} standard errors of the paired per-seed differences is a tie (marked); the best "
              "method is in bold. Baselines (in italics) are not ranked. † not at the budget (notes below). trainable: "
              "adapter and classification head; config: what the comparison set (the budget's size knob, --set); "
              "peak memory: the growth of the run's resident-set high-water mark, a lower bound.")
    lines += ["", table(rows), "", legend, ""]
    lines += [f"- {row['method']} †: {row['budget_note']}" for row in rows if row["budget_note"]]
    lines += [f"- {row['method']}: {row['failed_runs']} run(s) failed: {row['error']}" for row in rows if row["error"]]
    lines += [f"- {note}" for note in notes]
    lines += ["", *[f"![{name}]({name})" for name in plots], "",
              f"Data: [{JSON_FILE}]({JSON_FILE}), [{CSV_FILE}]({CSV_FILE}).", ""]
    lines += [*(f"See also: [{name}]({name}): {what}." for name, what in links.items()), ""] if links else []
    return "\n".join(lines)


def write_comparison(
    records: Sequence[RunRecord | Mapping[str, Any]],
    directory: str | Path,
    title: str = "rankwise compare",
    context: Mapping[str, Any] | None = None,
    links: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``comparison.json``, ``comparison.csv``, the four PNGs and ``report.md`` to ``directory``.

    ``links``: other files of the folder the report links to, ``{file name: what it holds}``.

    ``context`` (task, model, budget, command, ...) goes into the JSON and heads the report. Every file is
    written atomically. Returns ``{file name: path}``.
    """
    records = [r if isinstance(r, RunRecord) else RunRecord.from_dict(r) for r in records]
    directory = Path(directory)
    context = dict(context or {})
    rows, notes = comparison_rows(records)
    paths = {
        ACCURACY_PLOT: plot_accuracy_vs_parameters(rows, directory / ACCURACY_PLOT),
        VALIDATION_PLOT: plot_curves(records, directory / VALIDATION_PLOT, "validation"),
        LOSS_PLOT: plot_curves(records, directory / LOSS_PLOT, "train_loss"),
        COST_PLOT: plot_cost(rows, directory / COST_PLOT),
    }
    payload = {"context": context, "columns": list(COLUMNS), "rows": rows, "notes": notes,
               "tie_rule": f"|mean paired difference| < {stats.TIE_SE:g} standard errors",
               "runs": [{f.name: getattr(r, f.name) for f in fields(RunRecord)} for r in records]}
    save_json(directory / JSON_FILE, payload)
    paths[JSON_FILE] = directory / JSON_FILE
    _write_text(directory / CSV_FILE, _csv_text(rows))
    paths[CSV_FILE] = directory / CSV_FILE
    _write_text(directory / REPORT_FILE, _report(title, rows, notes, context, list(paths)[:4], links or {}))
    paths[REPORT_FILE] = directory / REPORT_FILE
    return paths


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    _pyplot().close(figure)
    return path


def plot_accuracy_vs_parameters(rows: list[dict[str, Any]], path: Path) -> Path:
    """Left: mean test accuracy (± std) against trainable parameters on a log axis, one labelled point per row.
    Right: the same accuracies sorted, one line per row (at a matched budget the methods share one x on the left)."""
    plt = _pyplot()
    shown = [row for row in rows if row["accuracy_mean"] is not None]
    figure, (axis, ranked) = plt.subplots(1, 2, figsize=(13, max(4.5, 0.3 * len(shown) + 1.5)),
                                          gridspec_kw={"width_ratios": [3, 2]})
    colours = {"best": "tab:red", "tie": "tab:orange", "": "tab:blue"}

    def colour(row: dict[str, Any]) -> str:
        return "grey" if row["kind"] == "baseline" else colours[row["accuracy_mark"]]

    for row in shown:
        if not row["trainable"]:  # nothing trained (majority class): a level, not a point on a log axis
            axis.axhline(row["accuracy_mean"], color="grey", linestyle="--", linewidth=1)
            axis.annotate(row["method"], (0.01, row["accuracy_mean"]), xycoords=("axes fraction", "data"),
                          fontsize=8, color="grey", va="bottom")
            continue
        axis.errorbar(row["trainable"], row["accuracy_mean"], yerr=row["accuracy_std"] or 0.0, fmt="o",
                      color=colour(row), capsize=3)
        axis.annotate(row["method"], (row["trainable"], row["accuracy_mean"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.set_title("accuracy vs trainable parameters (red: best, orange: tied with it)")
    order = sorted(shown, key=lambda row: row["accuracy_mean"])
    for i, row in enumerate(order):
        ranked.errorbar(row["accuracy_mean"], i, xerr=row["accuracy_std"] or 0.0, fmt="o", color=colour(row), capsize=3)
    ranked.set_yticks(range(len(order)), [row["method"] for row in order], fontsize=8)
    ranked.set_xlabel("test accuracy (mean ± std over seeds)")
    ranked.set_title("sorted (grey: baselines)")
    return _save(figure, path)


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """The element-wise mean over the curves' common length."""
    length = min(len(c) for c in curves)
    return [stats.mean([c[i] for c in curves]) for i in range(length)]


def plot_curves(records: Sequence[RunRecord], path: Path, which: str) -> Path:
    """``which="validation"``: validation accuracy per evaluation step; ``"train_loss"``: the training loss per
    step (moving average over a twentieth of the steps); both as the mean over each method's seeds."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    methods: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.error is None and getattr(record, which):
            methods.setdefault(record.method, []).append(record)
    for name, group in methods.items():
        if which == "validation":
            steps = [point["step"] for point in group[0].validation]
            values = _mean_curve([[point["accuracy"] for point in r.validation] for r in group])
            axis.plot(steps[:len(values)], values, "o-", label=name, markersize=3)
        else:
            values = _mean_curve([r.train_loss for r in group])
            window = max(1, len(values) // 20)
            smooth = [stats.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
            axis.plot(range(1, len(smooth) + 1), smooth, label=name, linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation accuracy" if which == "validation" else "training loss (moving average)")
    axis.set_title(("validation accuracy" if which == "validation" else "training loss") + ", mean over seeds")
    if methods:
        axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def plot_cost(rows: list[dict[str, Any]], path: Path) -> Path:
    """Median step time and peak memory per method as ratios to LoRA, side by side."""
    plt = _pyplot()
    shown = [row for row in rows if row["kind"] == "method"]
    figure, axes = plt.subplots(1, 2, figsize=(9, max(3.0, 0.35 * len(shown) + 1.5)), sharey=True)
    names = [row["method"] for row in shown]
    for axis, key, label in ((axes[0], "step_time_vs_lora", "step time / LoRA's"),
                             (axes[1], "peak_memory_vs_lora", "peak memory / LoRA's")):
        values = [row[key] if row[key] is not None else math.nan for row in shown]
        axis.barh(range(len(names)), values, color="tab:blue")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel(label)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.suptitle("cost per method, as a ratio to LoRA in the same sweep")
    return _save(figure, path)


__all__ = ["COLUMNS", "RunRecord", "comparison_rows", "options_text", "plot_accuracy_vs_parameters", "plot_cost", "plot_curves",
           "table", "write_comparison"]
