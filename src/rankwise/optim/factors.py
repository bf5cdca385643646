"""Where an optimizer finds the two factors of an adapter: the one place to switch to core's rank interface.

An adapter "exposes two factors" when its trainable update enters the layer only through the
product ``s·B·A`` (A ∈ R^{r×n}, B ∈ R^{m×r}, a scalar scaling s). By the chain rule its factor
gradients are then ``g_A = s·Bᵀ·G`` and ``g_B = s·G·Aᵀ`` for one m×n matrix G, the gradient with
respect to the matrix the product is added to: the base weight for LoRA and rsLoRA, the direction
``V = W₀ + s·B·A`` for DoRA and BoRA (whatever the magnitudes do downstream). That is all LoRA-Pro
needs. These are the LoRA-family adapters (:class:`~rankwise.adapters.lora.LoRAAdapter` and its
subclasses: LoRA, rsLoRA, DoRA, BoRA, with any init, PiSSA and OLoRA included). Their factors are
read through core's rank interface (:meth:`~rankwise.core.rank.RankComponents.factors`) and their
scale from ``scaling``. Being a ``RankComponents`` is not enough on its own: the interface carries
no scale, and AdaLoRA's ``factors()`` (A, B) hold its singular values E between them
(ΔW ∝ B·(E ⊙ A)), so LoRA-Pro's closed form does not apply to that pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..adapters.lora import LoRAAdapter
from ..core.inject import adapted_layers
from ..core.registry import registered


@dataclass(frozen=True, eq=False)
class FactorPair:
    """The two factors of one adapted layer: ΔW = scaling · B · A.

    Attributes:
        A: the (r, n) factor (LoRA's ``lora_A.weight``).
        B: the (m, r) factor (LoRA's ``lora_B.weight``).
        scaling: s.
        name: the adapted layer's path in the model.
    """

    A: Tensor
    B: Tensor
    scaling: float
    name: str


def two_factor_methods() -> list[str]:
    """Registered methods whose adapters expose two factors."""
    return [method.name for method in registered() if issubclass(method.adapter_cls, LoRAAdapter)]


def two_factor_pairs(model: nn.Module) -> list[FactorPair]:
    """Every adapted layer's (A, B, s, name), in model order.

    Raises ``ValueError`` when the model has no adapted layer, when some adapted layer has no two
    factors (naming the methods found and the supported ones), or when a pair's shapes do not fit
    (r > min(m, n), mismatched ranks) or only one of its factors is trainable.
    """
    layers = list(adapted_layers(model))
    supported = two_factor_methods()
    others = [(name, layer.adapter) for name, layer in layers if not isinstance(layer.adapter, LoRAAdapter)]
    if not layers or others:
        found = sorted({_method_name(adapter) for _, adapter in others})
        where = f"the adapted methods found are {found} (e.g. layer '{others[0][0]}')" if others else "it has no adapted layer"
        raise ValueError(
            f"LoRA-Pro cannot adjust {type(model).__name__}: {where}. It adjusts adapters with two factors "
            f"(ΔW = s·B·A), i.e. the methods {supported}; adapt the model with one of them, e.g. "
            "rankwise.adapt(model, rankwise.LoRAConfig(...))"
        )
    pairs = [FactorPair(*layer.adapter.factors(), layer.adapter.scaling, name) for name, layer in layers]
    for pair in pairs:
        _check_pair(pair)
    return pairs


def _method_name(adapter: nn.Module) -> str:
    for method in registered():
        if type(adapter) is method.adapter_cls:
            return method.name
    return type(adapter).__name__


def _check_pair(pair: FactorPair) -> None:
    (r, n), (m, r_b) = pair.A.shape, pair.B.shape
    where = f"layer '{pair.name}' (A {r}×{n}, B {m}×{r_b})"
    if r != r_b or r > min(m, n):
        raise ValueError(f"{where}: LoRA-Pro needs A (r×n) and B (m×r) with one rank r <= min(m, n); "
                         "adapt the layer with a rank that fits it")
    if pair.A.requires_grad != pair.B.requires_grad:
        raise ValueError(f"{where}: only one factor is trainable (A: {pair.A.requires_grad}, B: "
                         f"{pair.B.requires_grad}); LoRA-Pro moves both, so make both trainable or both frozen")
