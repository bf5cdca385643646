"""How many CPU threads torch should use: the default of ``--threads``.

On a CPU that other programs also use, torch's default (one thread per core, OpenMP threads that
spin while they wait) collapses: a parallel region waits for its slowest thread, and a spinning
thread that shares its core with a busy process burns the time the others need. Measured by
``benchmarks/threads.py`` (``benchmarks/results/threads.md``) on 2 shared cores, one ``./run demo``
training step: 22 s with torch's default 2 threads, 10.7 s with 1 thread, 6.9 s with 2 threads and
``OMP_WAIT_POLICY=PASSIVE`` (29 / 12 / 9 s beside one more busy process).

OpenMP reads its wait policy once, when torch loads, so rankwise cannot change it inside a running
process; ``./run`` and the ``--nproc`` workers export ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.
The default is then: with the passive policy, every core this process may use (shared among the
``nproc`` processes); otherwise only the cores idle when the run starts (the cores minus the 1-minute
load average, rounded), at least one, and :func:`advice` says how to use them all.
"""

from __future__ import annotations

import math
import os

THREADS_HELP = ("torch CPU threads per process; default: all cores (shared among --nproc processes) when "
                "OMP_WAIT_POLICY=PASSIVE is exported (./run does), else only the idle cores (cores minus the "
                "1-minute load average), at least 1: torch's spinning threads collapse on a busy machine")


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores(cores: int, load: float) -> int:
    """``cores`` minus the running load, rounded to the nearest whole core, at least 1."""
    return max(1, math.floor(cores - load + 0.5))


def passive() -> bool:
    """OpenMP threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE`` in the environment)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def default_threads(nproc: int = 1) -> int:
    """Threads per process: every core with the passive wait policy, else the idle cores now; shared among
    ``nproc`` processes, at least 1."""
    cores = available_cores() if passive() else idle_cores(available_cores(), load_average())
    return max(1, cores // max(1, nproc))


def advice(threads: int, nproc: int = 1) -> str | None:
    """A one-line note when the default left cores unused because the machine is busy, else None."""
    cores = available_cores()
    if passive() or threads * nproc >= cores:
        return None
    return (f"the machine is busy (load {load_average():.1f} on {cores} cores): using {threads} thread(s) per process; "
            f"export OMP_WAIT_POLICY=PASSIVE before starting (./run does) to use all {cores} without the collapse")
