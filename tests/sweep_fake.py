"""A tiny deterministic run function for the sweep tests (imported by spawned workers and subprocesses)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch


def tiny_run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``spec["steps"]`` gradient steps of least squares from ``spec["seed"]`` at ``spec["lr"]``.

    ``spec["log"]``: a file that gets one line ``id,pid`` per call, at its start. ``spec["wait_for"]``: a file
    to wait for before computing (a run that stays in progress until the test lets it go).
    """
    if "log" in spec:
        with open(spec["log"], "a", encoding="utf-8") as handle:
            handle.write(f"{spec['method']}-{spec['seed']},{os.getpid()}\n")
    while "wait_for" in spec and not Path(spec["wait_for"]).exists():
        time.sleep(0.05)
    generator = torch.Generator().manual_seed(spec["seed"])
    x = torch.randn(64, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(64, generator=generator)
    w = torch.zeros(8)
    for _ in range(spec["steps"]):
        w -= spec["lr"] * 2 * x.T @ (x @ w - y) / len(y)
    (workdir / "weights.txt").write_text(" ".join(f"{v:.6g}" for v in w.tolist()), encoding="utf-8")
    return {"loss": float(((x @ w - y) ** 2).mean()), "w": w.tolist(), "threads": torch.get_num_threads()}


def returns_a_list(spec: dict[str, Any], workdir: Path) -> Any:
    return [spec]


def returns_unserialisable(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    return {"loss": 0.5, "tensor": torch.zeros(2)}  # json.dump fails half-way through the file
