"""``--nproc N``: run the same command line on N processes of this machine through torchrun.

The command re-launches itself as ``python -m torch.distributed.run --standalone --nproc-per-node N
-m rankwise <the same arguments>``; in each worker torchrun sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``, which transformers.Trainer reads to train with DDP (gloo on CPU, NCCL on GPUs), and
the worker does not launch again. On several machines, run torchrun yourself on each one, e.g.::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m rankwise finetune --batch-size 256 ...
"""

from __future__ import annotations

import os
import subprocess
import sys


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(argv: list[str], nproc: int, threads: int) -> int:
    """Run ``rankwise <argv>`` on ``nproc`` processes (``threads`` torch threads each); their exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "rankwise", *argv]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.call(command, env=environment)


def wants_relaunch(nproc: int) -> bool:
    """``--nproc`` > 1 and not yet in a launched worker; ``ValueError`` for a non-positive count."""
    if nproc <= 0:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    return nproc > 1 and not launched()
