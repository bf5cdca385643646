"""LoHa: low-rank Hadamard product adaptation, computed as Hugging Face PEFT 0.21.2's ``loha`` tuner.

Papers: "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", Hyeon-Woo,
Ye-Bin, Oh, arXiv:2108.06098 (the Hadamard parameterisation and its He init); "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation" (LyCORIS), Yeh et al., arXiv:2309.14859.
Survey context: "Low-Rank Approximation, Adaptation, and Other Tales", Jun Lu, arXiv:2408.05883.
Reference for tensors and numbers: PEFT 0.21.2 ``tuners/loha`` (Linear, Conv1d, Conv2d).

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

Per-layer rank and alpha (PEFT ``rank_pattern`` / ``alpha_pattern``, shared with LoRA and LoKr:
:class:`~rankwise.core.config.LayerPatterns`): layer ℓ gets r_ℓ and α_ℓ from the first key of each dict that matches
its name by PEFT's rule (:func:`~rankwise.core.config.pattern_key`), else ``r`` and ``alpha``, so s_ℓ = α_ℓ/r_ℓ and its
factors have r_ℓ columns / rows (the Tucker cores r_ℓ × r_ℓ); every formula here is per layer. ``import_peft`` /
``export_peft`` carry both dicts in their order (the first matching key wins).

Init (PEFT ``init_weights=True``): W1a, W1b, W2a Kaiming-uniform(a=√5), i.e. U(±1/√fan_in) with fan-in
r for W1a, W2a (m × r) and n for W1b (r × n), drawn in that order; W2b = 0, so ΔW = 0 at step 0.
``init_weights=False`` draws W2b ~ U(±1/√n) as well (tests only). Same seed, same tensors as PEFT.
Trainable parameters per layer: 2r(m + n).

Convolutions (``nn.Conv1d`` / ``nn.Conv2d`` with C_out, C = C_in/groups, kernel k; :class:`LoHaConvAdapter`, PEFT's
``loha.Conv1d/2d``): ΔW is a kernel of the base's shape and y = base(x) + conv(x, ΔW), convolved as the base
convolves (stride, padding, dilation, groups, padding mode); the kernel is built every forward, as PEFT does (it is
C_out·C·∏k numbers, less than the convolution's own work)::

    flattened (default, and any kernel of size 1):  the formula above on the (C_out, C·∏k) kernel matrix
    Tucker (use_effective_conv2d=True, ∏k > 1):
        ΔW = s · (T1 ×₁ W1aᵀ ×₂ W1bᵀ) ⊙ (T2 ×₁ W2aᵀ ×₂ W2bᵀ),   (T ×₁ Aᵀ ×₂ Bᵀ)[o, i, h] = Σ_{p,q} A[p,o] B[q,i] T[p,q,h]
        T1, T2 = hada_t1, hada_t2 ∈ R^{r×r×k_h×k_w} (a Conv1d's (r, r, k, 1)), W1a, W2a ∈ R^{r×C_out}, W1b, W2b ∈ R^{r×C}

The Tucker cores are drawn last (Kaiming-uniform, fan-in r·∏k). Parameters: 2r(C_out + C·∏k) flattened,
2r(C_out + C) + 2r²∏k Tucker (:meth:`LoHaConvAdapter.expected_conv_params`). Rank dropout masks output channels.

Oracle: PEFT 0.21.2 (outputs, gradients, ΔW, merged weights, seeded init, dropout masks under a
shared seed, adapter files both ways; on Linear, Conv1d and Conv2d layers, tests/test_loha.py and
tests/test_lycoris_conv.py; with per-layer patterns, tests/test_lycoris_patterns.py) and the formulas above computed
densely.

Differences from PEFT, on purpose:
    * If every row is dropped (all k_i = 0) the update is zero; PEFT divides by mean(k) = 0 and returns NaN.
    * ``r > min(m, n)`` is an error for a fresh adapter (W1a W1b can already be any m×n matrix at
      r = min(m, n), so the extra parameters are wasted); PEFT accepts it. ``allow_excess_rank=True``
      accepts it, and ``import_peft`` sets it, so every file PEFT loads imports.
    * transformers ``Conv1D`` (GPT-2) layers work through rankwise's core; PEFT's LoHa raises TypeError
      on them, so ``export_peft`` refuses such a model.
    * Tucker gradients: PEFT's hand-written backward of the Tucker form (``HadaWeightCP``) returns wrong gradients
      for ``hada_w1_a`` and ``hada_w2_a`` (it pairs each with the other Hadamard factor's core product), so PEFT
      trains those two tensors on a wrong gradient; rankwise's are autograd's of the formula (outputs, every other
      gradient and the files are PEFT's).
    * A convolution with a padding mode other than zeros: PEFT convolves ΔW with zero padding, so its unmerged
      forward differs from its merged layer; rankwise pads as the layer does (forward = merge), and ``export_peft``
      / ``import_peft`` refuse such a layer.
    * A fresh Tucker adapter refuses r above max(min(C_out, C·∏k), min(C, C_out·∏k)), the largest multilinear rank
      of the kernel (PEFT accepts any r; ``allow_excess_rank=True`` does too). Conv3d is refused, as PEFT has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import (
    AdapterConfig,
    LayerPatterns,
    check_choice,
    check_positive_int,
    check_positive_number,
    config_field,
)
from ..core.layer import Adapter, add_into_output, is_conv_layer
from ..core.registry import PeftFormat, register

# ----------------------------------------------------------------------------------------------
# What LoHa and LoKr (adapters/lokr.py) share: PEFT's LyCORIS options and dropouts
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LycorisConfig(LayerPatterns, AdapterConfig):
    """The options PEFT's LyCORIS adapters (LoHa, LoKr) share, with PEFT's names and defaults.

    ``rank_pattern`` / ``alpha_pattern`` (:class:`~rankwise.core.config.LayerPatterns`, PEFT's rule) give a layer
    its own r and alpha; each adapter is built from the layer's :meth:`for_layer` config, as PEFT's
    ``_create_and_replace`` passes the matched r and alpha to the layer."""

    r: int = config_field(8, "rank of each low-rank factor pair")
    alpha: float = config_field(8.0, "scaling numerator: s = alpha / r")
    rank_dropout: float = config_field(
        0.0, "training only: probability of dropping each OUTPUT ROW of the update (PEFT's name)")
    module_dropout: float = config_field(0.0, "training only: probability of skipping the whole adapter per forward")
    use_effective_conv2d: bool = config_field(
        False, "convolutions only: a Tucker core over the kernel (hada_t1/t2, lokr_t2) instead of factoring the "
        "flattened kernel; off for kernel size 1 (PEFT's name and rule)")

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_positive_number(owner, "alpha", self.alpha)
        self.check_patterns()
        check_choice(owner, "use_effective_conv2d", self.use_effective_conv2d, [True, False])
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {value!r}")

    @property
    def scaling(self) -> float:
        """s = alpha / r of a layer without pattern entries (a layer's own: ``for_layer(name).scaling``)."""
        return self.alpha / self.r


def module_skipped(adapter: nn.Module, probability: float) -> bool:
    """PEFT's module dropout: in training, one ``torch.rand(1)`` per forward; skip the adapter when it is ≤ p.

    The draw happens at p = 0 too (the random stream stays PEFT's), but is not compared then: a branch on a
    tensor's value would break ``torch.compile``'s graph in every training forward."""
    if not adapter.training:
        return False
    draw = torch.rand(1)
    return probability > 0 and bool(draw <= probability)


def row_keep_mask(rows: int, probability: float, rescale: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """PEFT's "rank" dropout mask over the update's output rows: [torch.rand(rows) > p], drawn on the CPU
    generator as PEFT draws it, optionally divided by its mean (0 stays 0 when every row is dropped)."""
    keep = (torch.rand(rows) > probability).to(dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1.0 / rows)  # the mean is 0 or >= 1/rows: this only guards 0/0
    return keep.to(device)


def lycoris_peft_fields(config: LycorisConfig) -> dict[str, Any]:
    """The PEFT config fields LoHa and LoKr share (``use_effective_conv2d`` changes convolutions only; Linear
    layers ignore it in PEFT and here; the patterns are written as PEFT's dicts, ``{}`` for none)."""
    return {"r": config.r, "alpha": config.alpha, "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout, "use_effective_conv2d": config.use_effective_conv2d,
            "rank_pattern": dict(config.rank_pattern or {}), "alpha_pattern": dict(config.alpha_pattern or {})}


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
        "use_effective_conv2d": bool(peft_config.get("use_effective_conv2d", False)),
        "rank_pattern": dict(peft_config.get("rank_pattern") or {}) or None,
        "alpha_pattern": dict(peft_config.get("alpha_pattern") or {}) or None,
    }


def drop_bias_field(model: nn.Module, payload: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """``export_peft`` hook: PEFT's LoHa and LoKr configs have no ``bias`` field (PEFT would warn about it)."""
    payload.pop("bias", None)


def kaiming(shape: tuple[int, ...]) -> Tensor:
    """A tensor drawn as PEFT draws LyCORIS factors: Kaiming-uniform(a=√5) = U(±1/√fan_in), fan_in the product
    of every dimension after the first (shape[1] for a matrix, r·∏kernel for a Tucker core)."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


# ----------------------------------------------------------------------------------------------
# Convolutions (PEFT's LyCORIS Conv1d / Conv2d): ΔW is a kernel, the input is convolved with it
# ----------------------------------------------------------------------------------------------


def refuse_conv3d(adapter: Adapter, method: str) -> None:
    """PEFT 0.21.2's LoHa and LoKr adapt Conv1d and Conv2d only (a Conv3d is a TypeError there): refuse it."""
    base = adapter.base_layer
    if base.weight.dim() != 3 and base.weight.dim() != 4:
        raise adapter.fail(
            f"{type(base).__name__} with kernel {tuple(base.kernel_size)}: {method} adapts nn.Conv1d and nn.Conv2d "
            f"only (as PEFT 0.21.2, whose {method} raises TypeError on other convolutions)",
            "Leave this layer out of targets (or exclude it), or use lora, which adapts nn.Conv3d",
        )


def uses_tucker(base: nn.Module, config: LycorisConfig) -> bool:
    """PEFT's rule: ``use_effective_conv2d`` takes effect on a kernel with more than one element (a 1x1 Conv2d or
    a kernel-1 Conv1d is a per-pixel linear map, factored like a Linear layer)."""
    return config.use_effective_conv2d and math.prod(base.kernel_size) > 1


def core_shape(base: nn.Module, r: int) -> tuple[int, int, int, int]:
    """A Tucker core (r, r, k_h, k_w); a Conv1d's kernel k is stored as (k, 1), as PEFT stores it."""
    kernel = tuple(base.kernel_size)
    return (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)


def tucker_kernel(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    """The (C_out, C_in/groups, k_h, k_w) kernel core ×₁ out_factorᵀ ×₂ in_factorᵀ: entry (o, i, h, w) is
    Σ_{p,q} out_factor[p, o] · in_factor[q, i] · core[p, q, h, w] (out_factor (r, C_out), in_factor (r, C_in/groups))."""
    return torch.einsum("pqhw,po,qi->oihw", core, out_factor, in_factor)


def padding_refusal(base: nn.Module, method: str) -> str | None:
    """Why PEFT's LoHa / LoKr do not reproduce a convolution padded other than with zeros, or None."""
    if is_conv_layer(base) and base.padding_mode != "zeros":
        return (f"padding_mode={base.padding_mode!r}; PEFT 0.21.2's {method} convolves the input with ΔW under zero "
                "padding (it passes the base's padding, not its padding mode), so its unmerged forward is neither its "
                "own merged layer nor rankwise's base + conv(x, ΔW) padded as the layer pads")
    return None


def convolve(base: nn.Module, x: Tensor, kernel: Tensor) -> Tensor:
    """``x`` convolved with ``kernel`` (the base's weight shape) as the base convolves it: its stride, padding,
    dilation, groups *and* padding mode, no bias. So base(x) + convolve(x, ΔW) is the merged layer's output."""
    return base._conv_forward(x, kernel.reshape(base.weight.shape), None)


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

    #: A convolution builds a :class:`LoHaConvAdapter` (``__new__``), which refuses Conv3d as PEFT does.
    layer_kinds = ("linear", "conv")

    def __new__(cls, base: nn.Module | None = None, config: LoHaConfig | None = None, layer_name: str = "") -> Self:
        """``LoHaAdapter(base, config)`` builds a :class:`LoHaConvAdapter` for a convolution."""
        conv = base is not None and is_conv_layer(base) and not issubclass(cls, LoHaConvAdapter)
        return super().__new__(LoHaConvAdapter if conv else cls)

    def __init__(self, base: nn.Module, config: LoHaConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        config = config.for_layer(layer_name)  # the layer's r and alpha (rank_pattern / alpha_pattern)
        self.r, self.scaling = config.r, config.scaling
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self._build_factors(config)

    def check_rank(self, limit: int, what: str, config: LoHaConfig) -> None:
        """Refuse r above ``limit`` (where the extra rank can express nothing more) unless allow_excess_rank."""
        if self.r > limit and not config.allow_excess_rank:
            raise self.fail(
                f"rank r={self.r} exceeds {what}={limit}",
                f"Use r <= {limit} (in rank_pattern too), exclude this layer from targets, or set allow_excess_rank=True "
                "(as PEFT does; the extra rank is wasted)",
            )

    def _build_factors(self, config: LoHaConfig) -> None:
        """The four (m × r, r × n) factors, drawn in PEFT's order: w1_a, w1_b, w2_a, then w2_b (zero, or random
        with init_weights=False)."""
        m, n, r = self.out_features, self.in_features, config.r
        self.check_rank(min(m, n), "min(out, in)", config)
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


class LoHaConvAdapter(LoHaAdapter):
    """LoHa on ``nn.Conv1d`` / ``nn.Conv2d`` (C_out, C_in/groups, kernel k), as PEFT 0.21.2's ``loha.Conv1d/2d``.

    ΔW is a kernel of the base's shape, and the forward convolves the input with it as the base convolves
    (stride, padding, dilation, groups, padding mode): y = base(x) + conv(x, ΔW). Building ΔW (C_out·C_in/G·∏k
    numbers, as PEFT does) costs far less than the convolution itself, so this forward has no factored path.

    * Flattened (``use_effective_conv2d=False``, or a kernel of size 1): Linear LoHa on the (C_out, C_in/G·∏k)
      kernel matrix: the same tensors, init and rank limit, with n = C_in/G·∏k.
    * Tucker (``use_effective_conv2d=True`` and ∏k > 1): each Hadamard factor is a Tucker product,
      ΔW = s · (T1 ×₁ W1aᵀ ×₂ W1bᵀ) ⊙ (T2 ×₁ W2aᵀ ×₂ W2bᵀ), with cores T1, T2 = hada_t1, hada_t2 (r, r, k_h, k_w;
      a Conv1d's (r, r, k, 1)), W1a, W2a = hada_w1_a, hada_w2_a (r, C_out), W1b, W2b = hada_w1_b, hada_w2_b
      (r, C_in/G). Init (PEFT's order): w1_a, w1_b, w2_a Kaiming-uniform, w2_b = 0 (random with
      init_weights=False), then t1, t2 Kaiming-uniform (fan-in r·∏k). Parameters 2r(C_out + C_in/G) + 2r²∏k.
      A fresh adapter refuses r above the largest multilinear rank such a kernel can have,
      max(min(C_out, C_in/G·∏k), min(C_in/G, C_out·∏k)) (beyond it each core can already be any kernel).

    Rank dropout scales output channel o of ΔW (PEFT's row mask), module dropout skips the whole update.
    Conv3d is refused (PEFT has no LoHa for it).
    """

    layer_kinds = ("conv",)

    def _build_factors(self, config: LoHaConfig) -> None:
        refuse_conv3d(self, "LoHa")
        self.tucker = uses_tucker(self.base_layer, config)
        if not self.tucker:
            super()._build_factors(config)
            self.khatri_rao = False  # the update is a kernel: convolved, never applied per patch
            return
        base, r = self.base_layer, config.r
        m, c_in, taps = base.out_channels, base.in_channels // base.groups, math.prod(base.kernel_size)
        self.check_rank(max(min(m, c_in * taps), min(c_in, m * taps)), "the largest multilinear rank of the kernel",
                        config)
        self.hada_w1_a = nn.Parameter(kaiming((r, m)))
        self.hada_w1_b = nn.Parameter(kaiming((r, c_in)))
        self.hada_w2_a = nn.Parameter(kaiming((r, m)))
        self.hada_w2_b = nn.Parameter(kaiming((r, c_in)) if not config.init_weights else torch.zeros(r, c_in))
        self.hada_t1 = nn.Parameter(kaiming(core_shape(base, r)))
        self.hada_t2 = nn.Parameter(kaiming(core_shape(base, r)))
        self.khatri_rao = False

    def hadamard(self) -> Tensor:
        """The unscaled update as the (C_out, C_in/G·∏k) kernel matrix."""
        if not self.tucker:
            return super().hadamard()
        first = tucker_kernel(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
        second = tucker_kernel(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        return (first * second).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        if module_skipped(self, self.module_dropout):
            return base_out
        return add_into_output(base_out, convolve(self.base_layer, x, self.hadamard() * self.row_scale()))

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: LoHaConfig) -> int:
        """Without the kernel the Tucker count is unknown: see :meth:`expected_conv_params`."""
        raise NotImplementedError("LoHa's parameter count on a convolution needs the layer: expected_conv_params")

    @staticmethod
    def expected_conv_params(conv: nn.Module, config: LoHaConfig) -> int:
        """2r(C_out + C_in/G·∏k) flattened; 2r(C_out + C_in/G) + 2r²∏k with the Tucker cores."""
        r, taps, c_in = config.r, math.prod(conv.kernel_size), conv.in_channels // conv.groups
        if uses_tucker(conv, config):
            return 2 * r * (conv.out_channels + c_in) + 2 * r * r * taps
        return 2 * r * (conv.out_channels + c_in * taps)

    def describe(self) -> str:
        form = f"Tucker cores {tuple(self.hada_t1.shape)}" if self.tucker else "flattened kernel"
        return f"r={self.r}, s={self.scaling:g}, {form}, forward=conv with ΔW"


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
         peft=PeftFormat("LOHA", lambda c: True, _to_peft, _from_peft, {}, prepare_export=drop_bias_field,
                         refuse_layer=lambda base, config: padding_refusal(base, "LoHa")))
