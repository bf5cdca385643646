"""MiSS (formerly Bone) and Bat: one shared block tiled over the shards of the weight.

Paper: "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure",
Jiale Kang, Qingyu Yin, arXiv:2409.15371 (v1–v5 titled "Bone: Block-Affine Adaptation ...";
v1's "Bone" structure is today's "Bat"). The reference is Hugging Face PEFT 0.21.2's ``miss``
tuner, written by the author; rankwise computes the same outputs, merged weights and gradients.

W ∈ R^{m×n} (out × in), y = x Wᵀ + b, r = shard size along the inputs (``r``)::

    default ("miss", = Bone v4+):  D ∈ R^{r×m} (miss_block), zeros.
        ΔW[o, c] = D[c mod r, o],  i.e. ΔW = [Dᵀ Dᵀ … Dᵀ] (⌈n/r⌉ copies, the last cut to n mod r)
        y = base(x) + x̄ D,   x̄ = Σ_k x̃[..., kr:(k+1)r],   x̃ = dropout(x zero-padded to a multiple of r)
    mini:  d ∈ R^{r×mini_r}, zeros, tiled along the outputs: D = [d d … d], m % mini_r == 0.
        y = base(x) + tile(x̄ d)   (x̄ d is broadcast over the output tiles; d is never tiled)
    bat (Bone v1):  D ∈ R^{(m/r)×r×r}, zeros; for the r×r block W_ij (output block i, input block j)
        W'_ij = W_ij + (W_ij + I) D_i = W_ij (I + D_i) + D_i,   y = x W'ᵀ + b,   n % r == 0 and m % r == 0.
    init_weights=False (tests): the default (r, m) block drawn Kaiming-uniform(a=√5), i.e. U(±1/√m),
        exactly PEFT's draw (the same seed gives PEFT's block).

No α, no scaling (PEFT ignores scaling for MiSS). Trainable parameters per layer: r·m (default),
r·mini_r (mini), (m/r)·r² = r·m (bat). Dropout acts on the branch input only, never on the base
path, and on the padded x exactly as in PEFT, so one seed draws PEFT's mask (default, mini).

Bat's update depends on W itself, so the forward cannot add a cheap term to the base output: it
builds W' block by block (O(mnr)) and computes the whole output ``x W'ᵀ + b`` in one GEMM; the
frozen ``base(x)`` is never computed (``uses_base_output = False``).

Oracle: PEFT 0.21.2's ``miss`` (outputs, gradients, dropout masks under a shared seed, merged
weights, adapter files both ways), plus the index formula for the default ΔW. Merge and unmerge
of default and mini add and subtract ΔW: exact up to float rounding. Bat merge writes W' (it never
refuses, except ``safe=True`` on non-finite results); bat unmerge solves X (I + D_i) = W'_ij − D_i
per output block (PEFT multiplies by a float32 inverse instead). It refuses with a ValueError,
leaving the merged weights untouched (every merged layer is checked before any is unmerged:
``check_unmergeable``), exactly when some I + D_i has 2-norm condition number
≥ 1/ε (ε: machine epsilon of the merge dtype, float32 for half-precision bases), i.e. is
singular to working precision (this includes an exactly singular or non-finite I + D_i);
otherwise it recovers W up to a relative error of order cond(I + D_i)·ε.

Where we differ from PEFT, on purpose:
    * Default mode sums the shards of x with one reshape (no padded copy of x when n % r == 0)
      and adds x̄ D to the base output in one fused ``addmm``; mini multiplies by the small d and
      broadcasts the result over the output tiles instead of tiling d to r×m first.
    * Bat applies no dropout in PEFT; rankwise refuses ``dropout > 0`` with bat rather than
      silently ignoring it (importing a PEFT bat adapter drops its inert dropout).
    * mini with ``m % mini_r != 0`` and bat with a width not divisible by ``r`` raise ValueError
      naming the layer (PEFT raises too, with a less specific message). Default mode keeps PEFT's
      zero padding for ``n % r != 0`` (a partial last shard), which is exact.
    * transformers Conv1D layers are supported through the core's (out, in) view (PEFT: Linear only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_choice, check_dropout, check_positive_int, config_field
from ..core.layer import Adapter
from ..core.registry import PeftFormat, register

_VARIANTS = (True, False, "bat", "mini")


@dataclass(kw_only=True)
class MissConfig(AdapterConfig):
    """MiSS hyper-parameters, named and defaulted as in PEFT's ``MissConfig``.

    The learning rate does not carry over from LoRA: ΔW is unscaled and every input shard feeds
    the gradient of D (the authors train with 2e-5, about 10× below typical LoRA rates).
    """

    method = "miss"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    r: int = config_field(64, "shard size along the input dimension (rank of ΔW is at most r)")
    dropout: float = config_field(0.0, "dropout on the input before the shard sum (not with bat)")
    init_weights: bool | str = config_field(
        True, "True: MiSS (zero block); 'mini': block tiled along the outputs too; 'bat': Bat; False: random block"
    )
    mini_r: int = config_field(1, "width of the mini block along the outputs (init_weights='mini')")

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_positive_int(owner, "mini_r", self.mini_r)
        check_dropout(owner, self.dropout)
        check_choice(owner, "init_weights", self.init_weights, list(_VARIANTS))
        if self.init_weights == "bat" and self.dropout > 0:
            raise ValueError(f"{owner}: bat applies no dropout (as in PEFT); set dropout=0.0 or use init_weights=True")


class MissAdapter(Adapter):
    """One trainable block D shared by every shard; see the module docstring for the variants."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: MissConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.r = config.r
        self.variant = config.init_weights if isinstance(config.init_weights, str) else "miss"
        self.uses_base_output = self.variant != "bat"
        self._check_fits(config)
        self.miss_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        m, r = self.out_features, self.r
        shape = {"miss": (r, m), "mini": (r, config.mini_r), "bat": (m // r, r, r)}[self.variant]
        self.miss_block = nn.Parameter(torch.zeros(shape))
        if config.init_weights is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))

    def _check_fits(self, config: MissConfig) -> None:
        m, n, r = self.out_features, self.in_features, self.r
        if r > n:
            raise self.fail(f"shard size r={r} exceeds in_features={n}", f"Use r <= {n} or exclude this layer")
        if self.variant == "bat" and (n % r or m % r):
            raise self.fail(
                f"bat needs in_features and out_features divisible by r={r}",
                f"Pick r dividing both {n} and {m} (e.g. {math.gcd(math.gcd(m, n), r)}) or use init_weights=True",
            )
        if self.variant == "mini" and m % config.mini_r:
            raise self.fail(
                f"mini needs out_features divisible by mini_r={config.mini_r}",
                f"Pick mini_r dividing {m} (e.g. {math.gcd(m, config.mini_r)})",
            )

    # -- default and mini --------------------------------------------------------------------

    def shard_sum(self, x: Tensor) -> Tensor:
        """x̄ = Σ_k x̃[..., kr:(k+1)r], x̃ = dropout(x zero-padded to a multiple of r).

        Dropout acts on the padded input, as in PEFT, so one seed draws PEFT's mask (a padded entry
        is zero whether it is dropped or not).
        """
        pad = -self.in_features % self.r
        if pad:
            x = F.pad(x, (0, pad))
        return self.miss_dropout(x).reshape(*x.shape[:-1], -1, self.r).sum(dim=-2)

    def shared_block(self) -> Tensor:
        """D ∈ R^{r×m}: the trained block, tiled along the outputs for mini."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, self.out_features // self.miss_block.shape[1])
        return self.miss_block

    def _shared_forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        summed = self.shard_sum(x).reshape(-1, self.r)
        flat_out = base_out.reshape(-1, self.out_features)
        if self.variant == "mini":
            mini_r = self.miss_block.shape[1]
            small = (summed @ self.miss_block).unsqueeze(1)  # broadcast over the m / mini_r output tiles
            out = flat_out.view(-1, self.out_features // mini_r, mini_r) + small
        else:
            out = torch.addmm(flat_out, summed, self.miss_block)
        return out.view(base_out.shape)

    # -- bat ---------------------------------------------------------------------------------

    def _blocks(self, weight: Tensor) -> Tensor:
        """W as (m/r, n/r, r, r): entry [i, j] is the block of output rows i·r… and input columns j·r…."""
        r = self.r
        return weight.reshape(self.out_features // r, r, self.in_features // r, r).transpose(1, 2)

    def _unblocks(self, blocks: Tensor) -> Tensor:
        return blocks.transpose(1, 2).reshape(self.out_features, self.in_features)

    def bat_weight(self, weight: Tensor) -> Tensor:
        """W' = W + ΔW(W), block by block W'_ij = W_ij (I + D_i) + D_i: one batched matmul, ΔW never built alone."""
        block = self.miss_block.to(weight.dtype).unsqueeze(1)
        eye = torch.eye(self.r, dtype=weight.dtype, device=weight.device)
        return self._unblocks(self._blocks(weight) @ (eye + block) + block)

    # -- the contract ------------------------------------------------------------------------

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.variant == "bat":  # one GEMM with W + Δ(W); the wrapper skipped W x (uses_base_output)
            weight = self.base_weight().to(x.dtype)
            bias = self.base_bias()
            return F.linear(x, self.bat_weight(weight), None if bias is None else bias.to(x.dtype))
        return self._shared_forward(x, base_out)

    def delta_weight(self) -> Tensor:
        if self.variant == "bat":
            weight = self.base_weight().to(self.miss_block.dtype)
            return self.bat_weight(weight) - weight
        tiled = self.shared_block().T.repeat(1, -(-self.in_features // self.r))
        return tiled[:, : self.in_features]

    def merged_weight(self, weight: Tensor) -> Tensor:
        if self.variant == "bat":
            return self.bat_weight(weight)
        return super().merged_weight(weight)

    def _unmerge_system(self, dtype: torch.dtype) -> Tensor:
        """The (m/r, r, r) matrices I + D_i in ``dtype`` that bat's unmerge solves with; ``ValueError`` when one is
        singular to working precision (2-norm condition number ≥ 1/ε of ``dtype``), as unmerging then fails."""
        block = self.miss_block.detach().to(dtype)
        system = torch.eye(self.r, dtype=dtype, device=block.device) + block
        condition = torch.linalg.cond(system)  # 2-norm; inf (or NaN) for a singular (or non-finite) I + D_i
        limit = 1.0 / torch.finfo(dtype).eps
        if not bool((condition < limit).all()):
            worst = int(torch.nan_to_num(condition, nan=torch.inf).argmax())
            raise ValueError(
                f"bat layer '{self.layer_name}' (out_features={self.out_features}, in_features={self.in_features}, "
                f"r={self.r}): I + D_{worst} has condition number {condition[worst].item():.3g} >= 1/eps = {limit:.3g} "
                f"({dtype}), i.e. it is singular to working precision, so the merged weight cannot be "
                "unmerged (the merge lost information); the weight is left merged and unchanged. Reload the "
                "original base weights to undo it."
            )
        return system

    def check_unmergeable(self, dtype: torch.dtype) -> None:
        """Bat: refuse when some I + D_i is singular to working precision in ``dtype`` (:meth:`_unmerge_system`),
        checked on every merged layer before any is unmerged. The other variants subtract ΔW, which always works."""
        if self.variant == "bat":
            self._unmerge_system(dtype)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        if self.variant != "bat":
            return super().unmerged_weight(weight)
        block = self.miss_block.to(weight.dtype)
        system = self._unmerge_system(weight.dtype)
        # X (I + D_i) = W'_ij − D_i for every block (solved from the right).
        return self._unblocks(torch.linalg.solve(system.unsqueeze(1), self._blocks(weight) - block.unsqueeze(1), left=False))

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: MissConfig) -> int:
        return config.r * (config.mini_r if config.init_weights == "mini" else out_features)

    def describe(self) -> str:
        return f"{self.variant}, r={self.r}, block={tuple(self.miss_block.shape)}"


# ----------------------------------------------------------------------------------------------
# PEFT's MissConfig <-> ours (tensor name miss_block on both sides)
# ----------------------------------------------------------------------------------------------


def _to_peft(config: MissConfig) -> dict[str, Any]:
    return {"r": config.r, "miss_dropout": config.dropout, "mini_r": config.mini_r, "init_weights": config.init_weights}


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    init = peft_config.get("init_weights", True)
    return {
        "r": int(peft_config.get("r", 64)),
        "dropout": 0.0 if init == "bat" else float(peft_config.get("miss_dropout", 0.0)),
        "mini_r": int(peft_config.get("mini_r", 1)),
        "init_weights": init,
    }


register("miss", MissConfig, MissAdapter, peft=PeftFormat("MISS", lambda c: True, _to_peft, _from_peft, {}))
