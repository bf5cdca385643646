"""Rank components: the interface through which allocators and optimisers work on adapters.

An adapter whose update is a sum of rank-one components, ΔW = Σ_i (component i), implements
:class:`RankComponents`. It names the tensors that hold the components and the dimension that
indexes them (LoRA: ``lora_A`` ∈ R^{r×n} along dim 0, ``lora_B`` ∈ R^{m×r} along dim 1; AdaLoRA
adds ``lora_E`` ∈ R^{r×1} along dim 0), its two factors (for optimisers such as LoRA-Pro), and how
a new component is initialised. From that the mixin provides, for every such method alike:

    * ``mask_components(drop)``: zero the dropped components in place (they may be revived by the
      optimiser, as AdaLoRA's masking allows);
    * ``keep_components(keep)``: shrink the tensors to the kept components;
    * ``grow_components(count)``: append ``count`` fresh components that add nothing to ΔW.

Both resizes take an optional ``optimizer=``: the tensors are then resized in place (same Parameter
objects) and their gradients and optimizer state follow them (kept components keep their moments, new
ones start at zero), so one optimizer and one learning-rate schedule live through every resize.

An :class:`Allocator` moves rank between the layers of one model; ``rankwise.allocator(model)``
gives the adapted model's allocator (built from the config by the method's registered factory, and
kept with the model), or None for fixed-rank methods. ``rankwise.ranks(model)`` gives every layer's
current rank. Core imports no method: the allocator factories come through the registry.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .inject import adapted_layers, adapter_config, adapter_configs
from .registry import get_method, registered

ALLOCATOR_FILE = "allocator.safetensors"
_ALLOCATOR_ATTR = "_rankwise_allocator"


class RankComponents:
    """Mixin for :class:`~rankwise.core.layer.Adapter` subclasses whose update is a sum of components.

    Subclasses implement :meth:`rank_tensors`, :meth:`factors` and :meth:`new_components`, set
    ``masked_tensor`` (the tensor whose slices :meth:`mask_components` zeroes) and keep their rank in
    ``self.r``; every tensor named by :meth:`rank_tensors` has ``self.r`` slices along its rank dim.
    The scale of the update is fixed when the adapter is built and does not follow later changes of
    ``r`` (AdaLoRA's ``ranknum``).
    """

    r: int
    masked_tensor: str = ""

    def rank_tensors(self) -> dict[str, tuple[nn.Parameter, int]]:  # pragma: no cover - abstract
        """``{name: (parameter, rank dim)}`` for every trainable tensor indexed by component, in a fixed order."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(A, B)``: the right factor A ∈ R^{r×n} and the left factor B ∈ R^{m×r} of the update."""
        raise NotImplementedError

    def new_components(self, count: int) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Initial values of ``count`` new components, ``{name: tensor}`` shaped like :meth:`rank_tensors`
        with ``count`` slices along the rank dim; together they must add nothing to ΔW."""
        raise NotImplementedError

    @torch.no_grad()
    def mask_components(self, drop: Tensor) -> None:
        """Zero, in place, the slices of ``masked_tensor`` of the components where ``drop`` (bool, (r,)) holds."""
        parameter, dim = self.rank_tensors()[self.masked_tensor]
        self._check_selector(drop, "mask_components")
        shape = [1] * parameter.dim()
        shape[dim] = self.r
        parameter.masked_fill_(drop.to(parameter.device).view(shape), 0.0)

    @torch.no_grad()
    def keep_components(self, keep: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Shrink every rank tensor to the components where ``keep`` (bool, (r,)) holds.

        Without ``optimizer`` the tensors are replaced by new parameters: build the optimiser after
        resizing. With ``optimizer`` they are resized in place (see :meth:`_resize`): the kept
        components keep their gradient and their optimizer state (AdamW's moments).
        """
        self._check_selector(keep, "keep_components")
        self._check_held(optimizer, "keep_components")
        index = keep.nonzero().view(-1)

        def select(tensor: Tensor, dim: int) -> Tensor:
            return tensor.index_select(dim, index.to(tensor.device))

        values = {name: select(p, dim) for name, (p, dim) in self.rank_tensors().items()}
        self._resize(values, int(index.numel()), optimizer, select)

    @torch.no_grad()
    def grow_components(self, count: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Append ``count`` components initialised by :meth:`new_components` (ΔW unchanged).

        Without ``optimizer`` the tensors are replaced by new parameters: build the optimiser after
        resizing. With ``optimizer`` they are resized in place (see :meth:`_resize`): the new
        components start with a zero gradient and zero optimizer state.
        """
        if count < 0:
            raise ValueError(f"grow_components: count must be >= 0, got {count}")
        self._check_held(optimizer, "grow_components")
        fresh = self.new_components(count)
        values = {name: torch.cat([p, fresh[name].to(p)], dim=dim) for name, (p, dim) in self.rank_tensors().items()}
        self._resize(values, self.r + count, optimizer, lambda tensor, dim: zero_padded(tensor, dim, count))

    def _resize(self, values: dict[str, Tensor], rank: int, optimizer: torch.optim.Optimizer | None,
                follow: Callable[[Tensor, int], Tensor]) -> None:
        """Give the rank tensors their new ``values``; with ``optimizer``, in place and with their companions.

        In place means the same :class:`~torch.nn.Parameter` objects (``parameter.data = value``), so the
        optimizer's ``param_groups`` and a learning-rate schedule bound to it stay valid. Every tensor of
        the parameter's optimizer state shaped like the parameter (AdamW's ``exp_avg`` / ``exp_avg_sq``,
        ``max_exp_avg_sq``, SGD's ``momentum_buffer``) and its gradient go through ``follow(tensor, rank
        dim)``; other state entries (AdamW's ``step``) are left as they are.
        """
        if optimizer is None:
            self._replace(values, rank)
            return
        for name, (parameter, dim) in self.rank_tensors().items():
            state = optimizer.state.get(parameter, {})
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and value.shape == parameter.shape:
                    state[key] = follow(value, dim)
            grad = None if parameter.grad is None else follow(parameter.grad, dim)
            # torch keeps a leaf's gradient accumulator (with the old shape) while any graph built on it is
            # alive, e.g. the previous step's loss, and drops it only when .data changes dtype or device: pass
            # through another dtype so that the next backward pass accumulates at the new shape.
            other = torch.float32 if parameter.dtype == torch.float64 else torch.float64
            parameter.data = parameter.data.new_empty(0, dtype=other)
            parameter.data = values[name].contiguous()
            parameter.grad = grad  # after .data: a gradient must have the parameter's shape
        self.r = rank

    def _check_held(self, optimizer: torch.optim.Optimizer | None, what: str) -> None:
        """``ValueError`` (before anything changes) if ``optimizer`` does not hold every rank tensor."""
        if optimizer is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, (p, _) in self.rank_tensors().items() if id(p) not in held]
        if missing:
            raise ValueError(
                f"{what}: the optimizer does not hold {missing} of layer '{getattr(self, 'layer_name', '')}', so "
                "their state cannot follow the resize; pass the optimizer that trains this adapter (built after "
                "rankwise.adapt)"
            )

    def _replace(self, values: dict[str, Tensor], rank: int) -> None:
        module: Any = self
        for name, value in values.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            old = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
        self.r = rank

    def _check_selector(self, selector: Tensor, what: str) -> None:
        if selector.dtype != torch.bool or tuple(selector.shape) != (self.r,):
            raise ValueError(
                f"{what}: expected a bool tensor of shape ({self.r},) for layer "
                f"'{getattr(self, 'layer_name', '')}', got {selector.dtype} {tuple(selector.shape)}"
            )


def zero_padded(tensor: Tensor, dim: int, count: int) -> Tensor:
    """``tensor`` with ``count`` zero slices appended along ``dim``."""
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def supported_methods() -> list[str]:
    """Registered methods whose adapters expose rank components."""
    return sorted(m.name for m in registered() if issubclass(m.adapter_cls, RankComponents))


def rank_layers(model: nn.Module, user: str) -> dict[str, RankComponents]:
    """``{layer name: adapter}`` for every adapted layer; ``ValueError`` unless all expose rank components."""
    method = adapter_config(model).method
    layers = {name: layer.adapter for name, layer in adapted_layers(model)}
    if not all(isinstance(adapter, RankComponents) for adapter in layers.values()):
        raise ValueError(
            f"{user} needs adapters made of rank components, but method {method!r} has none; "
            f"the supported methods are {supported_methods()}"
        )
    return layers  # type: ignore[return-value]


class Allocator(ABC):
    """Moves rank between the adapted layers of one model during training.

    Call :meth:`step` once per optimiser step, after ``optimizer.step()`` and before
    ``optimizer.zero_grad()`` (PEFT's order), with the index of that step.
    """

    #: number of times the allocator has set a rank budget (masked or resized components)
    allocations: int = 0

    @abstractmethod
    def step(self, global_step: int) -> None:
        """Update the importance statistics and reallocate the rank as the schedule says."""

    @abstractmethod
    def ranks(self) -> dict[str, int]:
        """``{layer name: current rank}``."""

    def regularizer(self) -> Tensor | None:
        """A term to add to the training loss, or None when the method has none."""
        return None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027 - optional hook, no-op by default
        """Tell the allocator which optimizer trains the adapter (an allocator that resizes tensors keeps that
        optimizer's state in step with them). ``RankwiseCallback`` and rankwise's own loop call it; the base
        allocator does not need it."""

    def batches_before_training(self) -> int:
        """How many training batches :meth:`before_training` needs (GoRA: its gradient batches); 0 for none."""
        return 0

    def before_training(self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:  # noqa: B027
        """Called once by rankwise's loop before the optimizer is built, with the first
        :meth:`batches_before_training` training batches and ``loss_fn(model, batch)``: a method that allocates
        from data before training does it here (GoRA). Default: nothing."""

    def finalize(self) -> object:
        """Called once at the end of training (rankwise's loop, ``RankwiseCallback``) before the adapter is
        saved: a method that shrinks its adapters to their final ranks does it here (ARD-LoRA). Default: nothing."""
        return None

    @abstractmethod
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, json-able scalars)``: everything needed to resume exactly."""

    @abstractmethod
    def load_state_dict(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` if it does not fit this model."""


def allocator(model: nn.Module) -> Allocator | None:
    """The adapted model's allocator (built on first use and kept with the model), None for fixed-rank methods."""
    config = adapter_config(model)
    factory = get_method(config.method).allocator
    if factory is None:
        return None
    if len(adapter_configs(model)) > 1:
        raise ValueError(
            f"rank allocation ({config.method}) works on a model with one adapter, but {type(model).__name__} has "
            f"{list(adapter_configs(model))}; rankwise.delete_adapter the others, or train this adapter on its own "
            "copy of the base model and add it afterwards"
        )
    held = model.__dict__.get(_ALLOCATOR_ATTR)
    if held is None or held[0] is not config:  # none yet, or left from an adapter since unloaded
        held = (config, factory(model, config))
        model.__dict__[_ALLOCATOR_ATTR] = held
    return held[1]


def ranks(model: nn.Module) -> dict[str, int]:
    """``{layer name: current rank}``: the allocator's ranks, or each adapter's rank for fixed-rank methods."""
    held = allocator(model)
    if held is not None:
        return held.ranks()
    return {name: adapter.r for name, adapter in rank_layers(model, "rankwise.ranks").items()}


def save_allocator(model: nn.Module, directory: Path) -> None:
    """Write the allocator's state beside the adapter (nothing for fixed-rank methods or an unused allocator)."""
    from .io import save_tensors  # io saves the allocator through this module

    held = model.__dict__.get(_ALLOCATOR_ATTR)
    if held is None or held[0] is not adapter_config(model):
        (directory / ALLOCATOR_FILE).unlink(missing_ok=True)  # a state left by an earlier save is not this one's
        return
    tensors, values = held[1].state_dict()
    save_tensors(directory / ALLOCATOR_FILE, tensors, metadata={"state": json.dumps(values, sort_keys=True)})


def load_allocator(model: nn.Module, directory: Path) -> None:
    """Restore the allocator state saved by :func:`save_allocator`, if ``directory`` holds one."""
    path = directory / ALLOCATOR_FILE
    if not path.is_file():
        return
    from safetensors import safe_open

    from .io import read_tensors  # io loads the allocator through this module

    held = allocator(model)
    if held is None:
        raise ValueError(f"{path} holds an allocator state, but method {adapter_config(model).method!r} has no "
                         "allocator; the adapter directory is inconsistent")
    tensors = read_tensors(path, "rankwise.load")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    held.load_state_dict(tensors, json.loads(metadata.get("state", "{}")))
