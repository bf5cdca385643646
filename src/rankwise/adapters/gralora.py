"""GraLoRA: granular low-rank adaptation (k×k grid of small LoRAs), with the hybrid variant.

Paper: "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning", Jung, Ahn, Kim,
Kim, Park, arXiv:2505.20355 (NeurIPS 2025). Official code: SqueezeBits/GraLoRA (a PEFT fork);
reference for tensors and numbers: Hugging Face PEFT 0.21.2 ``tuners/gralora``.

Formula (W ∈ R^{m×n}, y = x Wᵀ + b; k = ``gralora_k``, ρ = r/k, h = ``hybrid_r``, s = α/(r + h)).
ΔW is a k×k block matrix; block (i, j) maps input chunk j (n/k wide) to output chunk i (m/k)::

    ΔW_ij = s · B_ij A_ij,   A_ij = gralora_A[j, :, iρ:(i+1)ρ]ᵀ  (ρ × n/k),
                              B_ij = gralora_B[i, jρ:(j+1)ρ, :]ᵀ  (m/k × ρ)
    ΔW   += s · B_g A_g      (hybrid: A_g = gralora_A_general (h × n), B_g = gralora_B_general (m × h))

Storage is PEFT's: ``gralora_A`` (k, n/k, r), ``gralora_B`` (k, r, m/k), so PEFT checkpoints map
one to one (``rankwise.import_peft`` / ``export_peft``). In training, with dropout p > 0, the two
branches see independent masks, as in PEFT: y = base(x) + ΔW_blk·drop₁(x) + s·B_g A_g·drop₂(x).
Forward, for any number of leading dimensions (flattened to N tokens), with x̃ = drop₁(x):
Z_j = x̃_j · gralora_A[j] (one batched matmul, N × r per chunk); the "information exchange" regroups
Z from (N, k_in, k_out, ρ) to (N, k_out, k_in·ρ); out_i = Z'_i · gralora_B[i]; then the hybrid term.
Cost (n + m)(r + h) MACs per token, like LoRA at rank r + h; nothing m×n is built. Trainable
parameters per layer: (r + h)(m + n), whatever k is.

Init (PEFT's ``init_weights=True``): every A slice Kaiming-uniform(a=√5) on its (r, n/k) view, i.e.
U(±1/√(n/k)) (fan-in n/k, not n); B = 0; hybrid A_g ~ U(±1/√n), B_g = 0. ``init_weights=False`` draws
B from U(±1/√r) and B_g from U(±1/√h) as well (tests only). Without the hybrid branch the draws are
PEFT's, in PEFT's order, so the same seed gives PEFT's tensors exactly (PEFT's hybrid branch also
spends draws on the default init of two ``nn.Linear`` it overwrites; rankwise does not).

Oracle: PEFT 0.21.2 (outputs, gradients, ΔW, merged weights, dropout masks under a shared seed),
plus the block formula above computed independently. Merge adds s·ΔW to W and unmerge subtracts it,
so merge→unmerge restores W up to float rounding, not bit for bit.

Decisions and differences from PEFT 0.21.2:
    * ``r`` is PEFT's (GraLoRA rank without the hybrid part; the official fork's ``r`` is r + h).
      Defaults are PEFT's: r = 32, α = 64, k = 2, h = 0 (k = 2 suits r ≤ 32, k = 4 suits r ≥ 64;
      the paper recommends hybrid_r > 0 for small r).
    * Inputs of any rank work (PEFT fails on 4-D input and special-cases 2-D).
    * Divisibility problems raise a ValueError naming the layer; k·r > min(m, n) warns, because the
      rank of ΔW cannot exceed min(m, n) and the extra parameters are wasted (PEFT is silent).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_dropout, check_positive_int, check_positive_number, config_field
from ..core.layer import Adapter, add_into_output
from ..core.registry import PeftFormat, register


@dataclass(kw_only=True)
class GraLoRAConfig(AdapterConfig):
    """GraLoRA hyper-parameters, named and defaulted as in PEFT's ``GraloraConfig``."""

    method = "gralora"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    r: int = config_field(32, "GraLoRA rank (divisible by gralora_k); each of the k*k blocks gets rank r/k")
    alpha: float = config_field(64.0, "scaling numerator: s = alpha / (r + hybrid_r)")
    gralora_k: int = config_field(2, "blocks per side: 2 for r <= 32, 4 for r >= 64 (paper)")
    hybrid_r: int = config_field(0, "rank of an extra dense LoRA branch (hybrid GraLoRA); 0 = none")
    dropout: float = config_field(0.0, "dropout probability on each adapter branch's input (block, hybrid: own masks)")
    init_weights: bool = config_field(True, "True: zero B (start at the base model); False: random B (tests)")

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_positive_int(owner, "gralora_k", self.gralora_k)
        if isinstance(self.hybrid_r, bool) or not isinstance(self.hybrid_r, int) or self.hybrid_r < 0:
            raise ValueError(f"{owner}: hybrid_r must be an integer >= 0, got {self.hybrid_r!r}")
        if self.r % self.gralora_k:
            raise ValueError(
                f"{owner}: r={self.r} must be divisible by gralora_k={self.gralora_k}; use r = "
                f"{max(self.gralora_k, self.r - self.r % self.gralora_k)} or another gralora_k"
            )
        check_positive_number(owner, "alpha", self.alpha)
        check_dropout(owner, self.dropout)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"{owner}: init_weights must be True or False, got {self.init_weights!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


class GraLoRAAdapter(Adapter):
    """k×k block-wise LoRA with information exchange, plus an optional dense hybrid LoRA."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: GraLoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        m, n, k = self.out_features, self.in_features, config.gralora_k
        if m % k or n % k:
            raise self.fail(
                f"gralora_k={k} does not divide both widths",
                "Choose a gralora_k that divides in_features and out_features, or exclude this layer",
            )
        if config.hybrid_r > min(m, n):
            raise self.fail(f"hybrid_r={config.hybrid_r} exceeds min(out, in)={min(m, n)}",
                            f"Use hybrid_r <= {min(m, n)}")
        if k * config.r > min(m, n):
            warnings.warn(
                f"GraLoRA layer '{layer_name}' ({m}x{n}): gralora_k*r = {k * config.r} exceeds min(out, in) = "
                f"{min(m, n)}, the largest rank ΔW can have; the extra parameters are wasted",
                stacklevel=2,
            )
        self.k, self.r, self.hybrid_r = k, config.r, config.hybrid_r
        self.scaling = config.scaling
        self.gralora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Input chunk j: A_j (r × n/k, fan-in n/k), then, when random, B_j (m/k × r, fan-in r), drawn in
        # PEFT's order and layout, so a seeded init equals PEFT's; stored transposed as (k, n/k, r), (k, r, m/k).
        blocks_a, blocks_b = [], []
        for _ in range(k):
            blocks_a.append(_kaiming(self.r, n // k).T)
            blocks_b.append(torch.zeros(self.r, m // k) if config.init_weights else _kaiming(m // k, self.r).T)
        self.gralora_A = nn.Parameter(torch.stack(blocks_a).contiguous())
        self.gralora_B = nn.Parameter(torch.stack(blocks_b).contiguous())
        if self.hybrid_r:
            h = self.hybrid_r
            self.gralora_A_general = nn.Parameter(_kaiming(h, n))
            self.gralora_B_general = nn.Parameter(torch.zeros(m, h) if config.init_weights else _kaiming(m, h))

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        k, r, m, n = self.k, self.r, self.out_features, self.in_features
        # Each branch draws its own dropout mask, block branch first (PEFT's order: same seed, same masks).
        dropped = self.gralora_dropout(x).reshape(-1, n)
        tokens = dropped.shape[0]
        # (1, N, k_in, r): input chunk j through gralora_A[j]. einsum returns a permuted view here; an
        # elementwise op on it (scaling z) keeps that layout and made the bmms below 2x slower on CPU,
        # so the scale is applied to the output together with the base add.
        z = torch.einsum("blni,nir->blnr", dropped.view(1, tokens, k, -1), self.gralora_A)
        # Information exchange: (N, k_in, k_out, ρ) -> (N, k_out, k_in·ρ).
        z = z.view(1, tokens, k, k, r // k).transpose(2, 3).reshape(1, tokens, k, r)
        out = torch.einsum("bljr,jro->bljo", z, self.gralora_B).reshape(tokens, m)
        if self.hybrid_r:  # the scale is applied once below, to both branches
            hybrid_in = self.gralora_dropout(x).reshape(-1, n)
            out = torch.addmm(out, F.linear(hybrid_in, self.gralora_A_general), self.gralora_B_general.T)
        # Into base_out itself, not into a reshaped view of it (autograd's CopySlices would copy it back).
        return add_into_output(base_out, out.view(base_out.shape), alpha=self.scaling)

    def delta_weight(self) -> Tensor:
        k, rho = self.k, self.r // self.k
        A = self.gralora_A.view(k, self.in_features // k, k, rho)  # [j, col, i, ρ]
        B = self.gralora_B.view(k, k, rho, self.out_features // k)  # [i, j, ρ, row]
        delta = torch.einsum("jcip,ijpo->iojc", A, B)  # [i, row, j, col]
        delta = delta.reshape(self.out_features, self.in_features)
        if self.hybrid_r:
            delta = delta + self.gralora_B_general @ self.gralora_A_general
        return self.scaling * delta

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: GraLoRAConfig) -> int:
        return (config.r + config.hybrid_r) * (out_features + in_features)

    def describe(self) -> str:
        hybrid = f", hybrid_r={self.hybrid_r}" if self.hybrid_r else ""
        return f"r={self.r}, k={self.k}{hybrid}, s={self.scaling:g}"


def _kaiming(rows: int, cols: int) -> Tensor:
    """A (rows × cols) weight drawn as PEFT draws it: Kaiming-uniform(a=√5), fan-in ``cols``, U(±1/√cols)."""
    return nn.init.kaiming_uniform_(torch.empty(rows, cols), a=math.sqrt(5))


# ----------------------------------------------------------------------------------------------
# PEFT's GraloraConfig <-> ours (same tensor layout; PEFT keeps the hybrid factors in nn.Linear)
# ----------------------------------------------------------------------------------------------


def _to_peft(config: GraLoRAConfig) -> dict[str, Any]:
    return {
        "r": config.r,
        "alpha": config.alpha,
        "gralora_k": config.gralora_k,
        "hybrid_r": config.hybrid_r,
        "gralora_dropout": config.dropout,
        "init_weights": config.init_weights,
    }


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "r": peft_config.get("r", 32),
        "alpha": float(peft_config.get("alpha", 64)),
        "gralora_k": peft_config.get("gralora_k", 2),
        "hybrid_r": peft_config.get("hybrid_r", 0),
        "dropout": float(peft_config.get("gralora_dropout", 0.0)),
        "init_weights": bool(peft_config.get("init_weights", True)),
    }


register(
    "gralora",
    GraLoRAConfig,
    GraLoRAAdapter,
    peft=PeftFormat(
        "GRALORA",
        lambda c: True,
        _to_peft,
        _from_peft,
        {"gralora_A_general": "gralora_A_general.weight", "gralora_B_general": "gralora_B_general.weight"},
    ),
)
