"""Bridges to other libraries: PEFT adapter files, transformers Trainer (callback, trainer, guard)."""

from typing import Any

__all__ = ["DivergenceGuard", "RankwiseCallback", "RankwiseTrainer", "TrainingDiverged", "load_checkpoint_adapter"]


class TrainingDiverged(RuntimeError):
    """A NaN or Inf training loss or gradient: the optimizer step that would have applied it did not run.

    Raised by :class:`~rankwise.integrations.trainer.DivergenceGuard`; defined here so that catching it
    does not import transformers."""


def __getattr__(name: str) -> Any:
    """The Trainer pieces import transformers, which ``import rankwise`` does not need: load them on first use."""
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
