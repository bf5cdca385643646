"""LoKr: low-rank Kronecker product adaptation, computed as Hugging Face PEFT 0.21.2's ``lokr`` tuner.

Paper: "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation" (LyCORIS),
Yeh et al., arXiv:2309.14859; Kronecker adapters: "KronA: Parameter Efficient Tuning with Kronecker
Adapter", Edalati et al., arXiv:2212.10650. Survey context: "Low-Rank Approximation, Adaptation, and
Other Tales", Jun Lu, arXiv:2408.05883. Reference for tensors and numbers: PEFT 0.21.2 ``tuners/lokr`` (Linear,
Conv1d, Conv2d).

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

Per-layer rank and alpha (PEFT ``rank_pattern`` / ``alpha_pattern``, as LoRA and LoHa:
:class:`~rankwise.core.config.LayerPatterns`): layer ℓ gets r_ℓ and α_ℓ from the first key of each dict that matches
its name by PEFT's rule, else ``r`` and ``alpha``; s_ℓ = α_ℓ/r_ℓ, and r_ℓ also decides which factors are full
(r_ℓ < max(b, d)/2 above), as in PEFT. ``import_peft`` / ``export_peft`` carry both dicts in their order.

Convolutions (``nn.Conv1d`` / ``nn.Conv2d`` with C_out = a·b, C = C_in/groups = c·d, kernel k;
:class:`LoKrConvAdapter`, PEFT's ``lokr.Conv1d/2d``): the channels are split as the widths above and the kernel goes
with W2, ΔW[(i, j), (p, q), h] = s · W1[i, p] · W2[j, q, h], i.e. s · W1 ⊗ W2 on the (C_out, C·∏k) kernel matrix
with W2 ∈ R^{b×d·∏k}. W2 is ``lokr_w2`` (b, d, *k) when r ≥ max(b, d)/2; else with ``use_effective_conv2d`` and
∏k > 1 the Tucker product T ×₁ W2aᵀ ×₂ W2bᵀ (core ``lokr_t2`` (r, r, k_h, k_w), a Conv1d's (r, r, k, 1),
W2a = ``lokr_w2_a`` (r, b), W2b = ``lokr_w2_b`` (r, d)); else ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·∏k).
The forward builds the kernel (as PEFT) and computes y = base(x) + conv(x, ΔW) as the base convolves (stride,
padding, dilation, groups, padding mode). A Conv1d with a full ``lokr_w2`` takes PEFT's order,
ΔW[(j, i), (q, p), h] = s · W2[j, q, h] · W1[i, p] (PEFT's ``torch.kron`` of a matrix and a 3-D tensor puts W2's
indices first): the same family of updates, reproduced so that PEFT's files mean the same here.

Oracle: PEFT 0.21.2 (outputs, gradients, ΔW, merged weights, seeded init, factorization on every width
up to 512, dropout masks under a shared seed, adapter files both ways; on Linear, Conv1d and Conv2d layers,
tests/test_lokr.py and tests/test_lycoris_conv.py; with per-layer patterns, tests/test_lycoris_patterns.py) and the
Kronecker products densely.

Differences from PEFT, on purpose: the forward never builds the m×n ΔW (PEFT builds it every forward);
transformers ``Conv1D`` layers work through rankwise's core (PEFT raises TypeError, so ``export_peft``
refuses them). On convolutions: a padding mode other than zeros is padded as the layer pads (PEFT pads ΔW with
zeros, so its forward is not its merge; such layers are refused by ``export_peft`` / ``import_peft``); a Tucker core
on a kernel whose last size is 1 (a Conv1d, a (k, 1) Conv2d) is computed as the Kronecker kernel W1 ⊗ (T ×₁ W2aᵀ ×₂
W2bᵀ), where PEFT's ``torch.kron`` raises at every forward and merge (so it is refused both ways too); Conv3d is
refused, as PEFT has no LoKr for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor, nn

from ..core.config import check_choice, config_field
from ..core.layer import Adapter, add_into_output, is_conv_layer
from ..core.registry import PeftFormat, register
from .loha import (
    LycorisConfig,
    convolve,
    core_shape,
    drop_bias_field,
    kaiming,
    lycoris_from_peft,
    lycoris_peft_fields,
    module_skipped,
    padding_refusal,
    refuse_conv3d,
    row_keep_mask,
    tucker_kernel,
    uses_tucker,
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

    #: A convolution builds a :class:`LoKrConvAdapter` (``__new__``), which refuses Conv3d as PEFT does.
    layer_kinds = ("linear", "conv")

    def __new__(cls, base: nn.Module | None = None, config: LoKrConfig | None = None, layer_name: str = "") -> Self:
        """``LoKrAdapter(base, config)`` builds a :class:`LoKrConvAdapter` for a convolution."""
        conv = base is not None and is_conv_layer(base) and not issubclass(cls, LoKrConvAdapter)
        return super().__new__(LoKrConvAdapter if conv else cls)

    def __init__(self, base: nn.Module, config: LoKrConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        config = config.for_layer(layer_name)  # the layer's r and alpha (rank_pattern / alpha_pattern)
        self.r, self.scaling = config.r, config.scaling
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rank_dropout_scale = config.rank_dropout_scale
        self._build_factors(config)

    def split(self, widths: tuple[int, int], config: LoKrConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, b), (c, d)): PEFT's factorization of the output and input widths; refuses a decompose_factor that
        does not divide both unless allow_factor_fallback."""
        m, n = widths
        factor = config.decompose_factor
        if factor > 0 and (m % factor or n % factor) and not config.allow_factor_fallback:
            raise self.fail(
                f"decompose_factor={factor} does not divide both widths {m} and {n} (PEFT would silently split them "
                f"as {factorization(m, factor)} x {factorization(n, factor)} instead)",
                f"Use a factor dividing gcd({m}, {n}) = {math.gcd(m, n)}, decompose_factor=-1, exclude this layer, "
                "or set allow_factor_fallback=True to accept PEFT's split",
            )
        return factorization(m, factor), factorization(n, factor)

    def _build_factors(self, config: LoKrConfig) -> None:
        """W1 (or w1_a, w1_b), then W2 (or w2_a, w2_b): PEFT's draw order."""
        (a, b), (c, d) = self.split((self.out_features, self.in_features), config)
        self.shape = (a, b, c, d)
        self._build_w1(a, c, config)
        r, init = config.r, config.init_weights
        if r < max(b, d) / 2:
            self.lokr_w2_a = nn.Parameter(kaiming((b, r)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, d) if init == "lycoris" else kaiming((r, d)))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d) if init == "lycoris" else kaiming((b, d)))
        self.right_first = b * c * (a + d) <= a * d * (b + c)

    def _build_w1(self, a: int, c: int, config: LoKrConfig) -> None:
        """W1 (a × c), zero with init_weights=True; a low-rank product with decompose_both and r < max(a, c)/2."""
        r, init = config.r, config.init_weights
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r) if init is True else kaiming((a, r)))
            self.lokr_w1_b = nn.Parameter(kaiming((r, c)))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c) if init is True else kaiming((a, c)))

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


class LoKrConvAdapter(LoKrAdapter):
    """LoKr on ``nn.Conv1d`` / ``nn.Conv2d`` (C_out, C_in/groups = C, kernel k), as PEFT 0.21.2's ``lokr.Conv1d/2d``.

    The channel widths are split as on a Linear layer, C_out = a·b and C = c·d (:func:`factorization`); the
    kernel goes with W2. In the (C_out, C·∏k) kernel-matrix view ΔW = s · W1 ⊗ W2 with W1 (a × c) as on a Linear
    layer and W2 (b × d·∏k), so ΔW[(i, j), (p, q), h] = s · W1[i, p] · W2[j, q, h]. W2 is

    * ``lokr_w2`` (b, d, *k) when r ≥ max(b, d)/2 (PEFT's rule, the kernel not counted);
    * else with ``use_effective_conv2d`` and ∏k > 1 the Tucker product T ×₁ W2aᵀ ×₂ W2bᵀ, core ``lokr_t2``
      (r, r, k_h, k_w; a Conv1d's (r, r, k, 1)), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d);
    * else ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·∏k).

    A Conv1d with a full ``lokr_w2`` takes PEFT's order, ΔW[(j, i), (q, p), h] = s·W2[j, q, h]·W1[i, p]
    (``swapped``; see the module docstring). Init and draw order as on Linear layers, then the core (Kaiming-uniform, fan-in r·∏k). The forward builds the
    kernel (as PEFT) and convolves the input with it as the base convolves (stride, padding, dilation, groups,
    padding mode): y = base(x) + conv(x, ΔW). Rank dropout masks output channels of ΔW; Conv3d is refused (PEFT
    has no LoKr for it). Parameters: (a·c or r(a + c)) + (b·d·∏k, r(b + d) + r²∏k, or r(b + d·∏k)).
    """

    layer_kinds = ("conv",)

    def _build_factors(self, config: LoKrConfig) -> None:
        refuse_conv3d(self, "LoKr")
        base, r, init = self.base_layer, config.r, config.init_weights
        kernel, taps = tuple(base.kernel_size), math.prod(base.kernel_size)
        (a, b), (c, d) = self.split((base.out_channels, base.in_channels // base.groups), config)
        self.shape = (a, b, c, d * taps)
        self._build_w1(a, c, config)
        self.tucker = False
        self.swapped = r >= max(b, d) / 2 and len(kernel) == 1
        if r >= max(b, d) / 2:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel) if init == "lycoris" else kaiming((b, d, *kernel)))
        elif uses_tucker(base, config):
            self.tucker = True
            self.lokr_w2_a = nn.Parameter(kaiming((r, b)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, d) if init == "lycoris" else kaiming((r, d)))
            self.lokr_t2 = nn.Parameter(kaiming(core_shape(base, r)))
        else:
            self.lokr_w2_a = nn.Parameter(kaiming((b, r)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, d * taps) if init == "lycoris" else kaiming((r, d * taps)))

    def kron_factors(self) -> tuple[Tensor, Tensor]:
        """(W1, W2) as (a × c) and (b × d·∏k) matrices."""
        if not self.tucker:
            w1, w2 = super().kron_factors()
            return w1, w2.flatten(1)
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        return w1, tucker_kernel(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b).flatten(1)

    def kernel_matrix(self) -> Tensor:
        """The unscaled update as the (C_out, C·∏k) kernel matrix: W1 ⊗ W2, or PEFT's swapped order for a Conv1d
        with a full ``lokr_w2`` (class docstring)."""
        w1, w2 = self.kron_factors()
        if self.swapped:
            w2 = self.lokr_w2  # (b, d, k): ΔW[(j, i), (q, p), h] = W2[j, q, h] · W1[i, p]
            return torch.einsum("jqh,ip->jiqph", w2, w1).reshape(self.out_features, self.in_features)
        return torch.kron(w1, w2)

    def delta_weight(self) -> Tensor:
        return self.scaling * self.kernel_matrix()

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        if module_skipped(self, self.module_dropout):
            return base_out
        kernel = self.kernel_matrix() * self.scaling
        if self.training and self.rank_dropout:
            keep = row_keep_mask(self.out_features, self.rank_dropout, self.rank_dropout_scale, torch.float32, x.device)
            kernel = kernel * keep.to(kernel.dtype)[:, None]
        return add_into_output(base_out, convolve(self.base_layer, x, kernel))

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: LoKrConfig) -> int:
        """Without the kernel the split is unknown: see :meth:`expected_conv_params`."""
        raise NotImplementedError("LoKr's parameter count on a convolution needs the layer: expected_conv_params")

    @staticmethod
    def expected_conv_params(conv: nn.Module, config: LoKrConfig) -> int:
        """The closed form of the class docstring."""
        r, taps = config.r, math.prod(conv.kernel_size)
        (a, b), (c, d) = (factorization(w, config.decompose_factor) for w in (conv.out_channels,
                                                                             conv.in_channels // conv.groups))
        left = r * (a + c) if config.decompose_both and r < max(a, c) / 2 else a * c
        if r >= max(b, d) / 2:
            right = b * d * taps
        elif uses_tucker(conv, config):
            right = r * (b + d) + r * r * taps
        else:
            right = r * (b + d * taps)
        return left + right

    def describe(self) -> str:
        a, b, c, d = self.shape
        core = f", Tucker core {tuple(self.lokr_t2.shape)}" if self.tucker else ""
        return f"({a}x{c}) ⊗ ({b}x{d}), r={self.r}, s={self.scaling:g}{core}, forward=conv with ΔW"


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


def _peft_refusal(base: nn.Module, config: LoKrConfig) -> str | None:
    """Why PEFT 0.21.2's LoKr does not compute this layer as rankwise does: a padding mode other than zeros, or a
    Tucker core ``lokr_t2`` on a kernel whose last size is 1 (a Conv1d, a (k, 1) Conv2d), where PEFT's
    ``torch.kron`` of the (b, d, k, 1) core product raises "view size is not compatible" at every forward and merge."""
    refusal = padding_refusal(base, "LoKr")
    if refusal is not None or not is_conv_layer(base) or not uses_tucker(base, config):
        return refusal
    (_, b), (_, d) = (factorization(w, config.decompose_factor) for w in (base.out_channels,
                                                                         base.in_channels // base.groups))
    if config.r < max(b, d) / 2 and (len(base.kernel_size) == 1 or base.kernel_size[-1] == 1):
        return (f"kernel_size={base.kernel_size} and use_effective_conv2d=True; PEFT 0.21.2's LoKr builds the Tucker "
                "core lokr_t2 here but its torch.kron raises at every forward and merge of it (a kernel whose last "
                "size is 1)")
    return None


register("lokr", LoKrConfig, LoKrAdapter,
         peft=PeftFormat("LOKR", lambda c: True, _to_peft, _from_peft, {}, prepare_export=drop_bias_field,
                         refuse_layer=_peft_refusal))
