"""LoKr: low-rank Kronecker product adaptation, computed as Hugging Face PEFT 0.21.2's ``lokr`` tuner.

Paper: "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation" (LyCORIS),
Yeh et al., arXiv:2309.14859; Kronecker adapters: "KronA: Parameter Efficient Tuning with Kronecker
Adapter", Edalati et al., arXiv:2212.10650. Survey context: "Low-Rank Approximation, Adaptation, and
Other Tales", Jun Lu, arXiv:2408.05883. Reference for tensors and numbers: PEFT 0.21.2 ``tuners/lokr`` (Linear).

Formula (W ∈ R^{m×n}, y = x Wᵀ + b, s = α/r, ⊗ the Kronecker product)::

    m = a·b,  n = c·d     with (a, b) = factorization(m, f), (c, d) = factorization(n, f)
    ΔW = s · W1 ⊗ W2,     W1 ∈ R^{a×c},  W2 ∈ R^{b×d}
    W1 = lokr_w1,  or lokr_w1_a lokr_w1_b (a×r, r×c) when decompose_both and r < max(a, c)/2
    W2 = lokr_w2,  or lokr_w2_a lokr_w2_b (b×r, r×d) when r < max(b, d)/2

so a factor is a full matrix when r is at least half its larger side (PEFT's rule), and r then only
enters the scale. ``factorization(dim, f)`` is PEFT's: (f, dim/f) when f > 0 divides dim; otherwise the
divisors p of dim are walked upwards from 1 while p < dim/p, stopping before a divisor above f (f = -1:
no limit), and the last pair is returned smaller first. So f = -1 splits dim near √dim (768 -> (24, 32);
a prime p -> (1, p)). A fresh adapter refuses an f > 0 that does not divide a width (PEFT silently falls
back to that walk); ``allow_factor_fallback=True`` accepts it, and ``import_peft`` sets it.

Forward without ΔW: with X the input reshaped to (c, d) (row-major), (W1 ⊗ W2) vec(X) = vec(W1 X W2ᵀ),
computed in whichever order is cheaper: b·c·(a + d) or a·d·(b + c) MACs per token instead of m·n = abcd.

Dropouts (training only, PEFT's semantics and RNG order, so a seeded run draws PEFT's masks):
``module_dropout`` draws one torch.rand(1) per training forward and skips the adapter when it is ≤ p;
``rank_dropout`` multiplies output row i of ΔW by k_i = [torch.rand(m)_i > p] (a float32 mask, as in
PEFT), divided by mean(k) only with ``rank_dropout_scale=True`` (a zero update where PEFT's 0/0 gives NaN).

Init (PEFT ``init_weights``), Kaiming-uniform(a=√5) = U(±1/√fan_in) with fan-in the number of columns:
    * True: W1 = 0 (or lokr_w1_a = 0 and lokr_w1_b random), W2 random (or both its factors), so ΔW = 0.
    * "lycoris": W1 random (or both factors), W2 = 0 (or lokr_w2_b = 0 and lokr_w2_a random): ΔW = 0.
    * False: everything random (tests only).
Draws in PEFT's order (w1 or w1_a, w1_b, then w2 or w2_a, w2_b), so the same seed gives PEFT's tensors.
Trainable parameters per layer: (a·c or r(a + c)) + (b·d or r(b + d)).

Oracle: PEFT 0.21.2 (outputs, gradients, ΔW, merged weights, seeded init, factorization on every width
up to 512, dropout masks under a shared seed, adapter files both ways) and torch.kron densely.

Differences from PEFT, on purpose: the forward never builds the m×n ΔW (PEFT builds it every forward);
transformers ``Conv1D`` layers work through rankwise's core (PEFT raises TypeError, so ``export_peft``
refuses them); no ``rank_pattern`` / ``alpha_pattern`` and no Conv2d layers (``use_effective_conv2d`` is
inert on Linear layers); a PEFT file that sets the patterns is refused by ``import_peft``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import check_choice, config_field
from ..core.layer import Adapter, add_into_output
from ..core.registry import PeftFormat, register
from .loha import (
    LycorisConfig,
    drop_bias_field,
    kaiming,
    lycoris_from_peft,
    lycoris_peft_fields,
    module_skipped,
    row_keep_mask,
)

INITS = (True, False, "lycoris")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into two factors (see the module docstring); smaller first unless
    ``factor`` divides ``dimension``, in which case it is ``(factor, dimension // factor)``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    small = [p for p in range(1, math.isqrt(dimension) + 1) if dimension % p == 0]
    divisors = small + [dimension // p for p in reversed(small) if p * p != dimension]
    chosen = 1
    for divisor in divisors[1:]:
        if chosen * chosen >= dimension or divisor > limit:
            break
        chosen = divisor
    return min(chosen, dimension // chosen), max(chosen, dimension // chosen)


@dataclass(kw_only=True)
class LoKrConfig(LycorisConfig):
    """LoKr hyper-parameters, named and defaulted as in PEFT's ``LoKrConfig``."""

    method = "lokr"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    decompose_both: bool = config_field(False, "also factor W1 as lokr_w1_a @ lokr_w1_b when r < max(a, c)/2")
    decompose_factor: int = config_field(-1, "Kronecker split of each width: -1 near its square root, f > 0: (f, dim/f)")
    rank_dropout_scale: bool = config_field(False, "divide the rank-dropout mask by its mean")
    init_weights: bool | str = config_field(
        True, "True: W1 = 0; 'lycoris': W2 = 0 (both start at the base model); False: all random (tests)")
    allow_factor_fallback: bool = config_field(
        False, "accept a decompose_factor that does not divide a width (PEFT then falls back to its search); "
        "import_peft sets it")

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        for name in ("decompose_both", "rank_dropout_scale", "allow_factor_fallback"):
            check_choice(owner, name, getattr(self, name), [True, False])
        check_choice(owner, "init_weights", self.init_weights, INITS)
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ValueError(f"{owner}: decompose_factor must be -1 (split near the square root) or a positive "
                             f"integer, got {factor!r}")


class LoKrAdapter(Adapter):
    """ΔW = s·W1 ⊗ W2, applied as W1 X W2ᵀ on the input reshaped to (c, d); ΔW is built only for merging."""

    def __init__(self, base: nn.Module, config: LoKrConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        m, n, r, factor = self.out_features, self.in_features, config.r, config.decompose_factor
        if factor > 0 and (m % factor or n % factor) and not config.allow_factor_fallback:
            raise self.fail(
                f"decompose_factor={factor} does not divide both widths (PEFT would silently split them as "
                f"{factorization(m, factor)} x {factorization(n, factor)} instead)",
                f"Use a factor dividing gcd({m}, {n}) = {math.gcd(m, n)}, decompose_factor=-1, exclude this layer, "
                "or set allow_factor_fallback=True to accept PEFT's split",
            )
        (a, b), (c, d) = factorization(m, factor), factorization(n, factor)
        self.shape = (a, b, c, d)
        self.r, self.scaling = r, config.scaling
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rank_dropout_scale = config.rank_dropout_scale
        init = config.init_weights
        # PEFT's draw order: W1 (or w1_a, w1_b), then W2 (or w2_a, w2_b).
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r) if init is True else kaiming((a, r)))
            self.lokr_w1_b = nn.Parameter(kaiming((r, c)))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c) if init is True else kaiming((a, c)))
        if r < max(b, d) / 2:
            self.lokr_w2_a = nn.Parameter(kaiming((b, r)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, d) if init == "lycoris" else kaiming((r, d)))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d) if init == "lycoris" else kaiming((b, d)))
        self.right_first = b * c * (a + d) <= a * d * (b + c)

    def kron_factors(self) -> tuple[Tensor, Tensor]:
        """(W1, W2): (a × c) and (b × d)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        if module_skipped(self, self.module_dropout):
            return base_out
        _, _, c, d = self.shape
        w1, w2 = self.kron_factors()
        grid = x.reshape(-1, c, d)
        update = w1 @ (grid @ w2.T) if self.right_first else (w1 @ grid) @ w2.T  # (N, a, b)
        update = update.reshape(base_out.shape)
        if self.training and self.rank_dropout:
            keep = row_keep_mask(self.out_features, self.rank_dropout, self.rank_dropout_scale, torch.float32, x.device)
            update = update * keep.to(update.dtype)
        return add_into_output(base_out, update, alpha=self.scaling)

    def delta_weight(self) -> Tensor:
        return self.scaling * torch.kron(*self.kron_factors())

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: LoKrConfig) -> int:
        (a, b), (c, d) = factorization(out_features, config.decompose_factor), factorization(
            in_features, config.decompose_factor)
        r = config.r
        left = r * (a + c) if config.decompose_both and r < max(a, c) / 2 else a * c
        right = r * (b + d) if r < max(b, d) / 2 else b * d
        return left + right

    def describe(self) -> str:
        a, b, c, d = self.shape
        return f"({a}x{c}) ⊗ ({b}x{d}), r={self.r}, s={self.scaling:g}"


# ----------------------------------------------------------------------------------------------
# PEFT's LoKrConfig <-> ours (same tensor names)
# ----------------------------------------------------------------------------------------------


def _to_peft(config: LoKrConfig) -> dict[str, Any]:
    return {
        **lycoris_peft_fields(config),
        "decompose_both": config.decompose_both,
        "decompose_factor": config.decompose_factor,
        "rank_dropout_scale": config.rank_dropout_scale,
        "init_weights": config.init_weights,
    }


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    return {
        **lycoris_from_peft(peft_config, "LoKr"),
        "decompose_both": bool(peft_config.get("decompose_both", False)),
        "decompose_factor": peft_config.get("decompose_factor", -1),
        "rank_dropout_scale": bool(peft_config.get("rank_dropout_scale", False)),
        "init_weights": peft_config.get("init_weights", True),
        "allow_factor_fallback": True,  # PEFT's fallback split is what its file was trained with
    }


register("lokr", LoKrConfig, LoKrAdapter,
         peft=PeftFormat("LOKR", lambda c: True, _to_peft, _from_peft, {}, prepare_export=drop_bias_field))
