"""KRAdapter: a Khatri-Rao product weight update of high effective rank.

Paper: "Towards Higher Effective Rank in Parameter-efficient Fine-tuning using Khatri-Rao Product",
Albert, Zhang, Saratchandran, van den Hengel, Abbasnejad, ICCV 2025, arXiv:2508.00230. Official code:
the ``KRAdapterLinearLayer`` of PaulAlbert31/KRAdapter (README, the only layer code the authors
published; the repository's ``approximate_weight.py`` is a toy matrix-approximation variant with a
different parameterisation and scale 1, not the fine-tuning layer). rankwise follows the layer.

Formula (W ∈ R^{m×n}, y = x Wᵀ + b; k = min(m, n), M = max(m, n))::

    r = ⌊√k⌋,   d = the smallest integer ≥ 0 with r(r + d) ≥ M
    U ∈ R^{k×r} (kradapter_u),   V ∈ R^{k×(r+d)} (kradapter_v)
    P = (Vᵀ ⊙ Uᵀ)ᵀ ∈ R^{k × r(r+d)},   row i of P = V_i ⊗ U_i  (⊙: column-wise Khatri-Rao product)
    ΔW = s · P[:, :n]            when m ≤ n   (row i of ΔW is V_i ⊗ U_i cropped to n)
    ΔW = s · (P[:, :m])ᵀ         when m > n   (column j of ΔW is V_j ⊗ U_j cropped to m)
    y  = base(x) + x ΔWᵀ,        s = ``scaling`` (2 in the official layer)

No rank is configured: r and d follow from the layer's shape. Trainable parameters per layer:
k(2r + d) = k(r + ⌈M/r⌉): the paper's budget 2·min(m, n)·√max(m, n) on square layers, somewhat more on
rectangular ones (+2% for 1024×768, +12% for 4096×11008). The rank argument is the
Khatri-Rao one: rank(A ⊙ B) ≥ max(rank A, rank B), and generically ΔW has full rank k.

Init (official): U = 0, so ΔW = 0 at step 0; V ~ Kaiming-uniform with a = 5 (not √5; the official
code's value) on its (k, r + d) shape: U(±√(3 / (13(r + d)))). ``init_weights=False`` also draws U the same
way (fan-in r), for tests. The same seed gives the official layer's V.

Forward: the update is built densely (m × n) in every forward and applied as one matmul, as the official
layer does. Each output row (or column) carries its own rank-one structure V_i ⊗ U_i, so any factored
evaluation also costs about m·n MACs per token; one GEMM against the built ΔW is the cheapest way.

Oracle: the formula above, evaluated entry by entry from the indices (row i, column j -> V[i, j // r] ·
U[i, j mod r], transposed when m > n), and the official layer's forward (x @ update.T · s).

Differences from the official code, on purpose: the official ``merge`` adds its (n × m) forward matrix
to the (m × n) weight, a shape error on rectangular layers and the transposed update on square ones,
and its ``unmerge`` misspells ``weight``; rankwise merges s·ΔW as the forward computes it, and unmerge
subtracts it. r = ⌊√k⌋ is computed with integer arithmetic (``math.isqrt``), equal to the official
``int(math.sqrt(k))`` for every width below 2⁵².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_choice, check_positive_number, config_field
from ..core.layer import Adapter, add_into_output
from ..core.registry import register

KAIMING_A = 5.0  # the official layer's negative slope for Kaiming-uniform (not √5)


def kr_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """(k, r, d) of a layer: k = min(m, n), r = ⌊√k⌋, d the smallest with r(r + d) ≥ max(m, n)."""
    k, longest = min(out_features, in_features), max(out_features, in_features)
    r = math.isqrt(k)
    return k, r, -(-longest // r) - r


@dataclass(kw_only=True)
class KRAdapterConfig(AdapterConfig):
    """KRAdapter options: only the fixed scale, as the official layer (the rank follows from each shape)."""

    method = "kradapter"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    scaling: float = config_field(2.0, "fixed scale s of the update (the official layer's default is 2)")
    init_weights: bool = config_field(True, "True: U = 0 (start at the base model); False: random U (tests)")

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_number(owner, "scaling", self.scaling)
        check_choice(owner, "init_weights", self.init_weights, [True, False])


class KRAdapterAdapter(Adapter):
    """ΔW = s · (rows V_i ⊗ U_i of P, cropped, transposed when out > in)."""

    def __init__(self, base: nn.Module, config: KRAdapterConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        k, r, d = kr_shape(self.out_features, self.in_features)
        self.r, self.d, self.scaling = r, d, config.scaling
        self.kradapter_u = nn.Parameter(torch.zeros(k, r))
        self.kradapter_v = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(k, r + d), a=KAIMING_A))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.kradapter_u, a=KAIMING_A)

    def khatri_rao_weight(self) -> Tensor:
        """The unscaled (m × n) update: P = rows V_i ⊗ U_i, cropped (and transposed when m > n)."""
        m, n = self.out_features, self.in_features
        k = self.kradapter_u.shape[0]
        rows = (self.kradapter_v[:, :, None] * self.kradapter_u[:, None, :]).reshape(k, -1)
        return rows[:, :n] if m <= n else rows[:, :m].T

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        return add_into_output(base_out, F.linear(x, self.khatri_rao_weight()), alpha=self.scaling)

    def delta_weight(self) -> Tensor:
        return self.scaling * self.khatri_rao_weight()

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: KRAdapterConfig) -> int:
        k, r, d = kr_shape(out_features, in_features)
        return k * (2 * r + d)

    def describe(self) -> str:
        return f"r={self.r}, d={self.d}, s={self.scaling:g}"


register("kradapter", KRAdapterConfig, KRAdapterAdapter)
