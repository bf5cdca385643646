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

An allocator that resizes the adapter's tensors (ElaLoRA) leaves a ``DistributedDataParallel`` wrapper
stale: DDP lays the gradients out in buckets sized for the shapes it was built with, and hooks the
gradient accumulators of that moment. After a resize the resized tensors' gradients are no longer
all-reduced, with no error from torch, and the processes' weights drift apart. :func:`rewrap_ddp`
builds a new wrapper around the same module, with the same settings, when the module's parameters no
longer are the ones the wrapper was built for; call it after every allocator step::

    ddp = DistributedDataParallel(model)
    for step, batch in enumerate(batches):
        loss = ddp(**batch).loss + allocator.regularizer()
        loss.backward(); optimizer.step(); allocator.step(step); optimizer.zero_grad()
        ddp = rankwise.allocation.rewrap_ddp(ddp)     # a new wrapper after a resize, else ddp itself

ElaLoRA's allocator notices a DDP run at its rounds (the gradients are identical on every process,
:func:`in_sync`) and raises ``ValueError`` at its next step if the wrapper was not rebuilt.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..core.rank import resize_count

_WRAPPED = "_rankwise_wrapped_resizes"  # attribute of a parameter: its resize count when rewrap_ddp last wrapped it


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


def in_sync(tensors: list[Tensor], group: Any = None) -> bool:
    """Whether ``tensors`` hold bit-identical values on every process of ``group`` (True with one process).

    One ``all_reduce`` (MAX of x and of −x): the values agree iff their maximum equals their minimum.
    A collective, like :func:`all_reduce_mean`.
    """
    if world_size(group) == 1 or not tensors:
        return True
    flat = torch.cat([t.detach().reshape(-1).to(device=tensors[0].device, dtype=torch.float64) for t in tensors])
    extremes = torch.cat([flat, -flat])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = extremes.split(flat.numel())
    return bool(torch.equal(highest, -lowest))


def stale_parameters(wrapper: DistributedDataParallel) -> list[str]:
    """Names of the wrapped module's parameters that ``wrapper`` was not built for: replaced by other
    Parameter objects, or resized in place since the wrapper was built (by :func:`rewrap_ddp`, or before any
    resize)."""
    built_for = {id(p) for p in wrapper._module_parameters}
    ignored = wrapper.parameters_to_ignore
    return [name for name, p in wrapper.module.named_parameters() if name not in ignored
            and (id(p) not in built_for or resized_since_wrapped(p))]


def resized_since_wrapped(parameter: Tensor) -> bool:
    """Whether ``parameter`` was resized in place since a wrapper was built for it (by :func:`rewrap_ddp`, or
    by the user before any resize)."""
    return resize_count(parameter) != parameter.__dict__.get(_WRAPPED, 0)


def rewrap_ddp(wrapper: DistributedDataParallel, **overrides: Any) -> DistributedDataParallel:
    """A new ``DistributedDataParallel`` around ``wrapper.module`` if ``wrapper`` is stale, else ``wrapper``.

    Stale: a parameter of the module was resized (ElaLoRA's rounds, ``keep_components`` /
    ``grow_components``) or replaced since the wrapper was built (module docstring). The new wrapper
    takes the old one's settings: ``device_ids``, ``output_device``, ``dim``, buffer syncing,
    ``process_group``, bucket size, ``find_unused_parameters``, ``gradient_as_bucket_view``,
    ``mixed_precision``, ``static_graph`` and its registered communication hooks; ``overrides`` are
    passed to ``DistributedDataParallel`` on top of them. The old wrapper's autograd hooks are removed,
    so it no longer reduces anything: use the returned one. A collective, like building a wrapper: every
    process calls it at the same point (the allocator's decisions are the same on all of them, so
    either all or none rebuild). The module's parameters are broadcast from rank 0, as at any build;
    they are already equal.
    """
    if not isinstance(wrapper, DistributedDataParallel):
        raise ValueError(f"rewrap_ddp needs a torch.nn.parallel.DistributedDataParallel, got {type(wrapper).__name__}")
    if wrapper._delay_all_reduce_params:
        raise ValueError("rewrap_ddp: the wrapper was built with delay_all_reduce_named_params, which rewrap_ddp does "
                         "not carry over; rebuild it with DistributedDataParallel(wrapper.module, ...) yourself")
    if not stale_parameters(wrapper):
        return wrapper
    sync = ({"forward_sync_buffers": wrapper.forward_sync_buffers} if hasattr(wrapper, "forward_sync_buffers")
            else {"broadcast_buffers": wrapper.broadcast_buffers})
    settings = {
        "device_ids": wrapper.device_ids, "output_device": wrapper.output_device, "dim": wrapper.dim,
        "process_group": wrapper.process_group, "bucket_cap_mb": wrapper.bucket_bytes_cap / 1024**2,
        "find_unused_parameters": wrapper.find_unused_parameters,
        "gradient_as_bucket_view": wrapper.gradient_as_bucket_view, "static_graph": wrapper.static_graph,
        "mixed_precision": wrapper.mixed_precision, **sync, **overrides,
    }
    # The old reducer's hooks stay on the gradient accumulators of the tensors that were not resized for as long
    # as the old wrapper lives (a caller may still hold it): unhook it, so that it launches no more reductions.
    wrapper.reducer._remove_autograd_hooks()
    rebuilt = DistributedDataParallel(wrapper.module, **settings)
    for hook, state in wrapper._comm_hooks:
        rebuilt.register_comm_hook(state, hook)
    for p in rebuilt._module_parameters:
        p.__dict__[_WRAPPED] = resize_count(p)
    return rebuilt


__all__ = ["all_reduce_mean", "in_sync", "resized_since_wrapped", "rewrap_ddp", "stale_parameters", "world_size"]
