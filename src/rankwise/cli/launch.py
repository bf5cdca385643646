"""``--nproc N``: run the same command line on N processes of this machine with torch's elastic launcher.

The command starts N copies of ``python -m rankwise <the same arguments>`` through
``torch.distributed.launcher.elastic_launch`` (torchrun's engine, with torchrun's ``--standalone``
rendezvous); in each worker it sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, which
transformers.Trainer reads to train with DDP (gloo on CPU, NCCL on GPUs), and the worker does not
launch again. (torchrun's own command line would read rankwise's options as abbreviations of its own:
``--r`` is ambiguous there.) On several machines, run torchrun yourself on each one::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m rankwise finetune --batch-size 256 ...
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

from ..experiment.pipeline import is_main_process


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(argv: list[str], nproc: int, threads: int, program: tuple[str, ...] = ("-m", "rankwise")) -> int:
    """Run ``python <program> <argv>`` on ``nproc`` local processes (``threads`` torch threads each, via
    ``OMP_NUM_THREADS``, and OpenMP's passive wait policy unless ``OMP_WAIT_POLICY`` is set: see
    :mod:`rankwise.experiment.threads`); 0 when every worker succeeded, else 1 (the launcher names the failed
    ranks)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    settings = {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)  # the workers inherit the environment
    try:
        elastic_launch(config, sys.executable)(*program, *argv)
    except ChildFailedError as error:
        print(f"rankwise: {error}", file=sys.stderr)
        return 1
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    return 0


def launch_workers(args: Any, threads: int) -> int | None:
    """The workers' exit status when ``args.nproc`` > 1 asks for a launch from this process, else None
    (one process, or already inside a worker): then this process runs the command itself."""
    return relaunch(args.argv, args.nproc, threads) if wants_relaunch(args.nproc) else None


def rank_zero_print(line: str) -> None:
    """``print`` on rank 0 (or the only process), nothing on the other ranks."""
    if is_main_process():
        print(line)


def wants_relaunch(nproc: int) -> bool:
    """``--nproc`` > 1 and not yet in a launched worker; ``ValueError`` for a non-positive count."""
    if nproc <= 0:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    return nproc > 1 and not launched()
