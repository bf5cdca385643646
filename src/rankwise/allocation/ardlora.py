"""ARD-LoRA's allocator: the ℓ1 + total-variation meta-objective, rank read-out and final shrinking.

Paper: "ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of Foundation Models
with Heterogeneous Adaptation Needs", H. U. K. Shinwari and M. Usama, arXiv:2506.18267 (2025).
No official code exists and the paper's definition of R(α) was unreachable (spec
``methods/ardlora.md``, section 9): the objective's shape L_task + R(α) with an ℓ1 sparsity term
and a total-variation term is the paper's, every detail below marked (rankwise) is our design.

Meta-objective (paper: L_meta = L_task + λ·R(α); the weights and the TV axis are rankwise's)::

    R(α) = λ Σ_{l,h} α_{l,h}  +  β Σ_{(l, l') ∈ N} Σ_h |α_{l',h} − α_{l,h}|

α ≥ 0, so Σ α is its ℓ1 norm. N (rankwise) pairs consecutive layers of the same module type along
the depth: layers whose names agree once every numeric path part is replaced by ``*`` (all
``encoder.layer.*.attention.self.query``), ordered by those numbers, and only when they have the
same number of units. ``regularizer()`` returns R(α); rankwise's training loop and
``RankwiseCallback`` add it to the loss, as for AdaLoRA.

Optimisation (rankwise): α is trained jointly with A and B by the same optimizer (not bilevel). A
separate learning rate for α (``scale_lr``, and no weight decay on α) comes from
:meth:`ARDLoRAAllocator.param_groups`, for an optimizer you build yourself; rankwise's loop and
``transformers.Trainer`` build one optimizer over all trainable parameters, α included, at the run's lr.
Under DDP α is a parameter like A and B, so its gradient is all-reduced and every process reads
the same ranks from the same α.
``step(t)``, after ``optimizer.step()``, projects every α onto [0, c / r₀] (c = ``r_max``; beyond
that the rank is at its cap) and counts the rank read-out; the ranks r = clamp(⌊r₀ α⌉, 1, c) are
read from α at any time (``ranks()``, ``rankwise.ranks(model)``: the sum over a layer's units).

Shrinking (rankwise): ``finalize()`` fixes every unit at its current rank and cuts the layers down
to c' = max_u r_u components per unit (see ``ARDLoRAAdapter.shrink``); it writes the ranks to the
config's ``rank_pattern``. The function does not change: the dropped components are exactly those
with gate 0 in the forward, so the output moves by 0 up to float summation order (tested at 1e-6).
rankwise's loop calls it after the last step and ``RankwiseCallback`` at the end of training,
before the final adapter is saved; in a plain loop call it yourself. After it, ``regularizer()``
is None and ``step`` only counts (the ranks are fixed).
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.inject import adapted_layers
from ..core.rank import Allocator

if TYPE_CHECKING:
    from ..adapters.ardlora import ARDLoRAAdapter, ARDLoRAConfig

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def depth_neighbours(names: list[str]) -> list[tuple[str, str]]:
    """The TV pairs N: consecutive layers (by their numeric path parts) of one module type."""
    groups: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    for name in names:
        groups.setdefault(_NUMBER.sub("*", name), []).append((tuple(int(n) for n in _NUMBER.findall(name)), name))
    pairs = []
    for members in groups.values():
        ordered = [name for _, name in sorted(members)]
        pairs.extend(itertools.pairwise(ordered))
    return pairs


class ARDLoRAAllocator(Allocator):
    """Per-unit scaling factors α of every ARD-LoRA layer of one model (module docstring).

    Args:
        model: a model adapted with ``ARDLoRAConfig``.
        config: its config (λ = ``l1_weight``, β = ``tv_weight``, ``scale_lr``, ``rank_pattern``).
    """

    def __init__(self, model: nn.Module, config: ARDLoRAConfig) -> None:
        from ..adapters.ardlora import ARDLoRAAdapter  # the adapter module registers itself with this allocator

        layers = {name: layer.adapter for name, layer in adapted_layers(model)}
        if not all(isinstance(adapter, ARDLoRAAdapter) for adapter in layers.values()):
            raise ValueError(f"ARDLoRAAllocator needs a model adapted with ARDLoRAConfig, got method {config.method!r}")
        self.layers: dict[str, ARDLoRAAdapter] = layers  # type: ignore[assignment]
        self.config = config
        self.pairs = [(a, b) for a, b in depth_neighbours(list(layers)) if layers[a].heads == layers[b].heads]
        self.last_step: int | None = None

    def _scales(self) -> dict[str, Tensor]:
        return {name: adapter.ard_scale for name, adapter in self.layers.items() if not adapter.fixed}

    # -- the meta-objective ----------------------------------------------------------------------

    def regularizer(self) -> Tensor | None:
        """R(α) = λ Σ α + β Σ_N |Δα| (module docstring); None once the ranks are fixed."""
        scales = self._scales()
        if not scales:
            return None
        l1 = torch.stack([s.sum() for s in scales.values()]).sum()
        tv = [(scales[b] - scales[a]).abs().sum() for a, b in self.pairs if a in scales and b in scales]
        total = self.config.l1_weight * l1
        return total + self.config.tv_weight * torch.stack(tv).sum() if tv else total

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups: A and B at ``lr`` with ``weight_decay``; α at ``scale_lr`` (default ``lr``), no decay."""
        scales = list(self._scales().values())
        known = {id(s) for s in scales}
        others = [p for adapter in self.layers.values() for p in adapter.parameters()
                  if p.requires_grad and id(p) not in known]
        scale_lr = lr if self.config.scale_lr is None else self.config.scale_lr
        return [{"params": others, "lr": lr, "weight_decay": weight_decay},
                {"params": scales, "lr": scale_lr, "weight_decay": 0.0}]

    # -- the schedule ----------------------------------------------------------------------------

    @property
    def allocations(self) -> int:  # type: ignore[override]
        """Rank read-outs so far: every step reads the ranks from α."""
        return 0 if self.last_step is None else self.last_step + 1

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Project α onto [0, c/r₀] after ``optimizer.step()``; ``ValueError`` if no gradient reached α."""
        scales = self._scales()
        missing = sorted(name for name, s in scales.items() if s.grad is None)
        if missing:
            raise ValueError(
                f"ARD-LoRA allocator.step({global_step}): no gradient on the scaling factors of {missing[:6]}"
                f"{f' ({len(missing)} in all)' if len(missing) > 6 else ''}. Call it after loss.backward() and "
                "optimizer.step() and before optimizer.zero_grad(), with every adapted layer in the forward pass"
            )
        for name, scale in scales.items():
            scale.clamp_(0.0, self.layers[name].capacity / self.layers[name].base_rank)
        self.last_step = global_step

    def unit_ranks(self) -> dict[str, list[int]]:
        """``{layer: [r_u for each unit]}``."""
        return {name: adapter.unit_ranks().tolist() for name, adapter in self.layers.items()}

    def ranks(self) -> dict[str, int]:
        """``{layer: Σ_u r_u}``, the rank of the layer's update."""
        return {name: sum(ranks) for name, ranks in self.unit_ranks().items()}

    def finalize(self) -> dict[str, list[int]]:
        """Shrink every layer to its current ranks (module docstring) and record them in ``rank_pattern``."""
        pattern = dict(self.config.rank_pattern or {})
        for name, adapter in self.layers.items():
            if not adapter.fixed:
                pattern[name] = adapter.shrink()
        self.config.rank_pattern = pattern
        return self.unit_ranks()

    # -- resume ----------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """α lives in the adapters (saved with them); the allocator keeps only the step it reached."""
        return {}, {"last_step": self.last_step}

    def load_state_dict(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        if tensors or set(values) - {"last_step"}:
            raise ValueError(f"the ARD-LoRA allocator state holds {sorted(tensors) + sorted(values)}, expected only "
                             "'last_step'; it was saved by another method's allocator")
        step = values.get("last_step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"the ARD-LoRA allocator state has last_step={step!r}, expected an integer >= 0")
        self.last_step = step

