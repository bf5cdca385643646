"""Run a function on several spawned CPU processes joined in a gloo process group (the DDP tests share this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _process(rank: int, work: Callable[[int], dict[str, Any]], directory: str, processes: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=processes)
    try:
        torch.save(work(rank), Path(directory) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_gloo_processes(work: Callable[[int], dict[str, Any]], directory: Path, processes: int = 2) -> list[dict[str, Any]]:
    """``work(rank)`` on ``processes`` spawned processes (one thread each, a file store in ``directory``), in a
    gloo group; each process's returned dict, in rank order. ``work`` must be a module-level function."""
    torch.multiprocessing.spawn(_process, args=(work, str(directory), processes), nprocs=processes, join=True)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(processes)]
