"""LoHa: low-rank Hadamard product adaptation, computed as Hugging Face PEFT 0.21.2's ``loha`` tuner.

Papers: "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", Hyeon-Woo,
Ye-Bin, Oh, arXiv:2108.06098 (the Hadamard parameterisation and its He init); "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation" (LyCORIS), Yeh et al., arXiv:2309.14859.
Survey context: "Low-Rank Approximation, Adaptation, and Other Tales", Jun Lu, arXiv:2408.05883.
Reference for tensors and numbers: PEFT 0.21.2 ``tuners/loha`` (Linear).

Formula (W ∈ R^{m×n}, y = x Wᵀ + b, s = α/r, ⊙ the elementwise product)::

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a ∈ R^{m×r} (hada_w1_a, hada_w2_a),
                                       W1b, W2b ∈ R^{r×n} (hada_w1_b, hada_w2_b)
    y  = base(x) + x ΔWᵀ                                  rank(ΔW) ≤ min(r², m, n)

Forward without ΔW (Khatri-Rao / face-splitting identity): with K = W1b ⊙ W2b the column-wise
Khatri-Rao product (r² × n, column j = W1b[:, j] ⊗ W2b[:, j]) and L = W1a • W2a the row-wise one
(face-splitting, m × r², row i = W1a[i] ⊗ W2a[i]),

    (W1a W1b) ⊙ (W2a W2b) = L K,    so   x ΔWᵀ = s · (x Kᵀ) Lᵀ

(entry (i, j) of both sides is Σ_{p,q} W1a[i,p] W2a[i,q] W1b[p,j] W2b[q,j]). This path costs r²(m + n)
MACs per token plus r²(m + n) to build K and L once per forward; the dense path costs m·n per token
plus 2r·m·n to build ΔW. The forward takes the Khatri-Rao path exactly when r²(m + n) < m·n (so for
r = 8 on every layer wider than about 128), else it builds ΔW; :attr:`LoHaAdapter.khatri_rao` says which.
Both give the same numbers (to float rounding) and the same gradients; tests run both.

Dropouts (training only; PEFT's semantics, drawn from the global RNG in PEFT's order, so a seeded
run draws PEFT's masks):
    * ``module_dropout`` p_m: every training forward draws one u = torch.rand(1) (also when p_m = 0,
      as PEFT does, so the random stream stays in step with PEFT's) and skips the adapter when u ≤ p_m.
    * ``rank_dropout`` p_r: despite its name it drops *output rows* of ΔW, not rank components: a mask
      k_i = [torch.rand(m)_i > p_r], rescaled to k / mean(k), multiplies row i of ΔW (equivalently
      output feature i of the update).

Init (PEFT ``init_weights=True``): W1a, W1b, W2a Kaiming-uniform(a=√5), i.e. U(±1/√fan_in) with fan-in
r for W1a, W2a (m × r) and n for W1b (r × n), drawn in that order; W2b = 0, so ΔW = 0 at step 0.
``init_weights=False`` draws W2b ~ U(±1/√n) as well (tests only). Same seed, same tensors as PEFT.
Trainable parameters per layer: 2r(m + n).

Oracle: PEFT 0.21.2 (outputs, gradients, ΔW, merged weights, seeded init, dropout masks under a
shared seed, adapter files both ways) and the formula above computed densely.

Differences from PEFT, on purpose:
    * If every row is dropped (all k_i = 0) the update is zero; PEFT divides by mean(k) = 0 and returns NaN.
    * ``r > min(m, n)`` is an error for a fresh adapter (W1a W1b can already be any m×n matrix at
      r = min(m, n), so the extra parameters are wasted); PEFT accepts it. ``allow_excess_rank=True``
      accepts it, and ``import_peft`` sets it, so every file PEFT loads imports.
    * transformers ``Conv1D`` (GPT-2) layers work through rankwise's core; PEFT's LoHa raises TypeError
      on them, so ``export_peft`` refuses such a model.
    * No ``rank_pattern`` / ``alpha_pattern`` and no Conv2d layers (``use_effective_conv2d`` is inert on
      Linear layers); a PEFT file that sets the patterns is refused by ``import_peft``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_choice, check_positive_int, check_positive_number, config_field
from ..core.layer import Adapter, add_into_output
from ..core.registry import PeftFormat, register

# ----------------------------------------------------------------------------------------------
# What LoHa and LoKr (adapters/lokr.py) share: PEFT's LyCORIS options and dropouts
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LycorisConfig(AdapterConfig):
    """The options PEFT's LyCORIS adapters (LoHa, LoKr) share, with PEFT's names and defaults."""

    r: int = config_field(8, "rank of each low-rank factor pair")
    alpha: float = config_field(8.0, "scaling numerator: s = alpha / r")
    rank_dropout: float = config_field(
        0.0, "training only: probability of dropping each OUTPUT ROW of the update (PEFT's name)")
    module_dropout: float = config_field(0.0, "training only: probability of skipping the whole adapter per forward")

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_positive_number(owner, "alpha", self.alpha)
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {value!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def module_skipped(adapter: nn.Module, probability: float) -> bool:
    """PEFT's module dropout: in training, one ``torch.rand(1)`` per forward; skip the adapter when it is ≤ p."""
    return adapter.training and bool(torch.rand(1) <= probability)


def row_keep_mask(rows: int, probability: float, rescale: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """PEFT's "rank" dropout mask over the update's output rows: [torch.rand(rows) > p], drawn on the CPU
    generator as PEFT draws it, optionally divided by its mean (0 stays 0 when every row is dropped)."""
    keep = (torch.rand(rows) > probability).to(dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1.0 / rows)  # the mean is 0 or >= 1/rows: this only guards 0/0
    return keep.to(device)


def lycoris_peft_fields(config: LycorisConfig) -> dict[str, Any]:
    """The PEFT config fields LoHa and LoKr share. ``use_effective_conv2d`` only changes Conv layers, which
    rankwise does not adapt with these methods, so any value computes the same on Linear layers."""
    return {"r": config.r, "alpha": config.alpha, "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout, "use_effective_conv2d": False}


def lycoris_from_peft(peft_config: dict[str, Any], method: str) -> dict[str, Any]:
    """Keyword arguments of a LyCORIS config from PEFT's fields; refuses GPT-2 ``Conv1D`` files (PEFT cannot
    load them, so no such file reproduces)."""
    if peft_config.get("fan_in_fan_out"):
        raise ValueError(
            f"PEFT field fan_in_fan_out=True: PEFT's {method} does not adapt transformers Conv1D (GPT-2) layers "
            "(it raises TypeError), so PEFT could not load this adapter. Keep it in rankwise's own format "
            "(rankwise.save), or exclude the Conv1D layers"
        )
    return {
        "r": peft_config.get("r", 8),
        "alpha": float(peft_config.get("alpha", 8)),
        "rank_dropout": float(peft_config.get("rank_dropout", 0.0)),
        "module_dropout": float(peft_config.get("module_dropout", 0.0)),
    }


def drop_bias_field(model: nn.Module, payload: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """``export_peft`` hook: PEFT's LoHa and LoKr configs have no ``bias`` field (PEFT would warn about it)."""
    payload.pop("bias", None)


def kaiming(shape: tuple[int, int]) -> Tensor:
    """A weight drawn as PEFT draws LyCORIS factors: Kaiming-uniform(a=√5) = U(±1/√shape[1])."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


# ----------------------------------------------------------------------------------------------
# LoHa
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LoHaConfig(LycorisConfig):
    """LoHa hyper-parameters, named and defaulted as in PEFT's ``LoHaConfig``."""

    method = "loha"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    init_weights: bool = config_field(True, "True: hada_w2_b = 0 (start at the base model); False: random (tests)")
    allow_excess_rank: bool = config_field(
        False, "accept r > min(out, in) (PEFT does; the extra rank is wasted). import_peft sets it")

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_choice(owner, "init_weights", self.init_weights, [True, False])
        check_choice(owner, "allow_excess_rank", self.allow_excess_rank, [True, False])


class LoHaAdapter(Adapter):
    """ΔW = s·(W1a W1b) ⊙ (W2a W2b), applied through the Khatri-Rao identity when that is cheaper."""

    def __init__(self, base: nn.Module, config: LoHaConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        m, n, r = self.out_features, self.in_features, config.r
        if r > min(m, n) and not config.allow_excess_rank:
            raise self.fail(
                f"rank r={r} exceeds min(out, in)={min(m, n)}",
                f"Use r <= {min(m, n)}, exclude this layer from targets, or set allow_excess_rank=True "
                "(as PEFT does; the extra rank is wasted)",
            )
        self.r, self.scaling = r, config.scaling
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        # PEFT's draw order: w1_a, w1_b, w2_a, then w2_b (zero, or random with init_weights=False).
        self.hada_w1_a = nn.Parameter(kaiming((m, r)))
        self.hada_w1_b = nn.Parameter(kaiming((r, n)))
        self.hada_w2_a = nn.Parameter(kaiming((m, r)))
        self.hada_w2_b = nn.Parameter(kaiming((r, n)) if not config.init_weights else torch.zeros(r, n))
        self.khatri_rao = r * r * (m + n) < m * n

    def row_scale(self) -> Tensor | float:
        """s, or the (m, 1) column s·k (one factor per output row) when rank dropout is active in training."""
        if not (self.training and self.rank_dropout):
            return self.scaling
        keep = row_keep_mask(self.out_features, self.rank_dropout, True, self.hada_w1_a.dtype, self.hada_w1_a.device)
        return self.scaling * keep[:, None]

    def hadamard(self) -> Tensor:
        """(W1a W1b) ⊙ (W2a W2b), unscaled (m × n)."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def khatri_rao_factors(self) -> tuple[Tensor, Tensor]:
        """(L, K): the face-splitting product W1a • W2a (m × r²) and the Khatri-Rao product W1b ⊙ W2b (r² × n)."""
        r = self.r
        left = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.out_features, r * r)
        right = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, self.in_features)
        return left, right

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        if module_skipped(self, self.module_dropout):
            return base_out
        scale = self.row_scale()
        if self.khatri_rao:
            left, right = self.khatri_rao_factors()
            return add_into_output(base_out, F.linear(F.linear(x, right), left * scale))
        return add_into_output(base_out, F.linear(x, self.hadamard() * scale))

    def delta_weight(self) -> Tensor:
        return self.scaling * self.hadamard()

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: LoHaConfig) -> int:
        return 2 * config.r * (out_features + in_features)

    def describe(self) -> str:
        return f"r={self.r}, s={self.scaling:g}, forward={'khatri-rao' if self.khatri_rao else 'dense'}"


# ----------------------------------------------------------------------------------------------
# PEFT's LoHaConfig <-> ours (same tensor names)
# ----------------------------------------------------------------------------------------------


def _to_peft(config: LoHaConfig) -> dict[str, Any]:
    return {**lycoris_peft_fields(config), "init_weights": config.init_weights}


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    return {
        **lycoris_from_peft(peft_config, "LoHa"),
        "init_weights": bool(peft_config.get("init_weights", True)),
        "allow_excess_rank": True,  # PEFT accepts r > min(out, in), so a file it loads must import
    }


register("loha", LoHaConfig, LoHaAdapter,
         peft=PeftFormat("LOHA", lambda c: True, _to_peft, _from_peft, {}, prepare_export=drop_bias_field))
