"""How many CPU threads torch should use: the default of ``--threads``.

On a CPU that other programs also use, torch's default (one thread per core) collapses: an OpenMP
parallel region waits for its slowest thread, and a thread that shares its core with a busy process
runs a fraction of the time, so every matmul waits for it (measured by ``benchmarks/threads.py``,
``benchmarks/results/threads.md``: on 2 cores with one busy process beside, a MiniLM training step
takes several times longer with 2 threads than with 1). The default therefore counts only the cores
that are idle when the run starts (the cores this process may use minus the 1-minute load average,
rounded), shares them among the ``nproc`` processes, and never goes below one thread.
"""

from __future__ import annotations

import math
import os

THREADS_HELP = ("torch CPU threads per process; default: the idle cores (cores minus the 1-minute load average) "
                "shared among --nproc processes, at least 1 (torch's one-per-core collapses on a busy machine)")


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores(cores: int, load: float) -> int:
    """``cores`` minus the running load, rounded to the nearest whole core, at least 1."""
    return max(1, math.floor(cores - load + 0.5))


def default_threads(nproc: int = 1) -> int:
    """Threads per process: the idle cores now, shared among ``nproc`` processes, at least 1."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, idle_cores(available_cores(), load) // max(1, nproc))
