"""LoLDU: train only the diagonal of a fixed rank-r LDU basis of the pretrained weight.

Paper: "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", Shi et al., arXiv:2410.13618; official code SKDDJ/LoLDU (``minloldu``).

W0 ∈ R^{m×n}, k = min(m, n). Pivoted LU with partial (row) pivoting, as ``torch.linalg.lu``::

    W0 = P L U = P L diag(D) Ū,   D = diag(U),  Ū = diag(D)⁻¹ U (unit upper)
    L_r = L[:, :r],  D_r = D[:r],  Ū_r = Ū[:r]          (the first r pivot steps)
    W   = W0 + σ P L_r diag(z − D_r) Ū_r,   z ∈ R^r trained, z₀ = D_r,  σ = α / r
    y   = base(x) + σ ((x Ū_rᵀ) ⊙ (z − D_r)) (P L_r)ᵀ

This equals the official W_res + σ P L_r diag(z) Ū_r with W_res = W0 − σ P L_r diag(D_r) Ū_r,
but leaves W0 untouched, so disabling and unloading give W0 exactly. Trainable parameters per
layer: r. Frozen buffers: L_r (m×r), Ū_r (r×n), D_r (r) and the permutation as m int64 indices
(never an m×m matrix); they are saved with the adapter, so reloading never depends on
re-factorising. The forward gathers the r-wide rows of L_r by the permutation (O(mr)) and costs
O(batch·r·(m+n)); nothing m×n is built outside merging.

Oracle: the official parametrisation (SKDDJ/LoLDU, ``init_method="lu"``) written densely from
``torch.linalg.lu`` in the tests, W_res + σ P L_r diag(z) Ū_r: outputs, z gradients, merged
weights and the init (z₀ = D_r, the exact identity ΔW = 0). Merge adds ΔW to W0 and unmerge
subtracts it, so merge→unmerge restores W0 up to float rounding, not bit for bit.

Decisions (official code → rankwise, and why):
    * σ = α/r. The defaults r = α = 32 give σ = 1, the paper's tables (α = r); keep α = r when
      changing r to stay there. The official ``from_linear`` defaults to α = 1. σ is frozen, as in
      the official training recipe (the paper's caption counts it as trained; its code does not).
    * z init: only ``"lu"`` (z₀ = D_r), the one init that keeps W = W0 at step 0; the official
      alternatives ('uniform', 'normal', ...) change the model before training and are omitted.
    * The LU runs once in float64 (the official code uses float32): pivots and factors are then
      deterministic to working precision; the factors are stored in the adapter's dtype.
    * r > min(m, n) is a ValueError (the official code silently truncates r).
    * A pivot |D_i| ≤ 1e-6·max|W0| among the first r (rank-deficient or zero leading columns,
      pruned weights) is a ValueError naming the layer (the official code produces NaN weights).
    * Dropout is not offered: the official code has the argument but never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_positive_int, check_positive_number, config_field
from ..core.inject import adapter_dtype
from ..core.layer import Adapter
from ..core.registry import register

PIVOT_TOLERANCE = 1e-6


@dataclass(kw_only=True)
class LoLDUConfig(AdapterConfig):
    """LoLDU hyper-parameters. LoLDU wants learning rates about 10× those of LoRA (paper: 3e-3 on ViT)."""

    method = "loldu"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    r: int = config_field(32, "number of LDU components whose diagonal is trained (r trainable scalars per layer)")
    alpha: float = config_field(32.0, "scale numerator: sigma = alpha / r (the paper uses alpha = r)")

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_positive_number(owner, "alpha", self.alpha)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lu_permutation(pivots: Tensor, rows: int) -> Tensor:
    """Row indices ``perm`` with ``(L U)[i] = W[perm[i]]`` from LAPACK's 1-based sequential swaps."""
    perm = list(range(rows))
    for step, pivot in enumerate(pivots.tolist()):
        other = pivot - 1
        perm[step], perm[other] = perm[other], perm[step]
    return torch.tensor(perm, dtype=torch.long)


class LoLDUAdapter(Adapter):
    """ΔW = σ P L_r diag(z − D_r) Ū_r, with P stored as row indices."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: LoLDUConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        m, n, r = self.out_features, self.in_features, config.r
        if r > min(m, n):
            raise self.fail(f"r={r} exceeds min(out, in)={min(m, n)}", f"Use r <= {min(m, n)} or exclude this layer")
        self.r = r
        self.scaling = config.scaling
        with torch.no_grad():
            lower, diagonal, upper, row_of = self._factorise(self.base_weight().detach().to(torch.float64))
        dtype = adapter_dtype(self.base_weight().dtype)
        self.register_buffer("loldu_L", lower.to(dtype))
        self.register_buffer("loldu_U", upper.to(dtype))
        self.register_buffer("loldu_D", diagonal.to(dtype))
        self.register_buffer("loldu_perm", row_of)
        self.loldu_z = nn.Parameter(diagonal.to(dtype).clone())

    def _factorise(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(L_r, D_r, Ū_r, row_of) where W0[j] = (L_r diag(D_r) Ū_r + rest)[row_of[j]]."""
        factors, pivots, _ = torch.linalg.lu_factor_ex(weight)
        r = self.r
        lower = torch.tril(factors[:, :r], diagonal=-1) + torch.eye(*factors[:, :r].shape, dtype=factors.dtype)
        upper = torch.triu(factors[:r, :])
        diagonal = upper.diagonal().clone()
        scale = weight.abs().max()
        tiny = diagonal.abs() <= PIVOT_TOLERANCE * scale
        if scale == 0 or tiny.any():
            first = int(tiny.nonzero()[0]) if tiny.any() else 0
            raise self.fail(
                f"LU pivot {first} of the base weight is (near) zero, so the LDU basis is undefined "
                "(a rank-deficient, zero or pruned weight)",
                f"Use r <= {first} or exclude this layer from targets" if first else "Exclude this layer from targets",
            )
        perm = lu_permutation(pivots.cpu(), self.out_features)
        return lower, diagonal, upper / diagonal[:, None], torch.argsort(perm).to(weight.device)

    def permuted_lower(self) -> Tensor:
        """P L_r (m×r): the rows of L_r gathered by the pivot permutation."""
        return self.loldu_L.index_select(0, self.loldu_perm)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        hidden = F.linear(x, self.loldu_U) * ((self.loldu_z - self.loldu_D) * self.scaling)
        return torch.addmm(
            base_out.reshape(-1, self.out_features), hidden.reshape(-1, self.r), self.permuted_lower().T
        ).view(base_out.shape)

    def delta_weight(self) -> Tensor:
        coefficients = (self.loldu_z - self.loldu_D) * self.scaling
        return (self.permuted_lower() * coefficients) @ self.loldu_U

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: LoLDUConfig) -> int:
        return config.r

    def describe(self) -> str:
        return f"r={self.r}, sigma={self.scaling:g}"


register("loldu", LoLDUConfig, LoLDUAdapter)
