"""Rank allocators: they move rank between the adapted layers of a model while it trains.

Each works through :class:`rankwise.core.rank.RankComponents`, so it runs on every adapter that
exposes rank components. ``rankwise.allocator(model)`` gives the allocator of an allocating method.
"""

from .adalora import AdaLoRAAllocator
from .ardlora import ARDLoRAAllocator
from .elalora import ElaLoRAAllocator
from .gora import GoRAAllocator

__all__ = ["ARDLoRAAllocator", "AdaLoRAAllocator", "ElaLoRAAllocator", "GoRAAllocator"]
