"""Reports of a run: the metrics JSON, the training-curve PNG, the rank heat map of an allocating
method and the side-by-side results table."""

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
RANKS_FILE = "rank_heatmap.png"


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


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """``(module types, layer indices, grid)`` with ``grid[type][index]`` the rank (None where no layer is).

    A layer name's first all-digit part is its layer index and what follows it is its module type
    (``bert.encoder.layer.3.attention.self.query``: index 3, type ``attention.self.query``), shown by
    its shortest ending that no other type ends with (``query``, ``attention.output.dense``,
    ``output.dense``). A name without an index is its own type, in a column ``—``. Types keep the
    order in which they first appear; indices are sorted.
    """
    cells: dict[tuple[str, str], int] = {}
    types: list[str] = []
    indices: set[int] = set()
    unindexed = False
    for name, rank in ranks.items():
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is None or at == len(parts) - 1:
            kind, column, unindexed = name, "—", True
        else:
            kind, column = ".".join(parts[at + 1:]), parts[at]
            indices.add(int(column))
        if kind not in types:
            types.append(kind)
        cells[kind, column] = rank
    columns = [str(i) for i in sorted(indices)] + (["—"] if unindexed else [])
    grid = [[cells.get((kind, column)) for column in columns] for kind in types]
    return [_short_name(kind, types) for kind in types], columns, grid


def _short_name(kind: str, kinds: list[str]) -> str:
    """The shortest dotted ending of ``kind`` that no other of ``kinds`` ends with (else ``kind`` itself)."""
    parts = kind.split(".")
    for start in range(len(parts) - 1, 0, -1):
        ending = ".".join(parts[start:])
        if not any(other != kind and (other == ending or other.endswith("." + ending)) for other in kinds):
            return ending
    return kind


def plot_rank_heatmap(ranks: dict[str, int], path: Path, title: str) -> Path:
    """The rank of every adapted layer as a PNG heat map: module type (rows) by layer index (columns).

    Each cell is annotated with its rank when the grid has at most 400 cells; missing layers are blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, columns, grid = rank_grid(ranks)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    figure, axis = plt.subplots(figsize=(max(4.0, 1.0 + 0.55 * len(columns)), max(2.5, 1.2 + 0.45 * len(rows))))
    top = max(1, int(np.nanmax(values)))
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", vmin=0, vmax=top)
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)
    axis.set_xlabel("layer index")
    axis.set_ylabel("module")
    if values.size <= 400:
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value is not None:
                    axis.text(j, i, str(value), ha="center", va="center", fontsize=8,
                              color="white" if value < top / 2 else "black")
    figure.colorbar(image, ax=axis, label="rank")
    axis.set_title(title)
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
