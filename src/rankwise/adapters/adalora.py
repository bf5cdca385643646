"""AdaLoRA: an SVD-shaped update whose rank is allocated during training, exactly as PEFT 0.21.2.

Paper: "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", Zhang, Chen, Bukharin, He,
Cheng, Chen, Zhao, ICLR 2023, arXiv:2303.10512.

The update of a layer W ∈ R^{m×n} (y = x Wᵀ + b) is written like an SVD, P Λ Q::

    ΔW = α / (init_r + 1e-5) · B (A ⊙ E),   A = Q ∈ R^{r×n} (lora_A),  E = diag Λ ∈ R^{r×1} (lora_E),
                                             B = P ∈ R^{m×r} (lora_B)
    y  = base(x) + α / (init_r + 1e-5) · B (A ⊙ E) dropout(x)

The scale uses init_r (PEFT's non-trainable ``ranknum``, not saved) for the whole run, never the
current rank. Init (``init_weights=True``): E = 0 and A, B ~ N(0, 0.02²), so ΔW = 0; ``False``
leaves A, E, B ~ N(0, 1) (tests only). Trainable parameters per layer: r (m + n + 1), r = init_r
during training (masking keeps the tensors at full size) and Σ of the rank pattern once resized.

The rank allocation (importance scores, cubic budget, masking every ΔT steps) and the orthogonal
regulariser are :class:`rankwise.allocation.AdaLoRAAllocator`; ``rankwise.allocator(model)`` gives
the model's allocator. A training loop calls it in PEFT's order::

    allocator = rankwise.allocator(model)
    for step, batch in enumerate(batches):                      # step = 0, 1, ..., total_step - 1
        loss = loss_fn(model(batch)) + allocator.regularizer()  # PEFT adds this inside its forward
        loss.backward(); optimizer.step(); allocator.step(step); optimizer.zero_grad()

``RankwiseCallback`` does both for ``transformers.Trainer``. ``rankwise.save`` keeps the full-size
tensors and the allocator's state (exact resume); ``rankwise.export_peft`` writes PEFT's file: the
``rank_pattern`` of the latest allocation and the tensors cut down to it. ``import_peft`` reads such a
file back at the pattern's ranks (PEFT's ``resize_modules_by_rank_pattern``), with its schedule.

Where we differ from PEFT, on purpose: ``init_r > min(m, n)`` is an error (PEFT accepts it);
Conv2d and quantised layers are not supported (rankwise wraps Linear and Conv1D).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..allocation.adalora import AdaLoRAAllocator, check_schedule
from ..core.config import (
    AdapterConfig,
    check_choice,
    check_dropout,
    check_positive_int,
    check_positive_number,
    config_field,
)
from ..core.inject import adapted_layers, adapter_config
from ..core.layer import Adapter, add_into_output
from ..core.rank import RankComponents, allocator
from ..core.registry import PeftFormat, register


@dataclass(kw_only=True)
class SVDConfig(AdapterConfig):
    """Fields of an SVD-shaped adapter whose rank an importance schedule allocates (AdaLoRA, ElaLoRA): one
    name and meaning for both, with PEFT's AdaLoRA defaults (a subclass may redeclare a default)."""

    init_r: int = config_field(12, "initial rank of every adapted layer")
    tinit: int = config_field(0, "warm-up steps before any rank allocation")
    tfinal: int = config_field(0, "final steps with the rank pattern fixed")
    deltaT: int = config_field(1, "steps between two rank allocations")
    beta1: float = config_field(0.85, "EMA factor of the sensitivity")
    beta2: float = config_field(0.85, "EMA factor of the uncertainty")
    orth_reg_weight: float = config_field(0.5, "weight of the orthogonal regulariser")
    orth_reg: str = config_field("peft", "'peft': mean of unsquared Frobenius norms (PEFT, default); 'paper': sum of squares")
    total_step: int | None = config_field(None, "total number of optimizer steps of the run (required)")
    alpha: float = config_field(8.0, "scaling numerator: ΔW = alpha / init_r · B (A ⊙ E)")
    dropout: float = config_field(0.0, "dropout probability on the adapter branch's input")
    init_weights: bool = config_field(True, "True: E = 0, A and B ~ N(0, 0.02^2); False: all N(0, 1)")

    def final_rank(self) -> int:
        """The average rank per layer at the end of the schedule."""
        return self.init_r

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "init_r", self.init_r)
        check_schedule(owner, total_step=self.total_step, target_r=self.final_rank(), tinit=self.tinit,
                       tfinal=self.tfinal, deltaT=self.deltaT, beta1=self.beta1, beta2=self.beta2,
                       orth_reg_weight=self.orth_reg_weight, orth_reg=self.orth_reg)
        check_positive_number(owner, "alpha", self.alpha)
        check_dropout(owner, self.dropout)
        check_choice(owner, "init_weights", self.init_weights, [True, False])


@dataclass(kw_only=True)
class AdaLoRAConfig(SVDConfig):
    """AdaLoRA hyper-parameters, named and defaulted as PEFT's ``AdaLoraConfig`` (``lora_alpha`` is ``alpha``)."""

    method = "adalora"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    target_r: int = config_field(8, "average rank per layer at the end of the budget phase")
    rank_pattern: dict[str, list[bool]] | None = field(  # field(): ruff wants a visible default for a dict
        default=None, metadata={"help": "{layer: kept components of init_r}: build the layers at those ranks"})

    def final_rank(self) -> int:
        return self.target_r

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        if self.target_r > self.init_r:
            raise ValueError(f"{owner}: target_r ({self.target_r}) must not exceed init_r ({self.init_r}); "
                             "AdaLoRA only removes rank")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ValueError(f"{owner}: rank_pattern must be a {{layer name: [bool] * init_r}} dict, got {self.rank_pattern!r}")
        for name, pattern in (self.rank_pattern or {}).items():
            if not isinstance(pattern, list) or len(pattern) != self.init_r or not all(
                    isinstance(b, bool) for b in pattern):
                raise ValueError(f"{owner}: rank_pattern['{name}'] must be a list of init_r={self.init_r} booleans")


class AdaLoRAAdapter(RankComponents, Adapter):
    """ΔW = α/(init_r + 1e-5) · B (A ⊙ E): PEFT's ``SVDLinear``, with rank components for the allocator."""

    masked_tensor = "lora_E"
    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: AdaLoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        limit = min(self.out_features, self.in_features)
        if config.init_r > limit:
            raise self.fail(f"init_r={config.init_r} exceeds min(out, in)={limit}",
                            f"Use init_r <= {limit} or exclude this layer from targets")
        self.r = self._start_rank(config, layer_name)
        self.alpha = config.alpha
        self.init_r = config.init_r
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        fresh = self._draw(self.r, config.init_weights)
        self.lora_A = nn.Parameter(fresh["lora_A"])
        self.lora_E = nn.Parameter(fresh["lora_E"])
        self.lora_B = nn.Parameter(fresh["lora_B"])
        # PEFT's ranknum: float(init_r), not trained and not saved; a buffer so that it follows .to().
        self.register_buffer("ranknum", torch.tensor(float(config.init_r)), persistent=False)

    def _start_rank(self, config: Any, layer_name: str) -> int:
        """The rank the layer is built at: the kept components of its ``rank_pattern`` entry, else init_r."""
        pattern = (config.rank_pattern or {}).get(layer_name)
        return sum(pattern) if pattern is not None else config.init_r

    def _draw(self, count: int, init_weights: bool) -> dict[str, Tensor]:
        """A, E, B drawn from the global generator in PEFT's order (randn A, E, B, then one randn(1) for
        its ``ranknum``, then N(0, 0.02²) A and B), so that one seed gives PEFT's initial weights."""
        a, e, b = torch.randn(count, self.in_features), torch.randn(count, 1), torch.randn(self.out_features, count)
        torch.randn(1)
        if init_weights:
            e.zero_()
            a.normal_(0.0, 0.02)
            b.normal_(0.0, 0.02)
        return {"lora_A": a, "lora_E": e, "lora_B": b}

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A * self.lora_E), self.lora_B)
        return add_into_output(base_out, update * self.alpha / (self.ranknum + 1e-5))

    def delta_weight(self) -> Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.alpha / (self.ranknum + 1e-5)

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: AdaLoRAConfig) -> int:
        return config.init_r * (out_features + in_features + 1)

    def describe(self) -> str:
        return f"r={self.r} of init_r={self.init_r}, alpha={self.alpha:g}"

    # -- rank components -------------------------------------------------------------------------

    def rank_tensors(self) -> dict[str, tuple[nn.Parameter, int]]:
        return {"lora_A": (self.lora_A, 0), "lora_E": (self.lora_E, 0), "lora_B": (self.lora_B, 1)}

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)``; the update is B (A ⊙ E), the singular values E sitting between them."""
        return self.lora_A, self.lora_B

    def new_components(self, count: int) -> dict[str, Tensor]:
        return self._draw(count, True)


# ----------------------------------------------------------------------------------------------
# PEFT's AdaLoraConfig <-> ours
# ----------------------------------------------------------------------------------------------

_SHARED = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def _to_peft(config: AdaLoRAConfig) -> dict[str, Any]:
    if config.orth_reg != "peft":
        warnings.warn(
            f"PEFT's AdaLoRA knows only its own orthogonal regulariser: the exported adapter keeps its weights, "
            f"but training it further in PEFT (or after import_peft) uses orth_reg='peft', not {config.orth_reg!r}",
            stacklevel=3,
        )
    return {
        **{name: getattr(config, name) for name in _SHARED},
        "r": 8,  # PEFT's AdaLoRA ignores r (it warns unless r is LoraConfig's default, 8)
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "init_lora_weights": config.init_weights,
        "rank_pattern": _peft_pattern(config.rank_pattern),
    }


def _peft_pattern(pattern: dict[str, list[bool]] | None) -> dict[str, list[bool]] | None:
    return None if pattern is None else {f"{name}.lora_E": kept for name, kept in sorted(pattern.items())}


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    pattern = peft_config.get("rank_pattern") or None
    if pattern is not None:
        pattern = {_layer_of(key): [bool(b) for b in kept] for key, kept in pattern.items()}
    alpha = peft_config.get("lora_alpha", 8)
    return {
        **{name: peft_config[name] for name in _SHARED if name in peft_config},
        "alpha": float(alpha if alpha > 0 else peft_config.get("init_r", 12)),  # PEFT: alpha <= 0 means r
        "dropout": float(peft_config.get("lora_dropout", 0.0)),
        "init_weights": bool(peft_config.get("init_lora_weights", True)),
        "rank_pattern": pattern,
    }


def _layer_of(key: str) -> str:
    """``encoder.q.lora_E`` or ``encoder.q.lora_E.default`` -> ``encoder.q``."""
    head, marker, _ = key.partition(".lora_E")
    if not marker:
        raise ValueError(f"PEFT rank_pattern key {key!r} does not name a lora_E tensor")
    return head


def _prepare_export(model: nn.Module, payload: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """PEFT writes the latest allocation as ``rank_pattern`` and only the kept components' tensors.

    ``ValueError`` first (nothing is written) when a component the pattern drops has a non-zero λ
    (:func:`_check_dropped_are_zero`)."""
    config: AdaLoRAConfig = adapter_config(model)
    held = allocator(model)
    if held is None or not held.masks:
        return
    _check_dropped_are_zero(model, held.masks)
    pattern: dict[str, list[bool]] = {}
    for name, layer in adapted_layers(model):
        keep = held.masks[name].cpu()
        placed = iter(keep.tolist())
        base = (config.rank_pattern or {}).get(name, [True] * config.init_r)
        pattern[name] = [next(placed) if present else False for present in base]
        for tensor, (_, dim) in layer.adapter.rank_tensors().items():
            key = f"{name}.adapter.{tensor}"
            tensors[key] = tensors[key].index_select(dim, keep.nonzero().view(-1).to(tensors[key].device))
    payload["rank_pattern"] = _peft_pattern(pattern)


def _check_dropped_are_zero(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """``ValueError`` naming the layers where a component the last allocation masked has a non-zero λ (``lora_E``).

    A masking step zeroes the λ of every component it drops, but until the next one the optimizer revives them
    (their gradient is not zero), and the model computes with them. A PEFT file holds the last masks as
    ``rank_pattern`` and only the kept components, so it would compute something else (PEFT's own
    ``save_pretrained`` loses the same components there). Right after a masking step, or once the final allocation
    is fixed (it is re-applied at every step), the dropped λ are exactly zero and the export is exact."""
    revived = []
    for name, layer in adapted_layers(model):
        values = layer.adapter.lora_E.detach().reshape(-1)[~masks[name].to(layer.adapter.lora_E.device)]
        if bool((values != 0).any()):
            revived.append(f"'{name}' ({int((values != 0).sum())} of {values.numel()} dropped components, "
                           f"max |λ| {values.abs().max().item():.3g})")
    if revived:
        raise ValueError(
            "export_peft: the AdaLoRA components the last allocation masked have been trained back since (non-zero "
            f"λ) in layer(s) {', '.join(revived)}; the PEFT file keeps only the masked pattern (rank_pattern), so "
            "it would not compute what this model computes. Export right after a masking step (allocator.step at a "
            "masking step, after the optimizer step) or after the final allocation, or save with rankwise.save, "
            "which keeps every component exactly"
        )


register(
    "adalora",
    AdaLoRAConfig,
    AdaLoRAAdapter,
    peft=PeftFormat("ADALORA", lambda c: True, _to_peft, _from_peft, {}, prepare_export=_prepare_export),
    allocator=AdaLoRAAllocator.from_config,
)

__all__ = ["AdaLoRAAdapter", "AdaLoRAAllocator", "AdaLoRAConfig", "SVDConfig"]
