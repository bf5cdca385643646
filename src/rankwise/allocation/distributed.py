"""Rank decisions that agree across the processes of a distributed run.

Under ``torch.nn.parallel.DistributedDataParallel`` every process holds the same weights and, after
``backward``, the same averaged gradients, so an allocator that scores from them computes the same
scores everywhere, up to rounding. A rank decision is a threshold on those scores (AdaLoRA: the k-th
smallest), and one bit of difference between two processes at the threshold would give them
different masks, after which their models differ for good. Scores that do not come from synchronised
gradients (gradients accumulated outside DDP, each process on its own data) differ outright.

So an allocator averages its scores over the processes right before it decides, with
:func:`all_reduce_mean`: every process then thresholds the same numbers, their mean (an all-reduce
hands all processes one result). Outside a distributed run (``torch.distributed`` not available, not
initialised, or one process) it returns its inputs unchanged, so a single-process run is untouched.
It is a collective: every process must call it at the same point with tensors of the same shapes,
which holds for allocators because their schedules depend only on the step and on the (shared) ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group: Any = None) -> int:
    """The number of processes of ``group`` (the default group when None), 1 outside a distributed run."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_mean(tensors: list[Tensor], group: Any = None) -> list[Tensor]:
    """The element-wise mean of ``tensors`` over the processes of ``group``, as new tensors.

    One ``all_reduce`` call carries all of them (flattened into one buffer of their common dtype,
    on the first tensor's device); each result has its input's shape and dtype. The inputs are not
    modified. With one process, or none initialised, the inputs themselves are returned.
    """
    size = world_size(group)
    if size == 1 or not tensors:
        return tensors
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = tensors[0].device
    buffer = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    buffer /= size
    pieces = buffer.split([t.numel() for t in tensors])
    return [piece.view(t.shape).to(device=t.device, dtype=t.dtype) for piece, t in zip(pieces, tensors)]


__all__ = ["all_reduce_mean", "world_size"]
