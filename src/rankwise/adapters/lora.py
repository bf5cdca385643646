"""LoRA, rsLoRA and DoRA, computed exactly as Hugging Face PEFT 0.21.2 computes them.

Papers:
    * "LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685.
    * "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA), Kalajdzievski,
      arXiv:2312.03732.
    * "DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., ICML 2024, arXiv:2402.09353.

LoRA (W ∈ R^{m×n}, y = x Wᵀ + b)::

    ΔW = s · B A,   A ∈ R^{r×n} (lora_A),  B ∈ R^{m×r} (lora_B),  s = α/r  (rsLoRA: s = α/√r)
    y  = base(x) + s · B A dropout(x)          (dropout on the adapter branch only)

Init (PEFT ``init_lora_weights``): ``True`` gives A ~ kaiming_uniform(a=√5) = U(−1/√n, 1/√n) and
B = 0, so ΔW = 0 at step 0; ``"gaussian"`` gives A ~ N(0, 1/r²), B = 0; ``False`` leaves B random
(for tests only). With ``lora_bias`` B also has a bias b_B (zero init) and the merge adds s·b_B to
the layer's bias (unmerge subtracts it). Trainable parameters per layer: r(m + n) (+ m with
``lora_bias``).

Per-layer rank and alpha (PEFT ``rank_pattern`` / ``alpha_pattern``): layer ℓ gets r_ℓ and α_ℓ from the
first pattern key that matches its name by PEFT's rule (:func:`~rankwise.core.config.pattern_key`), else
``r`` and ``alpha``; s_ℓ = α_ℓ/r_ℓ (α_ℓ/√r_ℓ with rsLoRA). ``import_peft`` / ``export_peft`` carry both dicts unchanged.
GoRA (:mod:`rankwise.allocation.gora`) stores its allocated ranks this way.

Two inits start from the base weight itself and move their initial update out of it, so the
adapted model still computes W at step 0 (W_res + s·B₀A₀ = W), exactly as PEFT 0.21.2 does:

    * ``"pissa"`` ("PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
      Language Models", Meng et al., arXiv:2404.02948): the exact SVD W = U S Vᵀ, then
      A₀ = diag(√(S_r/s)) V_rᵀ, B₀ = U_r diag(√(S_r/s)) and W_res = W − s·B₀A₀ (the base keeps the
      minor singular components).
    * ``"olora"`` ("OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", Büyükakyüz,
      arXiv:2406.01775): the QR decomposition W = QR, then A₀ = R_r (first r rows), B₀ = Q_r (first
      r columns) and W_res = W − s·B₀A₀.

Both are computed in float32 (float64 for a float64 base) and W_res is cast back to the base dtype,
as PEFT does. The base change happens in :meth:`LoRAAdapter.attach`, once every layer has been
validated; ``unmerge`` and ``unload(merge=False)`` leave the *residual* W_res in the model (as PEFT's
``unload``), and ``unload(merge=True)`` gives W_res + s·BA. An adapter trained this way only makes
sense on the base it was initialised from: ``load`` / ``import_peft`` recompute W_res from the
original base, which is how PEFT reloads such adapters (saved without conversion). With
``allow_excess_rank`` and r > min(m, n) the factors have min(m, n) columns (the SVD / QR has no
more), while s still uses r, as in PEFT. PEFT's EVA, orthogonal and MiCA inits leave the base alone, so
``import_peft`` loads their trained adapters as a plain LoRA (:data:`TRAINED_FROM_FILE_INITS`).

DoRA (PEFT ``use_dora=True``)::

    W' = diag(g / c) (W + s B A),   c_i = ‖W_i + s (B A)_i‖₂  treated as a constant (detached)
    y  = base(x) + (g/c − 1) ⊙ (W x̃) + (g/c) ⊙ (s B A x̃)

with magnitude g ∈ R^m (``lora_magnitude_vector``) initialised to c at creation. x̃ = x in eval
mode or without dropout (then W x̃ is the base output minus its bias, no extra matmul); in
training with dropout x̃ = dropout(x) and W x̃ is recomputed: exactly PEFT's semantics, which
differ from W' dropout(x) (paper §4.3 / PEFT ``DoraLinearVariant.forward``). Trainable parameters:
r(m + n) + m.

Quantised bases (QLoRA: bitsandbytes ``Linear4bit`` NF4 / FP4 and ``Linear8bitLt``, :mod:`rankwise.core.quantised`):
the base output is the quantised layer's own forward, as in PEFT's ``lora.bnb`` layers; DoRA's W is the
dequantised weight, read afresh at every forward (as PEFT does, never stored), with c computed in float32.
PiSSA and OLoRA rewrite W and are refused on a quantised layer (PEFT refuses them too). Merging dequantises,
merges and re-quantises with a warning stating the rounding error; unmerge restores the original quantised
weight bit for bit (PEFT subtracts through a second re-quantisation).

Convolution and embedding layers (targets that name them; ``"all-linear"`` does not), as PEFT 0.21.2's
``lora.Conv1d/2d/3d`` and ``lora.Embedding``: ``LoRAAdapter(base, config)`` builds
:class:`LoRAConvAdapter` / :class:`LoRAEmbeddingAdapter` (:class:`DoRAConvAdapter` /
:class:`DoRAEmbeddingAdapter` for DoRA). Both are the formulas above on the layer's weight matrix
(:func:`~rankwise.core.layer.weight_matrix`): the (C_out, C_in·∏k) flattened kernel, whose A and B are a
C_in → r convolution and a 1×1 r → C_out convolution, and the (d, V) transposed embedding table, whose
A (r, V) and B (d, r) are PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` (zero A, N(0, 1) B at init). DoRA
takes one magnitude per output channel / embedding dimension. See the classes for grouped convolutions,
dilation and padding modes, and what is refused.

Where we differ from PEFT, on purpose:
    * c is computed without the m×n matrix W + sBA:
      c_i² = ‖W_i‖² + 2s ⟨(W Aᵀ)_i, B_i⟩ + s² B_i (A Aᵀ) B_iᵀ, O(mnr) flops and O(mr) memory.
    * c and the initial g are always computed in float32 (float64 for a float64 base), also on a
      float16 / bfloat16 base, so g/c = 1 exactly at init. PEFT takes the initial g in the base dtype
      (g/c − 1 up to ~4e-3 on bfloat16) and c in float32 in the forward. c stays float32 under
      ``torch.autocast`` (autocast is switched off for it) and on a model cast to bfloat16 afterwards;
      g/c is then rounded to the input's dtype once.
    * A zero row (c_i = 0, e.g. a pruned output unit) gets g/c = 1 instead of PEFT's 0/0 = NaN;
      the row of W' is zero either way, so nothing else changes.
    * A row with g_i = 0 (and c_i > 0) merges to zero, which cannot be divided back out; merge keeps
      those rows of W and unmerge puts them back (PEFT's unmerge returns NaN there).
    * ``r > min(m, n)`` is an error for a fresh adapter (rank(BA) <= min(m, n), so the extra
      parameters are wasted); PEFT silently accepts it. ``allow_excess_rank=True`` accepts it, and
      ``import_peft`` sets it, so every adapter file PEFT loads imports.
    * PiSSA / OLoRA on a half-precision base keep B₀, A₀ in float32 (PEFT rounds them through the
      base dtype before its float32 autocast, so its W_res + s·B₀A₀ is off W by that rounding).
      They also work on a float64 base (PEFT raises).
    * OLoRA factorises the (m, n) weight also on a transformers ``Conv1D`` layer; PEFT's OLoRA
      factorises the stored (n, m) matrix there (a shape error at the forward, or on a square layer
      an init that changes the model), so such PEFT files are refused by ``import_peft`` and such
      rankwise adapters by ``export_peft``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import (
    AdapterConfig,
    LayerPatterns,
    check_choice,
    check_dropout,
    check_positive_int,
    check_positive_number,
    config_field,
    pattern_key,  # noqa: F401  (re-exported: PEFT's rule, shared with LoHa / LoKr)
)
from ..core.layer import Adapter, add_into_output, is_conv_layer, layer_kind
from ..core.rank import FactorProduct, RankComponents, TwoFactors
from ..core.registry import PeftFormat, register

BASE_CHANGING_INITS = ("pissa", "olora")
# (method, layer kind) -> the adapter class LoRAAdapter(...) builds for it (filled below the classes).
_LAYER_VARIANTS: dict[tuple[str, str | None], type[LoRAAdapter]] = {}


@dataclass(kw_only=True)
class LoRAConfig(LayerPatterns, AdapterConfig):
    """LoRA hyper-parameters, named and defaulted as in PEFT's ``LoraConfig``."""

    method = "lora"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    r: int = config_field(8, "rank of the update B·A")
    alpha: float = config_field(8.0, "scaling numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = config_field(0.0, "dropout probability on the adapter branch's input")
    use_rslora: bool = config_field(False, "rank-stabilised scaling s = alpha / sqrt(r)")
    init_weights: bool | str = config_field(
        True,
        "True: kaiming A, zero B; 'gaussian': N(0, 1/r^2) A, zero B; 'pissa': SVD (PiSSA); 'olora': QR (OLoRA), "
        "both subtract their initial update from the base weight; False: random B",
    )
    lora_bias: bool = config_field(False, "train a bias on B as well (merged into the layer's bias)")
    allow_excess_rank: bool = config_field(
        False, "accept r > min(out, in) (PEFT does; the extra rank is wasted). import_peft sets it"
    )

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_positive_number(owner, "alpha", self.alpha)
        self.check_patterns()
        check_dropout(owner, self.dropout)
        check_choice(owner, "use_rslora", self.use_rslora, [True, False])
        check_choice(owner, "init_weights", self.init_weights, [True, False, "gaussian", *BASE_CHANGING_INITS])
        check_choice(owner, "lora_bias", self.lora_bias, [True, False])
        check_choice(owner, "allow_excess_rank", self.allow_excess_rank, [True, False])
        if self.lora_bias and self.init_weights not in (True, False):
            raise ValueError(
                f"{owner}: lora_bias=True works with init_weights=True or False only (as in PEFT, which refuses to "
                f"load anything else), got init_weights={self.init_weights!r}"
            )

    def scaling_of(self, layer_name: str) -> float:
        """s of layer ``layer_name``: alpha / r, or alpha / sqrt(r) with ``use_rslora``, from its pattern entries."""
        r, alpha = self.rank_of(layer_name), self.alpha_of(layer_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def factor_width(self, out_features: int, in_features: int, layer_name: str = "") -> int:
        """Columns of B (rows of A): the layer's rank, or at most min(out, in) for the SVD / QR inits, which
        have no more."""
        r = self.rank_of(layer_name)
        if self.init_weights in BASE_CHANGING_INITS:
            return min(r, out_features, in_features)
        return r

    @property
    def changes_base_weights(self) -> bool:
        return self.init_weights in BASE_CHANGING_INITS

    @property
    def scaling(self) -> float:
        """s of a layer without pattern entries."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclass(kw_only=True)
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: LoRA's, plus the magnitude vector that DoRA always trains."""

    method = "dora"

    def validate(self) -> None:
        super().validate()
        if self.lora_bias:
            raise ValueError("DoRAConfig: lora_bias is not supported with DoRA (as in PEFT); set lora_bias=False")


@contextlib.contextmanager
def full_precision(like: Tensor) -> Iterator[torch.dtype]:
    """``torch.autocast`` off on ``like``'s device; yields the dtype to compute in: float32, or float64 for a
    float64 ``like`` (never half precision). For the weight norms of DoRA and BoRA."""
    with torch.autocast(like.device.type, enabled=False):
        yield torch.promote_types(like.dtype, torch.float32)


class LoRAAdapter(RankComponents, TwoFactors, Adapter):
    """ΔW = s·B·A, applied as two thin matmuls; the dense B·A is only built for merging.

    Rank components (for allocators, ``rankwise.core.rank``): row i of A with column i of B; masking
    zeroes column i of B (A's row keeps its gradient, so the optimiser may revive it); new components
    get A rows as at init and zero B columns. The scale s stays α/r of the rank the adapter was built with.
    Two factors (for LoRA-Pro): A = ``lora_A.weight``, B = ``lora_B.weight``, s, and ΔW = s·B·A exactly
    (a subclass that rescales W₀ + s·B·A sets ``product_is_update = False``).
    """

    masked_tensor = "lora_B.weight"
    product_is_update = True

    def __new__(cls, base: nn.Module | None = None, config: LoRAConfig | None = None, layer_name: str = "") -> Self:
        """``LoRAAdapter(base, config)`` builds the class for the base's layer kind: :class:`LoRAConvAdapter` or
        :class:`LoRAEmbeddingAdapter` (DoRA's subclasses for ``dora``), else ``cls`` itself."""
        variant = None if base is None or config is None else _LAYER_VARIANTS.get((config.method, layer_kind(base)))
        return super().__new__(variant if variant is not None and issubclass(variant, cls) else cls)

    def __init__(self, base: nn.Module, config: LoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        smallest = min(self.out_features, self.in_features)
        rank = config.rank_of(layer_name)
        if rank > smallest and not config.allow_excess_rank:
            raise self.fail(
                f"rank r={rank} exceeds min(out, in)={smallest}",
                f"Use r <= {smallest} (in rank_pattern too), exclude this layer from targets, or set "
                "allow_excess_rank=True (as PEFT does; the extra rank is wasted)",
            )
        self.r = rank
        self.scaling = config.scaling_of(layer_name)
        self.init = config.init_weights
        width = config.factor_width(self.out_features, self.in_features, layer_name)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._build_factors(width, config.lora_bias)
        self._init_factors(config.init_weights)

    def _build_factors(self, width: int, bias: bool) -> None:
        """Create A (``lora_A``) and B (``lora_B``, with a bias when ``bias``) for this layer kind."""
        self.lora_A = nn.Linear(self.in_features, width, bias=False)
        self.lora_B = nn.Linear(width, self.out_features, bias=bias)

    @torch.no_grad()
    def _init_factors(self, init: bool | str) -> None:
        """The inits that do not read the base (PiSSA and OLoRA are done by :meth:`attach`)."""
        if init is False or init in BASE_CHANGING_INITS:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    @property
    def changes_base(self) -> bool:
        """True for the inits (PiSSA, OLoRA) that move their initial update out of the base weight."""
        return self.init in BASE_CHANGING_INITS

    @torch.no_grad()
    def attach(self) -> None:
        """PiSSA / OLoRA: set B₀, A₀ from the base weight and replace W by W_res = W − s·B₀A₀."""
        if not self.changes_base:
            return
        weight = self.base_weight()
        work = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        width = self.lora_A.weight.shape[0]
        if self.init == "pissa":
            U, S, Vh = torch.linalg.svd(work, full_matrices=False)
            root = (S[:width] / self.scaling).sqrt()
            A, B = root[:, None] * Vh[:width], U[:, :width] * root
        else:
            Q, R = torch.linalg.qr(work)
            A, B = R[:width], Q[:, :width]
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        # (s·B₀)A₀ in this order, as PEFT computes it, so the residual matches PEFT's bit for bit.
        weight.copy_(work - (self.scaling * B) @ A)

    def low_rank_output(self, x: Tensor, base_out: Tensor) -> Tensor:
        """base_out + s·B·A·x, with the scale applied to the r-wide intermediate and one fused addmm."""
        hidden = F.linear(x, self.lora_A.weight) * self.scaling
        out = torch.addmm(
            base_out.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]), self.lora_B.weight.T
        ).view(base_out.shape)
        if self.lora_B.bias is not None:
            out = out + self.scaling * self.lora_B.bias
        return out

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        return self.low_rank_output(self.lora_dropout(x), base_out)

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        """(A, B) as the (r, in_features) and (out_features, r) matrices of the update ΔW = s·B·A."""
        return self.lora_A.weight, self.lora_B.weight

    @torch.no_grad()
    def set_factor_matrices(self, A: Tensor, B: Tensor) -> None:
        """Write an (r, in_features) A and an (out_features, r) B into the factors, in their layout (a kernel for a
        convolution): the inverse of :meth:`factor_matrices`, for code that builds a LoRA from matrices."""
        (a, _), (b, _) = self.rank_tensors().values()
        a.copy_(A.reshape(a.shape))
        b.copy_(B.reshape(b.shape))

    def low_rank_weight(self) -> Tensor:
        """s·B·A, the dense low-rank update."""
        A, B = self.factor_matrices()
        return self.scaling * (B @ A)

    def delta_weight(self) -> Tensor:
        return self.low_rank_weight()

    def delta_bias(self) -> Tensor | None:
        return None if self.lora_B.bias is None else self.scaling * self.lora_B.bias

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: LoRAConfig) -> int:
        width = config.factor_width(out_features, in_features)
        return width * (out_features + in_features) + (out_features if config.lora_bias else 0)

    def describe(self) -> str:
        return f"r={self.r}, s={self.scaling:g}" + (f", init={self.init}" if self.changes_base else "")

    # -- rank components -------------------------------------------------------------------------

    def rank_tensors(self) -> dict[str, tuple[nn.Parameter, int]]:
        return {"lora_A.weight": (self.lora_A.weight, 0), "lora_B.weight": (self.lora_B.weight, 1)}

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def factor_product(self) -> FactorProduct:
        A, B = self.factor_matrices()
        return FactorProduct(A, B, self.scaling, self.product_is_update)

    def new_components(self, count: int) -> dict[str, Tensor]:
        a = self.lora_A.weight.new_empty(count, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # U(-1/sqrt(n), 1/sqrt(n)), as the init's rows
        return {"lora_A.weight": a, "lora_B.weight": self.lora_B.weight.new_zeros(self.out_features, count)}


class DoRAAdapter(LoRAAdapter):
    """W' = diag(g/c)(W + sBA) with c detached; see the module docstring for the forward.

    s·B·A is added to the direction V = W + sBA, which g/c rescales: ΔW ≠ s·B·A (``product_is_update``
    False), so LoRA-Pro adjusts it only on request, as an update of V (``rankwise.optim.factors``).
    """

    product_is_update = False

    def __init__(self, base: nn.Module, config: DoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(self.base_weight()))
        self._merge_norm: Tensor | None = None
        self._merge_lost_rows: Tensor | None = None

    @torch.no_grad()
    def attach(self) -> None:
        """g = c again, now in the adapter's final dtype (float64 for a float64 base) and, after PiSSA /
        OLoRA changed the base, from W_res + s·B₀A₀ (as in PEFT)."""
        super().attach()
        self.lora_magnitude_vector.copy_(self.weight_norm(self.base_weight()))

    @torch.no_grad()
    def weight_norm(self, weight: Tensor) -> Tensor:
        """c_i = ‖W_i + s(BA)_i‖₂ for every row, without building the m×n sum (no gradient).

        Always computed in float32 (float64 for a float64 adapter), with ``torch.autocast`` off: on a
        half-precision base, under bfloat16 autocast and on a model cast to bfloat16 alike. A bfloat16
        norm would be off by ~4e-3, and g/c − 1 with it.
        """
        (A, B), s = self.factor_matrices(), self.scaling
        with full_precision(A) as dtype:
            A, B, weight = A.to(dtype), B.to(dtype), weight.to(dtype)
            base_sq = torch.linalg.vector_norm(weight, dim=1).square()
            cross = ((weight @ A.T) * B).sum(dim=1)
            low_rank_sq = ((B @ (A @ A.T)) * B).sum(dim=1)
            return (base_sq + 2 * s * cross + s * s * low_rank_sq).clamp_min(0).sqrt()

    def magnitude_scale(self, norm: Tensor) -> Tensor:
        """g / c, with 1 where c = 0 (an all-zero row, for which PEFT returns NaN)."""
        zero = norm == 0
        return torch.where(zero, torch.ones_like(norm), self.lora_magnitude_vector / torch.where(zero, 1.0, norm))

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        """(base_out − W x̃) + (g/c) ⊙ (W x̃ + s·B A x̃): one fused addmm and one addcmul.

        Without dropout (or in eval) W x̃ = base_out − b, so the output is
        (1 − g/c) ⊙ b + (g/c) ⊙ (base_out + s·B A x) and W x is never recomputed.
        """
        weight = self.base_weight()
        scale = self.magnitude_scale(self.weight_norm(weight)).to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            adapted = self.low_rank_output(x, base_out)
            bias = self.base_bias()
            return adapted * scale if bias is None else torch.addcmul((1 - scale) * bias, adapted, scale)
        x = self.lora_dropout(x)
        plain = F.linear(x, weight.to(x.dtype))
        return torch.addcmul(base_out - plain, self.low_rank_output(x, plain), scale)

    def merged_weight(self, weight: Tensor) -> Tensor:
        # c comes from the unmerged weight and is kept, because unmerge cannot recompute it; so are
        # the rows that g/c = 0 sends to zero, because unmerge cannot divide them back out.
        self._merge_norm = self.weight_norm(weight)
        scale = self.magnitude_scale(self._merge_norm).to(weight.dtype)
        self._merge_lost_rows = weight[scale == 0].clone()
        return scale[:, None] * (weight + self.low_rank_weight().to(weight.dtype))

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        if self._merge_norm is None:
            raise ValueError(f"DoRA layer '{self.layer_name}' was not merged by rankwise, so it cannot be unmerged")
        scale = self.magnitude_scale(self._merge_norm).to(weight.dtype)
        lost = scale == 0
        restored = weight / torch.where(lost, 1.0, scale)[:, None] - self.low_rank_weight().to(weight.dtype)
        restored[lost] = self._merge_lost_rows
        self._merge_norm = self._merge_lost_rows = None
        return restored

    def delta_weight(self) -> Tensor:
        """W' − W (full rank in general; merging uses :meth:`merged_weight`)."""
        weight = self.base_weight().to(self.lora_A.weight.dtype)
        scale = self.magnitude_scale(self.weight_norm(weight))
        return scale[:, None] * (weight + self.low_rank_weight()) - weight

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: DoRAConfig) -> int:
        return super().expected_num_params(out_features, in_features, config) + out_features


# ----------------------------------------------------------------------------------------------
# Convolution and embedding layers (PEFT 0.21.2's lora.Conv1d/2d/3d and lora.Embedding)
# ----------------------------------------------------------------------------------------------

_CONV_CLASSES: dict[int, type[nn.Module]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class LoRAConvAdapter(LoRAAdapter):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (C_in → C_out, kernel k, ``groups`` G), as PEFT's ``_ConvNd``.

    A (``lora_A``) is a C_in → r convolution with the base's kernel size, stride, padding, dilation and
    padding mode; B (``lora_B``) a 1×1 C_out ← r convolution with the base's ``groups`` (and a bias with
    ``lora_bias``); y = base(x) + s·B(A(dropout(x))). With G = 1 this is LoRA on the flattened kernel
    W ∈ R^{C_out × C_in·∏k}: ΔW = s·B A with A, B the kernels flattened to (r, C_in·∏k) and (C_out, r), the
    matrix :func:`~rankwise.core.layer.weight_matrix` shows, so merging, DoRA's norms and the rank check
    (r ≤ min(C_out, C_in/G·∏k)) are the linear ones. Init as PEFT: kaiming-uniform A over its fan-in C_in·∏k
    (``"gaussian"``: N(0, 1/r²)), zero B. Parameters: r·C_in·∏k + C_out·r/G (+ C_out with ``lora_bias``), which
    for G = 1 is LoRA's r(out + in) on that matrix (``expected_num_params``).

    Grouped convolutions (G > 1, as PEFT: r must be a multiple of G): output channel o of group g reads the
    A channels g·r/G … (g+1)·r/G − 1, which see *every* input channel, so the update is a dense C_in → C_out
    convolution that no grouped kernel holds; it trains and runs, but merging it (PEFT: NotImplementedError)
    and DoRA (whose norms need that kernel; PEFT's reshapes the wrong numbers without an error) are refused.

    Where we differ from PEFT 0.21.2: A takes the base's dilation and padding mode (PEFT drops them,
    peft#3697: a dilated base fails at the forward, a reflect-padded one computes a different function than
    its merge); ``export_peft`` / ``import_peft`` refuse such layers, which PEFT does not reproduce. PiSSA and
    OLoRA are refused (PEFT raises for convolutions too).
    """

    layer_kinds = ("conv",)

    def _build_factors(self, width: int, bias: bool) -> None:
        base = self.base_layer
        if self.init in BASE_CHANGING_INITS:
            raise self.fail(f"init_weights={self.init!r} factorises a weight matrix, not a convolution kernel "
                            "(PEFT refuses it too)", "Use init_weights=True or 'gaussian' for convolution layers")
        if self.r % base.groups:
            raise self.fail(f"rank r={self.r} is not a multiple of groups={base.groups}",
                            f"Use r divisible by {base.groups} (as PEFT requires), or exclude this layer")
        conv = _CONV_CLASSES[base.weight.dim()]
        self.lora_A = conv(base.in_channels, width, base.kernel_size, base.stride, base.padding, base.dilation,
                           bias=False, padding_mode=base.padding_mode)
        self.lora_B = conv(width, base.out_channels, 1, groups=base.groups, bias=bias)

    def low_rank_output(self, x: Tensor, base_out: Tensor) -> Tensor:
        """base_out + s·B(A(x)) (B's bias scaled too, as PEFT)."""
        return add_into_output(base_out, self.lora_B(self.lora_A(x)), alpha=self.scaling)

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        """The kernels as (r, C_in·∏k) and (C_out, r) matrices; refused for a grouped convolution."""
        groups = self.base_layer.groups
        if groups > 1:
            raise self.fail(
                f"a LoRA update on a grouped convolution (groups={groups}) reads every input channel, so no grouped "
                "kernel holds it: it cannot be merged, and DoRA (whose norms need it) cannot adapt the layer",
                "Keep the adapter unmerged (plain LoRA), or exclude this layer",
            )
        return self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1)

    def factor_product(self) -> FactorProduct:
        """Refused: LoRA-Pro updates A and B as matrices, and a convolution LoRA's A is a kernel."""
        raise self.fail("LoRA-Pro needs the two factors as matrix parameters, and a convolution LoRA's A is a "
                        "convolution kernel", "Train convolution adapters with AdamW, or give LoRA-Pro a model whose "
                        "LoRA targets only linear and embedding layers")

    def check_mergeable(self) -> None:
        self.factor_matrices()

    def factors(self) -> tuple[Tensor, Tensor]:
        raise self.fail("the factors of a convolution LoRA are kernels, not the two matrices that optimisers "
                        "such as LoRA-Pro adjust", "Leave convolution layers out of targets for LoRA-Pro")

    def rank_tensors(self) -> dict[str, tuple[nn.Parameter, int]]:
        self.factor_matrices()  # the rank dim of a grouped B holds r/groups entries: refused there
        return super().rank_tensors()

    def new_components(self, count: int) -> dict[str, Tensor]:
        A, B = self.lora_A.weight, self.lora_B.weight
        a = A.new_empty(count, *A.shape[1:])
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as the init's A kernels (fan-in C_in·∏k)
        return {"lora_A.weight": a, "lora_B.weight": B.new_zeros(B.shape[0], count, *B.shape[2:])}


class LoRAEmbeddingAdapter(LoRAAdapter):
    """LoRA on ``nn.Embedding`` (V tokens, dimension d), as PEFT's ``lora.Embedding``.

    In the linear view (W = E ∈ R^{d×V}, a token is a one-hot x): ΔW = s·B A with A = ``lora_embedding_A`` ∈
    R^{r×V} and B = ``lora_embedding_B`` ∈ R^{d×r}, stored as plain tensors under PEFT's names and shapes, so
    merging adds s·(B A)ᵀ to the stored (V, d) table. Forward: y = E[x] + s·(Aᵀ[x] Bᵀ)·embed_scale, the
    lookup Aᵀ[x] made with the base's ``padding_idx`` (no gradient into that token's column of A) and
    ``scale_grad_by_freq``; ``embed_scale`` is the scalar a scaled embedding class
    (transformers' Gemma3) multiplies its output by, 1 otherwise. Init (PEFT, after loralib, the reverse of
    Linear): A = 0, B ~ N(0, 1) for ``init_weights`` True and ``"gaussian"``; ``False`` draws both from
    N(0, 1). Parameters: r(V + d).

    As PEFT: no dropout on this path (``dropout`` is ignored, which is also loralib's behaviour), and
    ``lora_bias`` is refused. Unlike PEFT, a ``sparse`` base gets a dense gradient for A (r×V, small): a sparse
    gradient cannot flow back through the transpose Aᵀ, and PEFT's backward raises there. Refused where PEFT is silent: PiSSA / OLoRA (PEFT quietly uses the plain init
    instead), ``max_norm`` (PEFT's lookup would renormalise the columns of A in place) and an ``embed_scale``
    with more than one element (PEFT warns and leaves the adapter unscaled).
    """

    layer_kinds = ("embedding",)
    masked_tensor = "lora_embedding_B"

    def _build_factors(self, width: int, bias: bool) -> None:
        base = self.base_layer
        scale = getattr(base, "embed_scale", None)
        refusals = [
            (bias, "lora_bias=True (PEFT refuses it for embeddings too)", "Set lora_bias=False"),
            (self.init in BASE_CHANGING_INITS,
             f"init_weights={self.init!r} is not defined for embeddings (PEFT silently uses the plain init)",
             "Use init_weights=True or 'gaussian'"),
            (base.max_norm is not None,
             (f"max_norm={base.max_norm} renormalises looked-up rows in place (PEFT's lookup would renormalise the "
             "adapter's own A)"), "Adapt an embedding without max_norm"),
            (isinstance(scale, Tensor) and scale.numel() != 1, "its embed_scale has more than one element",
             "Adapt an embedding with a scalar embed_scale"),
        ]
        for refused, problem, fix in refusals:
            if refused:
                raise self.fail(problem, fix)
        self.lora_embedding_A = nn.Parameter(torch.randn(width, self.in_features))
        self.lora_embedding_B = nn.Parameter(torch.randn(self.out_features, width))

    @torch.no_grad()
    def _init_factors(self, init: bool | str) -> None:
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def low_rank_output(self, x: Tensor, base_out: Tensor) -> Tensor:
        """base_out + s·(Aᵀ[x] Bᵀ)·embed_scale."""
        base = self.base_layer
        rows = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, None, 2.0, base.scale_grad_by_freq)
        update = (rows @ self.lora_embedding_B.T) * self.scaling
        scale = getattr(base, "embed_scale", None)
        if scale is not None:
            update = update * (scale.to(update.dtype) if isinstance(scale, Tensor) else scale)
        return add_into_output(base_out, update)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        return self.low_rank_output(x, base_out)

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def delta_bias(self) -> Tensor | None:
        return None

    def rank_tensors(self) -> dict[str, tuple[nn.Parameter, int]]:
        return {"lora_embedding_A": (self.lora_embedding_A, 0), "lora_embedding_B": (self.lora_embedding_B, 1)}

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.factor_matrices()

    def new_components(self, count: int) -> dict[str, Tensor]:
        """Components as at init: zero rows of A, N(0, 1) columns of B (they add nothing to ΔW)."""
        A, B = self.factor_matrices()
        return {"lora_embedding_A": A.new_zeros(count, A.shape[1]),
                "lora_embedding_B": torch.randn(B.shape[0], count, dtype=B.dtype, device=B.device)}


class DoRAConvAdapter(DoRAAdapter, LoRAConvAdapter):
    """DoRA on a convolution (G = 1): one magnitude per output channel, c_o = ‖W_o + s(BA)_o‖ over (C_in, k…).

    PEFT's forward, with x̃ as in the linear DoRA (dropout(x) in training with dropout, else x):
    y = base(x) + (g/c − 1)·conv(x̃, W) + (g/c)·s·B(A(x̃)), where conv(x̃, W) = base(x) − b without dropout.
    The magnitude is stored as a vector (C_out); PEFT files hold it as (1, C_out, 1, …), which
    ``import_peft`` / ``export_peft`` reshape.
    """

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        base = self.base_layer
        channel = (-1,) + (1,) * (base_out.dim() - 2)
        scale = self.magnitude_scale(self.weight_norm(self.base_weight())).view(channel)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = base_out if base.bias is None else base_out - base.bias.to(base_out.dtype).view(channel)
        else:
            x = self.lora_dropout(x)
            plain = base._conv_forward(x, base.weight.to(x.dtype), None)
        return base_out + (scale - 1) * plain + scale * self.scaling * self.lora_B(self.lora_A(x))


class DoRAEmbeddingAdapter(DoRAAdapter, LoRAEmbeddingAdapter):
    """DoRA on an embedding: one magnitude per embedding dimension, c_j = ‖E_j + s(BA)_j‖ over the vocabulary
    (rows of the (d, V) linear view). y = (g/c) ⊙ (E[x] + s·(Aᵀ[x] Bᵀ)·embed_scale), as PEFT (no dropout, no bias)."""

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        scale = self.magnitude_scale(self.weight_norm(self.base_weight()))
        return self.low_rank_output(x, base_out) * scale


_LAYER_VARIANTS.update({
    ("lora", "conv"): LoRAConvAdapter,
    ("lora", "embedding"): LoRAEmbeddingAdapter,
    ("dora", "conv"): DoRAConvAdapter,
    ("dora", "embedding"): DoRAEmbeddingAdapter,
})


# ----------------------------------------------------------------------------------------------
# PEFT's LoraConfig <-> ours
# ----------------------------------------------------------------------------------------------


def _to_peft(config: LoRAConfig) -> dict[str, Any]:
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.method == "dora",
        "init_lora_weights": config.init_weights,
        "lora_bias": config.lora_bias,
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
    }


# PEFT inits that shape only the adapter's starting tensors and leave the base weight alone (EVA: data-driven
# SVD of activations, arXiv:2410.07170; orthogonal A and B; MiCA: minor singular vectors in a frozen B, with
# vanilla LoRA's forward and merge). A saved adapter of these is its tensors: PEFT's reload initialises them and
# then overwrites every one from the file, so import_peft loads them as a plain LoRA (init_weights=True).
TRAINED_FROM_FILE_INITS = ("eva", "orthogonal", "mica")


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in ("gaussian", "olora", "mica"):
        init = init.lower()  # PEFT compares these case-insensitively
    if init in TRAINED_FROM_FILE_INITS:
        init = True
    if init not in (True, False, "gaussian", *BASE_CHANGING_INITS):
        # pissa_niter_K (randomised SVD), corda, loftq and lora_ga change the base in ways the base alone does
        # not determine.
        raise ValueError(
            f"PEFT LoRA field init_lora_weights={init!r} is not reproduced by rankwise (it imports True, False, "
            f"'gaussian', 'pissa', 'olora' and, as their trained tensors, {', '.join(map(repr, TRAINED_FROM_FILE_INITS))}). "
            "Convert the adapter to a plain LoRA with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) or merge it with merge_and_unload"
        )
    if init == "olora" and peft_config.get("fan_in_fan_out"):
        raise ValueError(
            "PEFT LoRA fields init_lora_weights='olora' with fan_in_fan_out=True: PEFT's OLoRA factorises the "
            "transposed Conv1D weight (a shape error, or on a square layer an init that changes the model), so "
            "the adapter cannot be reproduced. Use init_lora_weights='pissa' or True on Conv1D layers"
        )
    return {
        "r": peft_config["r"],
        "alpha": float(peft_config.get("lora_alpha", 8)),
        "dropout": float(peft_config.get("lora_dropout", 0.0)),
        "use_rslora": bool(peft_config.get("use_rslora", False)),
        "init_weights": init,
        "lora_bias": bool(peft_config.get("lora_bias", False)),
        "allow_excess_rank": True,  # PEFT accepts r > min(out, in), so a file it loads must import
        "rank_pattern": dict(peft_config.get("rank_pattern") or {}) or None,
        "alpha_pattern": dict(peft_config.get("alpha_pattern") or {}) or None,
    }


def _peft_refusal(base: nn.Module, config: LoRAConfig) -> str | None:
    """PEFT 0.21.2's conv ``lora_A`` drops the base's dilation and padding mode (peft#3697): such a layer is not
    reproduced."""
    if is_conv_layer(base) and (any(d != 1 for d in base.dilation) or base.padding_mode != "zeros"):
        return (f"dilation={base.dilation} and padding_mode={base.padding_mode!r}; PEFT 0.21.2's LoRA drops both from "
                "lora_A (peft#3697), so a PEFT adapter on it does not compute what rankwise does")
    return None


register(
    "lora",
    LoRAConfig,
    LoRAAdapter,
    peft=PeftFormat("LORA", lambda c: not c.get("use_dora", False), _to_peft, _from_peft, {},
                    refuse_layer=_peft_refusal),
)
register(
    "dora",
    DoRAConfig,
    DoRAAdapter,
    peft=PeftFormat("LORA", lambda c: bool(c.get("use_dora", False)), _to_peft, _from_peft, {},
                    refuse_layer=_peft_refusal),
)
