"""Rank allocators: they move rank between the adapted layers of a model while it trains.

Each works through :class:`rankwise.core.rank.RankComponents`, so it runs on every adapter that
exposes rank components. ``rankwise.allocator(model)`` gives the allocator of an allocating method.
Under ``DistributedDataParallel``, :func:`rewrap_ddp` rebuilds the wrapper after an allocator resized
the adapter (ElaLoRA).
"""

from .adalora import AdaLoRAAllocator
from .ardlora import ARDLoRAAllocator
from .distributed import rewrap_ddp
from .elalora import ElaLoRAAllocator
from .gora import GoRAAllocator

__all__ = ["ARDLoRAAllocator", "AdaLoRAAllocator", "ElaLoRAAllocator", "GoRAAllocator", "rewrap_ddp"]
