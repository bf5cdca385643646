"""Bridges to other libraries: PEFT adapter files, transformers Trainer callbacks."""

from typing import Any

__all__ = ["RankwiseCallback", "load_checkpoint_adapter"]


def __getattr__(name: str) -> Any:
    """``RankwiseCallback`` and ``load_checkpoint_adapter`` import transformers, which ``import rankwise``
    does not need: load them on first use."""
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
