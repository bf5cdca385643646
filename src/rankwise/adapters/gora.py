"""GoRA's configuration and registration: a LoRA whose per-layer ranks and initial B come from gradients.

The method itself (gradient accumulation, importance, rank split, the B₀ init, the formulas and the
paper) is in :mod:`rankwise.allocation.gora`. ``rankwise.adapt(model, GoRAConfig(...))`` builds a
placeholder: rank-``r`` rsLoRA adapters with B = 0 on every target; ``rankwise.allocation.gora.initialize``
replaces them before training by adapters at the allocated ranks (written into ``rank_pattern``)
with the gradient-compressing B₀. A GoRA adapter is a LoRA adapter with a rank pattern, so it saves
and loads with ``rankwise.save`` / ``rankwise.load`` and exports with ``export_peft`` as a standard
PEFT LoRA file (``use_rslora`` and ``rank_pattern``), which ``import_peft`` reads back as ``"lora"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..allocation.gora import BUDGET_FEATURES, GoRAAllocator
from ..core.config import check_choice, check_positive_int, config_field
from ..core.registry import PeftFormat, register
from .lora import LoRAAdapter, LoRAConfig, _from_peft, _to_peft


@dataclass(kw_only=True)
class GoRAConfig(LoRAConfig):
    """GoRA hyper-parameters (defaults: the paper's Llama settings, arXiv:2502.12171).

    ``r`` is the reference rank r₀ that sets the budget; ``rank_pattern`` holds the allocated ranks and
    is written by ``initialize`` (a config with a rank pattern counts as initialised).
    """

    method = "gora"
    # GoRA's init needs ∂L/∂W of the base weight, which a quantised (non-differentiable) weight cannot give.
    quantised_base = False

    alpha: float = config_field(16.0, "scaling numerator: s = alpha / sqrt(r_l) (rsLoRA, as in GoRA's scripts)")
    use_rslora: bool = config_field(True, "s = alpha / sqrt(r_l) (GoRA's scaling); False: alpha / r_l")
    r_min: int = config_field(4, "smallest rank a layer is given")
    r_max: int = config_field(32, "largest rank a layer is given (min(out, in) caps it too)")
    gamma: float = config_field(5e-2, "step size of the initial update: s·B0·A0 ≈ -gamma·G (0: B0 = 0)")
    budget_features: str = config_field(
        "sqrt", "rank split normaliser f(m+n): 'sqrt' (the paper's) or 'linear' (official code; LoRA-equal parameters)"
    )
    gradient_batches: int = config_field(8, "N, batches of gradient accumulation (rankwise finetune's first N)")

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_positive_int(owner, "r_min", self.r_min)
        check_positive_int(owner, "r_max", self.r_max)
        check_positive_int(owner, "gradient_batches", self.gradient_batches)
        if self.r_max < self.r_min:
            raise ValueError(f"{owner}: r_max={self.r_max} is below r_min={self.r_min}; set r_max >= r_min")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 <= self.gamma < float("inf"):
            raise ValueError(f"{owner}: gamma must be a finite number >= 0, got {self.gamma!r}")
        check_choice(owner, "budget_features", self.budget_features, BUDGET_FEATURES)
        check_choice(owner, "init_weights", self.init_weights, [True])
        if self.lora_bias:
            raise ValueError(f"{owner}: lora_bias is not part of GoRA; set lora_bias=False")


register(
    "gora",
    GoRAConfig,
    LoRAAdapter,
    # Exported as a PEFT LoRA with a rank pattern; PEFT files import as "lora" (nothing marks them GoRA).
    peft=PeftFormat("LORA", lambda c: False, _to_peft, _from_peft, {}),
    allocator=GoRAAllocator.from_config,
)

__all__ = ["GoRAConfig"]
