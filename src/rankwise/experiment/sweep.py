"""A resumable sweep of independent runs: one sweep file, one result file per finished run.

The sweep file (JSON, written by :func:`write_sweep`) names the function that executes one run, as an
import path (``"package.module:function"``), and lists the runs, each an id and a spec (a JSON object:
method, seed, lr, ...)::

    {"format": "rankwise-sweep", "function": "mypkg.runs:train", "results_dir": "results",
     "runs": [{"id": "lora-seed=0", "spec": {"method": "lora", "seed": 0}}, ...]}

Executing run ``i`` calls ``function(spec, workdir)`` (``workdir`` = ``results_dir/<id>/``, for the run's own
files such as checkpoints) and writes the JSON object it returns, with the spec and the wall time, to
``results_dir/<id>.json`` through :func:`rankwise.core.io.save_json`: a temporary file renamed into place,
so a run killed at any moment (Ctrl-C, SIGKILL) leaves either no result file or a complete one. A run
whose result file exists is finished and is never executed again; restarting a killed sweep executes
only the others. A result file whose spec differs from the sweep file's (the sweep was edited but the id
kept) is an error rather than a silent reuse.

Where the runs execute:

* :func:`run_sweep` ``(workers=1)``: every pending run, one after the other, in this process.
* :func:`run_sweep` ``(workers=N)``: N spawned processes on this machine, each with its own torch thread
  count (``threads``, default: this machine's cores // N). Runs are independent, so the results do not
  depend on N as long as the run function is deterministic given its spec and thread count (torch's CPU
  reductions may round differently with another thread count: pass the same ``threads`` for bit-identical
  numbers).
* :func:`run_one` / ``python -m rankwise.experiment.sweep SWEEP_FILE [INDEX]``: one run, for spreading a
  sweep over machines with an existing launcher, every task reading the same sweep file on a shared
  file system and writing its own result file. Without ``INDEX`` the command takes
  ``$SLURM_ARRAY_TASK_ID`` (a SLURM array ``sbatch --array=0-K``), else its share ``RANK::WORLD_SIZE``
  of the runs (one process per rank under ``torchrun --nproc-per-node N`` or ``torchrun --nnodes M``),
  else every pending run; ``$RANKWISE_THREADS`` sets its torch thread count. A Ray task is
  ``ray.remote(run_one).remote(path, i)``. Nothing here schedules across machines.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ..core.io import read_json, save_json

FORMAT = "rankwise-sweep"
RESULT_FORMAT = "rankwise-sweep-result"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")

RunFunction = Callable[[dict[str, Any], Path], dict[str, Any]]


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep file: where it is, the run function's import path, the runs and the results folder."""

    path: Path
    function: str
    runs: tuple[tuple[str, dict[str, Any]], ...]
    results_dir: Path

    def result_path(self, index: int) -> Path:
        return self.results_dir / f"{self.runs[index][0]}.json"

    def workdir(self, index: int) -> Path:
        return self.results_dir / self.runs[index][0]


def run_id(spec: Mapping[str, Any]) -> str:
    """A readable file-name-safe id from a spec: ``method=lora,seed=0`` (characters outside [A-Za-z0-9._=,+-]
    become ``_``)."""
    text = ",".join(f"{key}={spec[key]}" for key in sorted(spec))
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text) or "run"


def write_sweep(
    path: str | os.PathLike[str],
    function: str,
    specs: Iterable[Mapping[str, Any]],
    results_dir: str = "results",
    ids: Sequence[str] | None = None,
) -> Sweep:
    """Write a sweep file atomically and return it loaded.

    Args:
        path: the sweep file.
        function: import path of the run function, ``"package.module:function"``.
        specs: one JSON object per run.
        results_dir: where result files go, relative to the sweep file's folder.
        ids: one id per run (file-name safe, unique); default :func:`run_id` of each spec.
    """
    specs = [dict(spec) for spec in specs]
    ids = list(ids) if ids is not None else [run_id(spec) for spec in specs]
    if len(ids) != len(specs):
        raise ValueError(f"write_sweep: {len(ids)} ids for {len(specs)} runs; give one id per run")
    payload = {"format": FORMAT, "function": function, "results_dir": results_dir,
               "runs": [{"id": run, "spec": spec} for run, spec in zip(ids, specs)]}
    _check(Path(path), payload)
    resolve(function)
    save_json(Path(path), payload)
    return load_sweep(path)


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read and check a sweep file (format, function path, unique file-name-safe ids)."""
    path = Path(path)
    payload = read_json(path, "rankwise sweep")
    _check(path, payload)
    runs = tuple((run["id"], run["spec"]) for run in payload["runs"])
    return Sweep(path, payload["function"], runs, path.parent / payload.get("results_dir", "results"))


def _check(path: Path, payload: Mapping[str, Any]) -> None:
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a rankwise sweep file (format {payload.get('format')!r}, expected {FORMAT!r})")
    if not isinstance(payload.get("function"), str) or not isinstance(payload.get("runs"), list):
        raise ValueError(f"{path}: a sweep file needs 'function' (an import path) and 'runs' (a list)")
    seen: set[str] = set()
    for i, run in enumerate(payload["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("spec"), dict) or not isinstance(run.get("id"), str):
            raise ValueError(f"{path}: run {i} must be an object with an 'id' string and a 'spec' object")
        if not _ID.match(run["id"]) or len(run["id"]) > 200:
            raise ValueError(f"{path}: run {i} has id {run['id']!r}; an id is a file name of at most 200 characters "
                             "from [A-Za-z0-9._=,+-], starting with a letter or digit")
        if run["id"] in seen:
            raise ValueError(f"{path}: run id {run['id']!r} appears twice; every run needs its own result file")
        seen.add(run["id"])


def resolve(function: str) -> RunFunction:
    """Import ``"package.module:function"`` (or ``"package.module.function"``)."""
    module_name, sep, attribute = function.partition(":")
    if not sep:
        module_name, _, attribute = function.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"run function {function!r} is not an import path like 'package.module:function'")
    found = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(found):
        raise ValueError(f"run function {function!r}: {module_name} has no callable {attribute!r}")
    return found


def finished(sweep: Sweep, index: int) -> dict[str, Any] | None:
    """The result of run ``index`` if it has finished (its result file exists), else None."""
    path = sweep.result_path(index)
    if not path.is_file():
        return None
    result = read_json(path, "rankwise sweep result")
    if result.get("spec") != sweep.runs[index][1]:
        raise ValueError(f"{path} holds the result of spec {result.get('spec')}, but run {index} of {sweep.path} is "
                         f"{sweep.runs[index][1]}: the sweep file changed under the same id. Delete the result "
                         "file to run it again, or give the changed run a new id")
    return result


def pending(sweep: Sweep) -> list[int]:
    """Indices of the runs without a result file."""
    return [i for i in range(len(sweep.runs)) if finished(sweep, i) is None]


def run_one(sweep: Sweep | str | os.PathLike[str], index: int, threads: int | None = None) -> dict[str, Any]:
    """Execute run ``index`` of the sweep unless it has finished; return its result file's content.

    ``threads`` sets torch's thread count for the run (restored afterwards).
    """
    sweep = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    if not 0 <= index < len(sweep.runs):
        raise ValueError(f"{sweep.path} has runs 0..{len(sweep.runs) - 1}, not {index}")
    done = finished(sweep, index)
    if done is not None:
        return done
    run, spec = sweep.runs[index]
    function = resolve(sweep.function)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        workdir = sweep.workdir(index)
        workdir.mkdir(parents=True, exist_ok=True)
        output = function(dict(spec), workdir)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    if not isinstance(output, dict):
        raise TypeError(f"run function {sweep.function} returned {type(output).__name__} for run {run!r}; it must "
                        "return a JSON object (dict)")
    result = {"format": RESULT_FORMAT, "id": run, "index": index, "spec": spec, "result": output,
              "seconds": round(seconds, 3), "threads": threads if threads is not None else previous}
    save_json(sweep.result_path(index), result)
    return result


def _worker_init(sweep_path: str, threads: int) -> None:
    """Spawned worker: its thread count, and the sweep path for :func:`_worker_run`."""
    torch.set_num_threads(threads)
    os.environ["RANKWISE_SWEEP_FILE"] = sweep_path


def _worker_run(index: int, threads: int) -> dict[str, Any]:
    return run_one(os.environ["RANKWISE_SWEEP_FILE"], index, threads)


def run_sweep(
    sweep: Sweep | str | os.PathLike[str],
    workers: int = 1,
    threads: int | None = None,
    on_result: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Execute every pending run (``workers`` processes) and return all results in sweep order.

    Args:
        sweep: a :class:`Sweep` or the sweep file.
        workers: 1: in this process; N > 1: N spawned processes.
        threads: torch threads per run; default ``os.cpu_count() // workers`` (at least 1).
        on_result: ``(result, finished so far, total)`` after each run finishes (a progress bar's update).
    """
    sweep = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"run_sweep: workers must be a positive integer, got {workers!r}")
    threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // workers)
    todo = pending(sweep)
    done = len(sweep.runs) - len(todo)

    def report(result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if on_result is not None:
            on_result(result, done, len(sweep.runs))

    if workers == 1:
        for index in todo:
            report(run_one(sweep, index, threads))
    elif todo:
        context = get_context("spawn")  # a fork of a process that has run torch's thread pools can hang
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_worker_init,
                                 initargs=(str(sweep.path), threads)) as pool:
            futures = [pool.submit(_worker_run, index, threads) for index in todo]
            try:
                for future in as_completed(futures):
                    report(future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return [run_one(sweep, i) for i in range(len(sweep.runs))]  # every run has finished: this reads the files


def share(count: int, rank: int, world_size: int) -> list[int]:
    """The run indices of process ``rank`` of ``world_size``: ``rank, rank + world_size, ...``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(range(rank, count, world_size))


def main(argv: Sequence[str]) -> int:
    """``python -m rankwise.experiment.sweep SWEEP_FILE [INDEX]`` (module docstring)."""
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__.split("Where the runs execute:")[0].strip() + "\n\nusage: python -m rankwise.experiment.sweep "
              "SWEEP_FILE [INDEX]", file=sys.stderr)
        return 2
    sweep = load_sweep(argv[0])
    environment = os.environ
    if len(argv) == 2:
        indices = [int(argv[1])]
    elif "SLURM_ARRAY_TASK_ID" in environment:
        indices = [int(environment["SLURM_ARRAY_TASK_ID"])]
    elif "RANK" in environment and "WORLD_SIZE" in environment:
        indices = share(len(sweep.runs), int(environment["RANK"]), int(environment["WORLD_SIZE"]))
    else:
        indices = list(range(len(sweep.runs)))
    threads = int(environment["RANKWISE_THREADS"]) if "RANKWISE_THREADS" in environment else None
    for index in indices:
        result = run_one(sweep, index, threads)
        print(f"{sweep.path}: run {index} ({result['id']}) finished in {result['seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

__all__ = ["FORMAT", "RESULT_FORMAT", "Sweep", "finished", "load_sweep", "pending", "resolve", "run_id", "run_one",
           "run_sweep", "share", "write_sweep"]
