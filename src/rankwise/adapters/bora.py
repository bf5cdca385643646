"""BoRA: LoRA directions with trainable magnitudes along both the output and the input features.

Paper: "BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation", Wang, Fan, Bao, Jiang, Song,
arXiv:2412.06441. No official code and no PEFT module exist, and the paper's body could not be
read; the formula below is rankwise's reconstruction from the abstract, the Fig. 1 caption,
summaries and two independent third-party implementations (both normalise rows first, then
columns, with both magnitudes initialised from W0's norms), and the oracle is a dense
implementation of it written in tests/test_bora.py.

W0 ∈ R^{m×n} (out × in), LoRA direction V = W0 + s·B·A (A ∈ R^{r×n}, B ∈ R^{m×r}, s = α/r)::

    order="row_then_col" (default):  H  = diag(g_out / ‖V‖_row) V
                                     W' = H diag(g_in / ‖H‖_col)
    order="col_then_row":            H  = V diag(g_in / ‖V‖_col)
                                     W' = diag(g_out / ‖H‖_row) H
    y = x W'ᵀ + b = ((x ⊙ d_in) W0ᵀ + s ((x ⊙ d_in) Aᵀ) Bᵀ) ⊙ d_out + b

with g_out ∈ R^m (``bora_magnitude_out``, DoRA's magnitude) and g_in ∈ R^n (``bora_magnitude_in``,
BoRA's addition) initialised to the row and column norms of W0, and B = 0, so W' = W0 at step 0.
Trainable parameters per layer: r(m + n) + m + n.

The norms are computed without forming V or H (O(mnr) flops, O(r(m + n)) extra memory):
Σ_j w_j V_ij² = (W0² w)_i + 2s Σ_k B_ik (W0 diag(w) Aᵀ)_ik + s² Σ_kl B_ik B_il (A diag(w) Aᵀ)_kl,
and the column version is the same formula on Vᵀ = W0ᵀ + s Aᵀ Bᵀ. The second normalisation
weights the first step's scale (w = d²), so its first term multiplies W0 ⊙ W0 by a vector: a
transient m×n square, kept for the backward only when ``detach_norms=False``. The output is built
from W0 itself (``uses_base_output = False``, so the wrapper skips the frozen layer's own matmul):
per token one base-sized matmul, W0 applied to the input-scaled x, plus LoRA's r(m + n), i.e. the
cost of a LoRA layer; the norms add O(mnr) per forward, independent of the number of tokens.

Decisions (open questions while the paper body is unavailable; the first two are config fields):
    * ``order="row_then_col"``: DoRA's step first, BoRA's new one second (what both third-party
      implementations do).
    * ``detach_norms=True``: both norms are constants for the gradient (DoRA's convention, and one
      third-party implementation's); ``False`` differentiates through them (the other one's).
    * Dropout acts on the LoRA branch's input only (x̃ = dropout(x) in s((x̃ ⊙ d_in) Aᵀ) Bᵀ); the
      norms and the W0 path see the undropped x and weights, so with dropout = 0 or in eval mode
      the forward is exactly x W'ᵀ + b. (Of the third-party implementations, one refuses dropout,
      the other drops A's input columns, i.e. inside ΔW and both norms.)
    * A zero row or column norm (a pruned unit) gets scale 1 instead of 0/0 = NaN.
    * Merging caches d_out and d_in of the unmerged weight, since unmerge cannot recompute them, and
      the entries of W0 in rows with d_out = 0 or columns with d_in = 0 (a zero magnitude), which
      merge to zero and cannot be divided back out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import check_choice, config_field
from ..core.registry import register
from .lora import LoRAAdapter, LoRAConfig

ORDERS = ("row_then_col", "col_then_row")


@dataclass(kw_only=True)
class BoRAConfig(LoRAConfig):
    """LoRA's hyper-parameters plus the order of the two normalisations and norm detaching."""

    method = "bora"

    order: str = config_field("row_then_col", "which magnitude is applied first: row_then_col or col_then_row")
    detach_norms: bool = config_field(True, "treat both norms as constants in the backward pass (DoRA convention)")

    def validate(self) -> None:
        super().validate()
        check_choice(type(self).__name__, "order", self.order, ORDERS)
        check_choice(type(self).__name__, "detach_norms", self.detach_norms, [True, False])
        if self.lora_bias:
            raise ValueError("BoRAConfig: lora_bias is not supported with BoRA; set lora_bias=False")


def weighted_row_sq_norms(weight: Tensor, A: Tensor, B: Tensor, s: float, w: Tensor | None = None) -> Tensor:
    """Σ_j w_j V_ij² for every row i of V = weight + s·B·A (w_j = 1 when ``w`` is None), V never formed."""
    if w is None:
        base = torch.linalg.vector_norm(weight, dim=1).square()
        A_w = A
    else:
        base = weight.square() @ w
        A_w = A * w
    cross = ((weight @ A_w.T) * B).sum(dim=1)
    low_rank = ((B @ (A_w @ A.T)) * B).sum(dim=1)
    return (base + 2 * s * cross + s * s * low_rank).clamp_min(0)


def magnitude_ratio(magnitude: Tensor, sq_norm: Tensor) -> Tensor:
    """g / ‖·‖, with 1 where the norm is zero (a zero row or column stays zero either way)."""
    zero = sq_norm == 0
    return torch.where(zero, torch.ones_like(magnitude), magnitude / torch.where(zero, 1.0, sq_norm).sqrt())


class BoRAAdapter(LoRAAdapter):
    """W' = diag(d_out) (W0 + s·B·A) diag(d_in); the LoRA factors and forward come from LoRAAdapter."""

    uses_base_output = False  # the output is built from W itself; the wrapper skips its W x
    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: BoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.order = config.order
        self.detach_norms = config.detach_norms
        with torch.no_grad():
            weight = self.base_weight()
            weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
            self.bora_magnitude_out = nn.Parameter(torch.linalg.vector_norm(weight, dim=1))
            self.bora_magnitude_in = nn.Parameter(torch.linalg.vector_norm(weight, dim=0))
        self._merge_scales: tuple[Tensor, Tensor] | None = None
        self._merge_lost: Tensor | None = None

    def scales(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(d_out, d_in): the per-output and per-input factors of W' = diag(d_out) V diag(d_in)."""
        A, B, s = self.lora_A.weight, self.lora_B.weight, self.scaling
        weight = weight.to(A.dtype)
        norms = torch.no_grad if self.detach_norms else contextlib.nullcontext

        def rows(w: Tensor | None) -> Tensor:
            with norms():
                return weighted_row_sq_norms(weight, A, B, s, w)

        def cols(w: Tensor | None) -> Tensor:
            with norms():
                return weighted_row_sq_norms(weight.T, B.T, A.T, s, w)

        if self.order == "row_then_col":
            d_out = magnitude_ratio(self.bora_magnitude_out, rows(None))
            d_in = magnitude_ratio(self.bora_magnitude_in, cols(d_out.square()))
        else:
            d_in = magnitude_ratio(self.bora_magnitude_in, cols(None))
            d_out = magnitude_ratio(self.bora_magnitude_out, rows(d_in.square()))
        return d_out, d_in

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        weight = self.base_weight()
        d_out, d_in = self.scales(weight)
        plain = F.linear(x * d_in, weight.to(x.dtype))
        out = self.low_rank_output(self.lora_dropout(x) * d_in, plain) * d_out
        bias = self.base_bias()
        return out if bias is None else out + bias.to(out.dtype)

    def dense_weight(self, weight: Tensor, d_out: Tensor, d_in: Tensor) -> Tensor:
        """W' = diag(d_out) (W + s·B·A) diag(d_in)."""
        return d_out[:, None] * (weight + self.low_rank_weight().to(weight.dtype)) * d_in

    def merged_weight(self, weight: Tensor) -> Tensor:
        d_out, d_in = (d.to(weight.dtype) for d in self.scales(weight))
        self._merge_scales = (d_out, d_in)
        self._merge_lost = weight[(d_out[:, None] == 0) | (d_in == 0)].clone()
        return self.dense_weight(weight, d_out, d_in)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        if self._merge_scales is None:
            raise ValueError(f"BoRA layer '{self.layer_name}' was not merged by rankwise, so it cannot be unmerged")
        d_out, d_in = self._merge_scales
        lost = (d_out[:, None] == 0) | (d_in == 0)
        restored = weight / torch.where(d_out == 0, 1.0, d_out)[:, None] / torch.where(d_in == 0, 1.0, d_in)
        restored = restored - self.low_rank_weight().to(weight.dtype)
        restored[lost] = self._merge_lost
        self._merge_scales = self._merge_lost = None
        return restored

    def delta_weight(self) -> Tensor:
        """W' − W0 (full rank in general; merging uses :meth:`merged_weight`)."""
        weight = self.base_weight().to(self.lora_A.weight.dtype)
        return self.dense_weight(weight, *self.scales(weight)) - weight

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: BoRAConfig) -> int:
        return super().expected_num_params(out_features, in_features, config) + out_features + in_features

    def describe(self) -> str:
        return f"{super().describe()}, {self.order}"


register("bora", BoRAConfig, BoRAAdapter)
