"""ElaLoRA: AdaLoRA's SVD-shaped update whose rank is pruned *and* expanded, physically, during training.

Paper: "ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning", Chang, Ma,
Ma, Qi, Sabot, Jiang, Kung, arXiv:2504.00254 (2025). Official code: HuandongChang/ElaLoRA, a fork of
AdaLoRA's code; the layer is AdaLoRA's ``SVDLinear``.

The update of a layer W ∈ R^{m×n} (y = x Wᵀ + b) at its current rank r_l, P Λ Q in the paper::

    ΔW = α / (init_r + 1e-5) · B (A ⊙ E),   A = Q ∈ R^{r_l×n},  E = diag Λ ∈ R^{r_l×1},  B = P ∈ R^{m×r_l}
    y  = base(x) + α / (init_r + 1e-5) · B (A ⊙ E) dropout(x)

The scale keeps the *initial* rank for the whole run (the official ``ranknum``), whatever r_l becomes.
Init: E = 0, A and B ~ N(0, 0.02²), so ΔW = 0. Trainable parameters: Σ_l r_l (m_l + n_l + 1); Σ_l r_l
stays L·init_r, the count drifts with the layers' shapes.

New components (:meth:`ElaLoRAAdapter.new_components`, used by the allocator's expansion): rows of A
and columns of B drawn from N(0, I), projected off the existing ones and orthonormalised (by QR, which
is exact whatever the existing vectors; the official code makes one Gram–Schmidt pass v − Aᵀ(A v),
exact only when A's rows are orthonormal), with singular value E_new = min(min_i |E_i|, 1e-13), so ΔW
is unchanged at the moment of growth. The official code's scale mismatch is kept: the new vectors have
unit norm while the initial rows have norm ≈ 0.02·√n; only the tiny E_new hides it.

The rank allocation (importance, three phases, prune-and-expand rounds, the dynamic rank scheduler) and
the orthogonal regulariser are :class:`rankwise.allocation.ElaLoRAAllocator`; it needs the optimizer
(``rankwise.allocator(model).attach_optimizer(optimizer)``; ``RankwiseCallback`` and ``rankwise
finetune`` do it). The allocator writes the current ranks into the config's ``rank_pattern``
(``{layer: rank}``), so a saved adapter is rebuilt at those ranks by ``rankwise.load``. To resume with
``transformers.Trainer``, adapt the base model from the checkpoint's adapter (``rankwise.load(base,
"out/checkpoint-N/adapter")``) before ``Trainer.train(resume_from_checkpoint=...)``: the checkpoint's
tensors have the ranks of that step.

Config fields keep AdaLoRA's names (``init_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step``) for the official ``lora_r``, ``init_warmup``, ``final_warmup``,
``mask_interval``, ``beta1``, ``beta2``, ``reg_orth_coef``; ``b``, ``k`` and ``scheduler``
(``enable_scheduler``) are ElaLoRA's. Defaults: α = 16, b = 4, k = 2 and the scheduler on, as in every
official GLUE script; t_init = t_final = 1, ΔT = 10, β = 0.85, orthogonality weight 0.1 as the code's
argument defaults. The per-task scripts set r = 10 (QNLI r = 2) and t_init / t_final / ΔT of e.g.
300 / 500 / 50 (RTE), 500 / 1000 / 500 (MNLI). PEFT has no ElaLoRA, so there is no PEFT import or export.
Not supported: Conv2d and quantised layers (rankwise wraps Linear and Conv1D); the official trainer's
optimizer reset at every round (a bug, see :mod:`rankwise.allocation.elalora`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..allocation.elalora import ElaLoRAAllocator
from ..core.config import check_choice, check_positive_int, config_field
from ..core.registry import register
from .adalora import AdaLoRAAdapter, SVDConfig


@dataclass(kw_only=True)
class ElaLoRAConfig(SVDConfig):
    """ElaLoRA hyper-parameters (module docstring: names, defaults and the official ones); the fields shared
    with AdaLoRA are :class:`~rankwise.adapters.adalora.SVDConfig`'s, some with ElaLoRA's defaults."""

    method = "elalora"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    init_r: int = config_field(10, "initial rank of every adapted layer; the total rank stays L * init_r")
    tinit: int = config_field(1, "warm-up steps before any reallocation")
    tfinal: int = config_field(1, "final steps with frozen ranks")
    deltaT: int = config_field(10, "steps between two reallocation rounds")
    orth_reg_weight: float = config_field(0.1, "weight of the orthogonal regulariser")
    alpha: float = config_field(16.0, "scaling numerator: ΔW = alpha / init_r · B (A ⊙ E)")
    b: int = config_field(4, "components moved (pruned and added) per reallocation round")
    k: int = config_field(2, "lowest-scored components each layer offers per round")
    scheduler: bool = config_field(True, "decay b cubically to 0 at total_step - tfinal (official enable_scheduler)")
    expansion_seed: int = config_field(0, "seed of the generator that draws the expanded components")
    rank_pattern: dict[str, int] | None = field(  # field(): ruff wants a visible default for a dict
        default=None, metadata={"help": "{layer: rank}: build the layers at those ranks (written by the allocator)"})

    def validate(self) -> None:
        super().validate()  # the total rank stays L * init_r: the schedule's final rank is init_r
        owner = type(self).__name__
        if self.init_r < 2:
            raise ValueError(f"{owner}: init_r must be >= 2: a layer keeps at least one component, so at rank 1 "
                             "nothing can move; use init_r >= 2 (or LoRA for rank 1)")
        check_positive_int(owner, "b", self.b)
        check_positive_int(owner, "k", self.k)
        check_choice(owner, "scheduler", self.scheduler, [True, False])
        if isinstance(self.expansion_seed, bool) or not isinstance(self.expansion_seed, int) or self.expansion_seed < 0:
            raise ValueError(f"{owner}: expansion_seed must be an integer >= 0, got {self.expansion_seed!r}")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ValueError(f"{owner}: rank_pattern must be a {{layer name: rank}} dict, got {self.rank_pattern!r}")
        for name, rank in (self.rank_pattern or {}).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"{owner}: rank_pattern['{name}'] must be a rank >= 1, got {rank!r}")


class ElaLoRAAdapter(AdaLoRAAdapter):
    """ΔW = α/(init_r + 1e-5) · B (A ⊙ E) at the layer's current rank; grows by orthogonal components."""

    def __init__(self, base: torch.nn.Module, config: ElaLoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        #: the generator new components are drawn from (the allocator's; None: torch's global one)
        self.generator: torch.Generator | None = None

    def _start_rank(self, config: Any, layer_name: str) -> int:
        """``rank_pattern[layer_name]`` (a saved adapter's current rank), else init_r; at most min(m, n)."""
        rank = (config.rank_pattern or {}).get(layer_name, config.init_r)
        limit = min(self.out_features, self.in_features)
        if rank > limit:
            raise self.fail(f"rank_pattern gives rank {rank}, more than min(out, in)={limit}",
                            f"Use a rank <= {limit} for this layer")
        return rank

    @torch.no_grad()
    def new_components(self, count: int) -> dict[str, Tensor]:
        """``count`` components: unit rows of A and columns of B orthogonal to the existing ones and to each
        other, singular values min(min |E|, 1e-13). ``ValueError`` past min(m, n) components."""
        limit = min(self.out_features, self.in_features)
        if self.r + count > limit:
            raise self.fail(f"growing rank {self.r} by {count} exceeds min(out, in)={limit}",
                            "Grow by at most min(out, in) - r components")
        a = _orthonormal_complement(self.lora_A.T, count, self.generator).T
        b = _orthonormal_complement(self.lora_B, count, self.generator)
        value = min(float(self.lora_E.abs().min()), 1e-13) if self.r else 1e-13
        return {"lora_A": a, "lora_E": self.lora_E.new_full((count, 1), value), "lora_B": b}


def _orthonormal_complement(vectors: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` orthonormal columns orthogonal to the columns of ``vectors`` (d×r), from N(0, I) draws.

    The draws are projected off an orthonormal basis of the columns (QR), twice for numerical safety,
    then orthonormalised among themselves (QR), all in float64.
    """
    basis = torch.linalg.qr(vectors.double()).Q
    draws = torch.randn(vectors.shape[0], count, generator=generator, dtype=torch.float64).to(basis.device)
    for _ in range(2):
        draws = draws - basis @ (basis.T @ draws)
    return torch.linalg.qr(draws).Q.to(vectors)


register("elalora", ElaLoRAConfig, ElaLoRAAdapter, allocator=ElaLoRAAllocator.from_config)

__all__ = ["ElaLoRAAdapter", "ElaLoRAAllocator", "ElaLoRAConfig"]
