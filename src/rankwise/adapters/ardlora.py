"""ARD-LoRA: LoRA whose rank per layer and per attention head follows learnable scaling factors.

Paper: "ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of Foundation Models
with Heterogeneous Adaptation Needs", H. U. K. Shinwari and M. Usama, arXiv:2506.18267 (2025).
There is no official code and the paper's method section could not be read past the rank formula
(spec ``methods/ardlora.md``); what the paper states is marked (paper), every other choice is
rankwise's own design and marked (rankwise).

A unit u is one attention head of an attention projection, or a whole layer elsewhere. Each unit
has a learnable scaling factor α_u ≥ 0 (paper) and its effective rank is (paper)::

    r_u = max(1, ⌊r₀ · α_u⌉)                      ⌊x⌉ = ⌊x + ½⌋, rounding half up (rankwise)

capped at the unit's capacity c = ``r_max`` (rankwise; the paper's factors have no stated cap).
A unit holds c components, A_u ∈ R^{c×n_u}, B_u ∈ R^{d_u×c}, and updates its block of W by
(rankwise's layout, spec design (b))::

    ΔW_u = s · B_u diag(g_u) A_u,    g_{u,i} = [i ≤ r_u]   (i = 1..c),    s = alpha / r₀ (fixed)

For ``heads={name: H}`` (q, k, v) the heads split the output rows, d_u = m/H and n_u = n; for
``input_heads={name: H}`` (o_proj) they split the input columns, d_u = m and n_u = n/H; every
other layer is one unit (H = 1, d_u = m, n_u = n). The scale s does not follow r_u (rankwise: it
would couple α to the size of the update).

Gradient through the rounding (rankwise: straight-through). The forward uses the hard gate g; the
backward differentiates the soft gate of spec design (b) in its place::

    g̃_{u,i} = σ((r₀ α_u − i + ½) / τ),     g = g_hard + g̃ − stopgrad(g̃)

so the forward value is exactly the hard gate (the model is always a LoRA of ranks r_u) and
∂L/∂α_u = Σ_i ∂L/∂g_{u,i} · ∂g̃_{u,i}/∂α_u, largest for the components next to the current rank.

Init (rankwise): A Kaiming-uniform as LoRA's, B = 0, α = 1, so ΔW = 0 and every unit starts at
rank r₀. Trainable parameters per layer during training: H·c·(d_u + n_u) + H.

The meta-objective's ℓ1 and total-variation terms, the projection of α and the final shrinking
are :class:`rankwise.allocation.ARDLoRAAllocator` (``rankwise.allocator(model)``). After
``allocator.finalize()`` every layer holds c' = max_u r_u components per unit, the components a
unit does not use are zero and gated off, α is gone and the per-unit ranks are the config's
``rank_pattern`` (so ``rankwise.save`` / ``rankwise.load`` rebuild the shrunk layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..allocation.ardlora import ARDLoRAAllocator
from ..core.config import AdapterConfig, check_dropout, check_positive_int, check_positive_number, config_field
from ..core.layer import Adapter, add_into_output
from ..core.registry import register


@dataclass(kw_only=True)
class ARDLoRAConfig(AdapterConfig):
    """ARD-LoRA hyper-parameters (module docstring); ``r`` and ``alpha`` mean what they mean for LoRA."""

    method = "ardlora"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    r: int = config_field(8, "base rank r0: a unit with scaling factor 1 has rank r0")
    r_max: int | None = config_field(None, "components held per unit, the largest rank a unit can reach (2*r)")
    alpha: float = config_field(8.0, "scaling numerator: s = alpha / r, fixed")
    dropout: float = config_field(0.0, "dropout probability on the adapter branch's input")
    heads: dict[str, int] | None = field(default=None, metadata={
        "help": "{module-name suffix: H}: one scaling factor per head of the output rows (q, k, v projections)"})
    input_heads: dict[str, int] | None = field(default=None, metadata={
        "help": "{module-name suffix: H}: one scaling factor per head of the input columns (output projection)"})
    l1_weight: float = config_field(1e-3, "lambda: weight of the l1 term sum(alpha)")
    tv_weight: float = config_field(1e-3, "beta: weight of the total variation of alpha across layer depth")
    temperature: float = config_field(0.5, "tau of the soft gate whose gradient passes the rounding")
    scale_lr: float | None = config_field(None, "learning rate of the scaling factors in allocator.param_groups")
    rank_pattern: dict[str, list[int]] | None = field(default=None, metadata={
        "help": "{layer: rank of each unit}: fixed ranks, written by allocator.finalize()"})

    @property
    def capacity(self) -> int:
        """c: components per unit during training."""
        return 2 * self.r if self.r_max is None else self.r_max

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        if self.r_max is not None:
            check_positive_int(owner, "r_max", self.r_max)
            if self.r_max < self.r:
                raise ValueError(f"{owner}: r_max ({self.r_max}) must be >= r ({self.r}); a unit starts at rank r")
        check_positive_number(owner, "alpha", self.alpha)
        check_dropout(owner, self.dropout)
        check_positive_number(owner, "temperature", self.temperature)
        for name in ("l1_weight", "tv_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
        if self.scale_lr is not None:
            check_positive_number(owner, "scale_lr", self.scale_lr)
        for field_name in ("heads", "input_heads", "rank_pattern"):
            table = getattr(self, field_name)
            if table is not None and not (isinstance(table, dict) and all(isinstance(k, str) and k for k in table)):
                raise ValueError(f"{owner}: {field_name} must be a dict keyed by module-name suffixes, got {table!r}")
        for field_name in ("heads", "input_heads"):
            for key, count in (getattr(self, field_name) or {}).items():
                check_positive_int(owner, f"{field_name}[{key!r}]", count)
        both = sorted(set(self.heads or {}) & set(self.input_heads or {}))
        if both:
            raise ValueError(f"{owner}: {both} are in both heads and input_heads; a layer splits either its "
                             "output rows or its input columns into heads, not both")
        for key, ranks in (self.rank_pattern or {}).items():
            if (not isinstance(ranks, list) or not ranks
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ranks)):
                raise ValueError(f"{owner}: rank_pattern[{key!r}] must be a non-empty list of ranks >= 1, "
                                 f"one per unit, got {ranks!r}")

    def head_split(self, layer_name: str) -> tuple[int, bool]:
        """``(H, split_input)`` for a layer: its heads and whether they split the input columns."""
        for split_input, table in ((False, self.heads), (True, self.input_heads)):
            for key, count in (table or {}).items():
                if layer_name == key or layer_name.endswith("." + key):
                    return count, split_input
        return 1, False


class ARDLoRAAdapter(Adapter):
    """ΔW_u = s · B_u diag(g_u) A_u per unit u (module docstring), with α_u in ``ard_scale``."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: ARDLoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        heads, self.split_input = config.head_split(layer_name)
        split = self.in_features if self.split_input else self.out_features
        if split % heads:
            side = "in_features" if self.split_input else "out_features"
            raise self.fail(f"{side}={split} is not divisible by the {heads} heads given for it",
                            "Give the layer's true head count in heads / input_heads, or drop it from there")
        self.heads = heads
        self.rows = self.out_features // heads if not self.split_input else self.out_features
        self.cols = self.in_features // heads if self.split_input else self.in_features
        self.base_rank = config.r
        self.scaling = config.alpha / config.r
        self.temperature = config.temperature
        fixed = (config.rank_pattern or {}).get(layer_name)
        if fixed is not None and len(fixed) != heads:
            raise self.fail(f"rank_pattern gives {len(fixed)} ranks for {heads} units",
                            "Use the rank_pattern written by allocator.finalize() for this model and heads")
        self.capacity = max(fixed) if fixed is not None else config.capacity
        limit = min(self.rows, self.cols)
        if self.capacity > limit:
            raise self.fail(f"r_max={self.capacity} exceeds min(rows, cols)={limit} of a unit "
                            f"({self.rows}x{self.cols}, {heads} head(s))", f"Use r_max <= {limit}")
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        c = self.capacity
        a = torch.empty(heads * c, self.cols)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # per row U(-1/sqrt(n_u), 1/sqrt(n_u)), as LoRA's A
        self.lora_A = nn.Parameter(a.view(heads, c, self.cols))
        self.lora_B = nn.Parameter(torch.zeros(heads, self.rows, c))
        if fixed is None:
            self.ard_scale = nn.Parameter(torch.ones(heads))
        else:
            self.register_buffer("head_ranks", torch.tensor(fixed, dtype=torch.long))

    # -- ranks and gates -------------------------------------------------------------------------

    @property
    def fixed(self) -> bool:
        """True once the ranks are fixed (finalized): no scaling factors, the ranks are ``head_ranks``."""
        return not hasattr(self, "ard_scale")

    def unit_ranks(self) -> Tensor:
        """r_u = clamp(⌊r₀ α_u + ½⌋, 1, c) for every unit, shape (H,) (the fixed ranks once finalized)."""
        if self.fixed:
            return self.head_ranks
        with torch.no_grad():
            return torch.floor(self.base_rank * self.ard_scale + 0.5).clamp(1, self.capacity).long()

    def gates(self) -> Tensor:
        """g ∈ R^{H×c}: the hard gate in value, the soft gate's gradient to α (module docstring)."""
        index = torch.arange(1, self.capacity + 1, device=self.lora_A.device)
        hard = (index <= self.unit_ranks().to(index.device)[:, None]).to(self.lora_A.dtype)
        if self.fixed:
            return hard
        soft = torch.sigmoid((self.base_rank * self.ard_scale[:, None] - index + 0.5) / self.temperature)
        return hard + (soft - soft.detach())

    # -- the update ------------------------------------------------------------------------------

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        x = self.lora_dropout(x)
        gates = self.gates() * self.scaling
        if self.split_input:
            z = torch.einsum("...hn,hcn->...hc", x.unflatten(-1, (self.heads, self.cols)), self.lora_A) * gates
            update = torch.einsum("...hc,hmc->...m", z, self.lora_B)
        else:
            z = F.linear(x, self.lora_A.flatten(0, 1)).unflatten(-1, (self.heads, self.capacity)) * gates
            update = torch.einsum("...hc,hdc->...hd", z, self.lora_B).flatten(-2)
        return add_into_output(base_out, update)

    def delta_weight(self) -> Tensor:
        blocks = torch.einsum("hdc,hcn->hdn", self.lora_B * (self.gates() * self.scaling)[:, None, :], self.lora_A)
        if self.split_input:
            return blocks.transpose(0, 1).flatten(1)  # (m, H, n/H) -> (m, n)
        return blocks.flatten(0, 1)  # (H, m/H, n) -> (m, n)

    @torch.no_grad()
    def shrink(self) -> list[int]:
        """Fix the ranks r_u: keep c' = max_u r_u components per unit, zero the gated-off ones, drop α.

        The output changes by Σ over the dropped components of s · g · B_i A_i x, which is 0 because every
        dropped component has g = 0 (up to float summation order). Returns the ranks. Build the optimiser
        after shrinking: the factors are new parameters.
        """
        ranks = self.unit_ranks().clone()
        keep = int(ranks.max())
        used = torch.arange(1, keep + 1, device=ranks.device) <= ranks[:, None]
        self.lora_A = nn.Parameter(self.lora_A[:, :keep].clone(), requires_grad=self.lora_A.requires_grad)
        b = self.lora_B[:, :, :keep] * used[:, None, :].to(self.lora_B)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)
        del self.ard_scale
        self.register_buffer("head_ranks", ranks)
        self.capacity = keep
        return [int(r) for r in ranks]

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: ARDLoRAConfig,
                            layer_name: str = "") -> int:
        """H·c·(d_u + n_u) + H during training, H from ``layer_name`` (one unit, c·(m + n) + 1, without it)."""
        heads, split_input = config.head_split(layer_name)
        rows, cols = (out_features, in_features // heads) if split_input else (out_features // heads, in_features)
        return heads * (config.capacity * (rows + cols) + 1)

    def describe(self) -> str:
        ranks = self.unit_ranks().tolist()
        return f"ranks={ranks} of c={self.capacity}, heads={self.heads}" + (", fixed" if self.fixed else "")


register("ardlora", ARDLoRAConfig, ARDLoRAAdapter, allocator=ARDLoRAAllocator)

__all__ = ["ARDLoRAAdapter", "ARDLoRAConfig"]
