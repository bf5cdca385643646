"""Run a function on several spawned CPU processes joined in a gloo process group (the DDP tests share this).

Each process ends deterministically. Twice in full-suite runs (never in 40 runs of the same work
alone, under load) a process aborted with SIGABRT, "terminate called without an active exception",
which is how a gloo group torn down by accident fails: the likely path is a DistributedDataParallel
wrapper kept alive by a reference cycle, holding the group past ``destroy_process_group``, so that the
group's worker threads are destroyed during interpreter finalisation, possibly while the other process
is still closing its connections. So every process writes its result atomically, collects its garbage
while the group is alive, waits at a barrier for the others, destroys the group and leaves with
``os._exit(0)``, skipping a finalisation that has nothing left to do. Should a process still die by a
signal after every process has written its result, the work is done and the results stand (with a
warning); a death before that fails the test.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing


def _process(rank: int, work: Callable[[int], dict[str, Any]], directory: str, processes: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=processes)
    result = work(rank)
    partial = Path(directory) / f"rank{rank}.pt.partial"
    torch.save(result, partial)
    partial.replace(Path(directory) / f"rank{rank}.pt")
    del result
    gc.collect()  # DDP wrappers and reducers in reference cycles, freed while the group still exists
    dist.barrier()  # no process tears down while another still talks to it
    dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def on_gloo_processes(work: Callable[[int], dict[str, Any]], directory: Path, processes: int = 2) -> list[dict[str, Any]]:
    """``work(rank)`` on ``processes`` spawned processes (one thread each, a file store in ``directory``), in a
    gloo group; each process's returned dict, in rank order. ``work`` must be a module-level function.

    An exception in ``work`` fails the spawn with its traceback (torch.multiprocessing reports it)."""
    results = [directory / f"rank{rank}.pt" for rank in range(processes)]
    try:
        torch.multiprocessing.spawn(_process, args=(work, str(directory), processes), nprocs=processes, join=True)
    except torch.multiprocessing.ProcessExitedException as death:
        if death.signal_name is None or not all(path.exists() for path in results):
            raise
        warnings.warn(f"a gloo process died by {death.signal_name} while tearing down, after every result was written", stacklevel=2)
    return [torch.load(path, weights_only=False) for path in results]
