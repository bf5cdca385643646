"""Reports of a run: the metrics JSON, the training-curve PNG and the side-by-side results table."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..core.io import save_json
from .train import History, Metrics

METRICS_FILE = "metrics.json"
CURVE_FILE = "training_curve.png"


def metrics_dict(metrics: Metrics) -> dict[str, float | None]:
    """A JSON-ready dict of metrics (NaN becomes null)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(metrics).items()}


def write_metrics(directory: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as ``metrics.json`` in ``directory`` (atomically)."""
    path = directory / METRICS_FILE
    save_json(path, payload)
    return path


def history_dict(history: History) -> dict[str, Any]:
    """The training history as JSON: per-step losses and the validation metrics at each evaluation."""
    return {
        "train_loss": history.losses,
        "validation": [{"step": step, **metrics_dict(m)} for step, m in history.evaluations],
    }


def plot_curve(history: History, path: Path, title: str) -> Path:
    """Training loss per step (with a moving average) and validation accuracy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(history.losses) + 1))
    loss_axis.plot(steps, history.losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    window = max(1, len(history.losses) // 20)
    smooth = [sum(history.losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(steps))]
    loss_axis.plot(steps, smooth, color="tab:blue", label=f"train loss (mean of {window})")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy")
    if history.evaluations:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot(
            [s for s, _ in history.evaluations],
            [m.accuracy for _, m in history.evaluations],
            "o-",
            color="tab:orange",
            label="validation accuracy",
        )
        accuracy_axis.set_ylabel("validation accuracy")
        accuracy_axis.legend(loc="upper right")
    loss_axis.legend(loc="upper left")
    loss_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def results_table(rows: dict[str, tuple[Metrics, int | None]]) -> str:
    """A text table of test metrics: one row per model, with its trainable-parameter count."""
    lines = [f"{'model':<28}{'trainable':>12}{'accuracy':>10}{'macro-F1':>10}"]
    for name, (metrics, trainable) in rows.items():
        count = f"{trainable:,}" if trainable is not None else "-"
        lines.append(f"{name:<28}{count:>12}{metrics.accuracy:>10.4f}{metrics.macro_f1:>10.4f}")
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
