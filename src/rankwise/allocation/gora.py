"""GoRA: ranks and initial update of a LoRA from gradients accumulated once, before training.

Paper: "GoRA: Gradient-driven Adaptive Low Rank Adaptation", He, Ye, Ren, Yuan, Zhou, Ju, Chen,
NeurIPS 2025, arXiv:2502.12171. Official code: hhnqqq/MyTransformers, ``common/lora_modules/gora.py``.

One call before training, :func:`initialize` ``(model, batches, loss_fn)``, on a model adapted with
``GoRAConfig`` (rankwise.adapters.gora). For every target layer l, W_l ∈ R^{m×n} (y = x Wᵀ):

1. Gradient, with the adapters switched off (``rankwise.disable_adapters``) and the base weights
   temporarily requiring grad (every ``requires_grad`` flag is restored exactly afterwards, and no
   ``.grad`` is written: the gradients come from ``torch.autograd.grad``)::

       Ḡ_l = (1/N) Σ_t ∂L_t/∂W_l      over the N batches given, L_t = loss_fn(model, batch_t)

2. Importance (the paper's; the official scripts' ``union_mean``) and its share::

       I_l = mean_ij |W_l ⊙ Ḡ_l|,   a_l = I_l / Σ_k I_k

3. Ranks. f_l = √(m_l + n_l) (``budget_features="sqrt"``, the paper's) or m_l + n_l (``"linear"``, the
   official code's only scripted form), budget b = r₀ Σ_l f_l, and::

       "sqrt":   r_l = clamp(round(b·a_l / f_l), r_min, r_max_l)
       "linear": r_l = clamp(⌊round(b·a_l) / f_l⌋, r_min, r_max_l)        (the code's floor division)
       r_max_l = min(r_max, m_l, n_l)

   ``round`` is Python's (half to even). Rounding rules, so what the budget guarantees when no clamp
   acts: |Σ_l f_l r_l − b| ≤ Σ_l f_l / 2 for "sqrt", and b − Σ_l f_l − L/2 < Σ_l f_l r_l ≤ b + L/2 for
   "linear" (L layers). With "linear", Σ_l f_l r_l is the trainable-parameter count Σ r_l (m_l + n_l)
   and b that of rank-r₀ LoRA, so the split is LoRA-equal up to that rounding. The clamps can move the
   total further either way; nothing redistributes (neither does the paper or the code). b above
   Σ_l f_l r_max_l is a ``ValueError``.

4. Initialisation. A_l ∈ R^{r_l×n} is drawn as LoRA's (kaiming-uniform a = √5, the global RNG, layers in
   model order), and B_l is the least-squares solution that makes the update a step of size γ down
   the gradient. With rsLoRA scaling the factor γ√(n/r_l)/s_l is the paper's ξ = γ√m/α (the paper's m
   is the input dimension, our n), and the official code's scale-by-lr with rank-stabilised scaling
   gives the same::

       B_l = −(γ √(n/r_l) / s_l) · Ḡ_l A_lᵀ (A_l A_lᵀ)⁻¹,   s_l = α/√r_l (rsLoRA; α/r_l without)
       ΔW_l = s_l B_l A_l = −γ √(n/r_l) · Ḡ_l P_A,   P_A = A_l⁺ A_l

   For a random A, ‖Ḡ P_A‖_F ≈ √(r_l/n) ‖Ḡ‖_F, so ‖ΔW_l‖ ≈ γ‖Ḡ_l‖: one SGD step of size γ projected
   onto A's row space. The first-order change of the mean loss is ⟨Ḡ, ΔW⟩ = −γ√(n/r)‖Ḡ P_A‖² ≤ 0, so
   for small γ the initialised model has a lower loss on the gradient batches. The base weights are
   never modified (the paper's "non-manipulative" init; W₀ + ΔW₀ is the model at step 0).

Where the code differs, and what rankwise does:
    * Sign: the official code dropped the minus of B₀ in Aug 2025 (commit 321fe07), which makes ΔW₀ an
      ascent step. The paper has the minus; rankwise follows the paper (tests check the loss drops).
    * The code solves with (A Aᵀ + 1e-8 I)⁻¹; rankwise solves A Aᵀ exactly in float64 (r_l ≤ n always
      holds here, so A Aᵀ is invertible for a random A).
    * The paper writes √(m+n) in the split, the code's scripts use m+n: both are offered, the paper's
      is the default.
    * The code's extras are not implemented: other importance metrics, softmax / √ of the importance,
      the adaptive stop of phase 0, the line search over γ, the PiSSA-like ``weight_svd`` inits (they
      change W₀), the ADMM variant. r_min ≥ 1 (the code skips a layer whose rank rounds to 0).
    * Gradients are accumulated on the model's device in float32 (float64 for a float64 base), all
      layers at once (the code moves them to the CPU layer by layer); the model runs in the mode it is
      in (train mode: dropout on, as in the paper's training-loop accumulation).
    * The official scripts also train B with LoRA+ (B's learning rate × 16); that is an optimiser choice
      left to the user here, not part of GoRA's adapter.
    * Under torch.distributed the gradient sums and batch counts are all-reduced, so Ḡ is the mean over
      every process's batches and all processes take the same ranks; A is drawn from each process's
      global RNG, so seed them alike (as DDP needs for any init).

After :func:`initialize` the model is a plain LoRA with ``rank_pattern`` (exact layer names, anchored:
``^<escaped name>$``) and rsLoRA scaling: train it like any adapter. Its allocator
(``rankwise.allocator(model)``) does nothing per step except refuse to run on a GoRA model that was never
initialised, so a training loop or ``RankwiseCallback`` cannot silently train the placeholder LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.inject import adapted_layers, adapter_config, adapter_dtype, disable_adapters, replace_adapter_config
from ..core.layer import AdaptedLayer, is_fan_in_fan_out, linear_shape
from ..core.quantised import is_sharded
from ..core.rank import Allocator
from ..core.registry import get_method
from .distributed import world_size

BUDGET_FEATURES = ("sqrt", "linear")
INIT_HELP = "call rankwise.allocation.gora.initialize(model, batches, loss_fn) before training (rankwise finetune does)"


@dataclass(frozen=True)
class Allocation:
    """What :func:`initialize` decided: ``ranks`` and ``importance`` per layer, the ``budget`` b and the
    ``used`` total Σ f_l r_l (same units as b)."""

    ranks: dict[str, int]
    importance: dict[str, float]
    budget: float
    used: float


def features(shape: tuple[int, int], budget_features: str) -> float:
    """f(m + n): √(m+n) (``"sqrt"``) or m + n (``"linear"``)."""
    total = shape[0] + shape[1]
    return math.sqrt(total) if budget_features == "sqrt" else float(total)


def rank_limits(shapes: dict[str, tuple[int, int]], r: int, r_min: int, r_max: int,
                budget_features: str) -> dict[str, int]:
    """r_max_l = min(r_max, m_l, n_l) per layer; ``ValueError`` when the budget or r_min cannot fit."""
    limits = {name: min(r_max, *shape) for name, shape in shapes.items()}
    small = {name: shape for name, shape in shapes.items() if min(shape) < r_min}
    if small:
        raise ValueError(f"GoRA: r_min={r_min} exceeds min(out, in) of layer(s) {small}; lower r_min or exclude them")
    budget = r * sum(features(shape, budget_features) for shape in shapes.values())
    room = sum(limits[name] * features(shape, budget_features) for name, shape in shapes.items())
    if budget > room:
        raise ValueError(
            f"GoRA: the budget of r={r} per layer ({budget:g}) is above what the layers allow at their largest "
            f"ranks min(r_max={r_max}, out, in) ({room:g}); lower r or raise r_max"
        )
    return limits


def allocate_ranks(importance: dict[str, float], shapes: dict[str, tuple[int, int]], r: int, r_min: int,
                   r_max: int, budget_features: str = "sqrt") -> dict[str, int]:
    """Split the budget b = r·Σ f_l by importance share (module docstring, step 3)."""
    limits = rank_limits(shapes, r, r_min, r_max, budget_features)
    total = sum(importance.values())
    if not total > 0:
        raise ValueError(f"GoRA: every layer's importance is zero ({sorted(importance)}): no gradient reached the "
                         "target weights; check that loss_fn depends on them")
    scale = {name: features(shape, budget_features) for name, shape in shapes.items()}
    budget = r * sum(scale.values())
    ranks = {}
    for name, value in importance.items():
        share = budget * (value / total)
        raw = round(share / scale[name]) if budget_features == "sqrt" else math.floor(round(share) / scale[name])
        ranks[name] = min(max(raw, r_min), limits[name])
    return ranks


def compressed_b(gradient: Tensor, A: Tensor, scaling: float, gamma: float) -> Tensor:
    """B₀ = −(γ√(n/r)/s)·Ḡ Aᵀ(A Aᵀ)⁻¹ in float64, so that s·B₀A = −γ√(n/r)·Ḡ·A⁺A (module docstring, step 4)."""
    rank, n = A.shape
    A64, G64 = A.to(torch.float64), gradient.to(torch.float64)
    solved = torch.linalg.solve(A64 @ A64.T, A64 @ G64.T)  # (A Aᵀ)⁻¹ A Ḡᵀ, r×m
    return -(gamma * math.sqrt(n / rank) / scaling) * solved.T


def accumulate_gradients(model: nn.Module, layers: dict[str, AdaptedLayer], batches: Iterable[Any],
                         loss_fn: Callable[[nn.Module, Any], Tensor]) -> dict[str, Tensor]:
    """Ḡ_l = (1/N) Σ_t ∂L_t/∂W_l as (m, n) matrices, adapters off; flags and ``.grad`` left as they were."""
    weights = {name: layer.base_layer.weight for name, layer in layers.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    sums = {name: torch.zeros(linear_shape(layer.base_layer), device=weights[name].device,
                              dtype=torch.promote_types(weights[name].dtype, torch.float32))
            for name, layer in layers.items()}
    seen = dict.fromkeys(layers, False)
    count = 0
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        with disable_adapters(model):
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(f"GoRA: loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                     f"{tuple(getattr(loss, 'shape', ()))}")
                if not loss.requires_grad:
                    raise ValueError("GoRA: the loss does not depend on any target weight (no gradients); check "
                                     "loss_fn and the targets")
                grads = torch.autograd.grad(loss.reshape(()), list(weights.values()), allow_unused=True)
                for (name, layer), grad in zip(layers.items(), grads):
                    if grad is not None:
                        seen[name] = True
                        sums[name] += (grad.T if is_fan_in_fan_out(layer.base_layer) else grad).to(sums[name].dtype)
                count += 1
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    count = _all_reduce_sums(sums, seen, count)
    if count == 0:
        raise ValueError(f"GoRA: no batches were given, so there are no gradients; {INIT_HELP} with N >= 1 batches")
    unused = sorted(name for name, hit in seen.items() if not hit)
    if unused:
        raise ValueError(f"GoRA: layer(s) {unused} received no gradient over the {count} batches (unused by the "
                         "forward?); exclude them from targets")
    return {name: total / count for name, total in sums.items()}


def _all_reduce_sums(sums: dict[str, Tensor], seen: dict[str, bool], count: int) -> int:
    """Under torch.distributed, sum the gradient sums, the batch counts and the seen flags over all processes
    (in place), so every process gets the same Ḡ and so the same ranks and B₀; returns the total count."""
    if world_size() == 1:
        return count
    device = next(iter(sums.values())).device
    totals = torch.tensor([float(count), *(float(hit) for hit in seen.values())], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    for name, hit in zip(seen, totals[1:].tolist()):
        seen[name] = hit > 0
    for total in sums.values():
        torch.distributed.all_reduce(total)
    return int(totals[0])


def initialize(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> Allocation:
    """Allocate the ranks and set B₀ of a GoRA-adapted model from N batches (module docstring); call before training.

    ``loss_fn(model, batch)`` returns the scalar training loss of one batch (e.g.
    ``lambda m, b: m(**b).loss``). The adapters are replaced by new ones at the allocated ranks (build the
    optimiser afterwards), the model's config gets ``rank_pattern``, and nothing changes if a
    ``ValueError`` is raised (not a GoRA model, already initialised, merged, budget too large, no
    gradients). Returns the :class:`Allocation`.
    """
    config = adapter_config(model)
    if config.method != "gora":
        raise ValueError(f"GoRA initialize needs a model adapted with GoRAConfig, got method {config.method!r}")
    if config.rank_pattern is not None:
        raise ValueError("GoRA: this model is already initialised (its config has a rank_pattern); adapt a fresh "
                         "model to initialise again")
    layers = dict(adapted_layers(model))
    if any(is_sharded(layer.base_layer.weight) for layer in layers.values()):
        raise ValueError("GoRA: the model is sharded by FSDP2's fully_shard, but initialize replaces the adapters with "
                         "new ones at the allocated ranks (which FSDP would not know) and reads whole base weights; "
                         "initialise the unsharded model (the same batches on every process), then call fully_shard")
    merged = sorted(name for name, layer in layers.items() if layer.merged)
    if merged:
        raise ValueError(f"GoRA: layer(s) {merged} are merged; rankwise.unmerge(model) before initialize")
    shapes = {name: linear_shape(layer.base_layer) for name, layer in layers.items()}
    rank_limits(shapes, config.r, config.r_min, config.r_max, config.budget_features)  # fail before the passes
    gradients = accumulate_gradients(model, layers, batches, loss_fn)
    importance = {}
    for name, layer in layers.items():
        weight = layer.adapter.base_weight().to(gradients[name].dtype)
        importance[name] = float((weight * gradients[name]).abs().mean())
    ranks = allocate_ranks(importance, shapes, config.r, config.r_min, config.r_max, config.budget_features)
    new_config = dataclasses.replace(
        config, rank_pattern={f"^{re.escape(name)}$": rank for name, rank in ranks.items()})
    adapter_cls = get_method(config.method).adapter_cls
    adapters = {}
    for name, layer in layers.items():
        old = layer.adapter
        adapter = adapter_cls(layer.base_layer, new_config, name)
        adapter.to(device=layer.base_layer.weight.device, dtype=adapter_dtype(layer.base_layer.weight.dtype))
        adapter.train(old.training)
        A = adapter.lora_A.weight
        with torch.no_grad():
            adapter.lora_B.weight.copy_(compressed_b(gradients[name], A, adapter.scaling, config.gamma))
        adapters[name] = adapter
    for name, layer in layers.items():
        layer.adapter = adapters[name]
    replace_adapter_config(model, new_config)
    budget = config.r * sum(features(shape, config.budget_features) for shape in shapes.values())
    used = sum(ranks[name] * features(shape, config.budget_features) for name, shape in shapes.items())
    return Allocation(ranks=ranks, importance=importance, budget=budget, used=used)


class GoRAAllocator(Allocator):
    """GoRA allocates once, in :func:`initialize`; per step it only refuses a model never initialised."""

    def __init__(self, model: nn.Module, initialized: bool) -> None:
        self.model = model
        self.initialized = initialized

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> GoRAAllocator:
        return cls(model, config.rank_pattern is not None)

    @property
    def allocations(self) -> int:  # type: ignore[override]
        return int(self.initialized)

    def batches_before_training(self) -> int:
        return 0 if self.initialized else adapter_config(self.model).gradient_batches

    def before_training(self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        """:func:`initialize` (rankwise's loop calls it with the first ``gradient_batches`` training batches)."""
        initialize(self.model, batches, loss_fn)
        self.initialized = True

    def step(self, global_step: int) -> None:
        if not self.initialized:
            raise ValueError(f"GoRA model stepped at step {global_step} without its gradient init, so it would train "
                             f"as a plain rank-r LoRA; {INIT_HELP}")

    def ranks(self) -> dict[str, int]:
        return {name: layer.adapter.r for name, layer in adapted_layers(self.model)}

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Nothing: the allocation lives in the config's ``rank_pattern`` and the adapter tensors."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        if tensors or values:
            raise ValueError(f"GoRA's allocator has no state, got {sorted(tensors) + sorted(values)}")


__all__ = ["Allocation", "GoRAAllocator", "allocate_ranks", "compressed_b", "initialize"]
