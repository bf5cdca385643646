"""Where an optimizer finds the two factors of an adapter: core's :class:`~rankwise.core.rank.TwoFactors`.

An adapter "exposes two factors" when it implements ``TwoFactors``: its trainable factors A ∈ R^{r×n}
and B ∈ R^{m×r} enter the layer only through s·B·A, so their gradients are ``g_A = s·Bᵀ·G`` and
``g_B = s·G·Aᵀ`` for one m×n matrix G, the gradient with respect to the matrix the product is added to.
That is all LoRA-Pro's algebra needs; what its equivalent gradient *approximates* depends on that matrix,
which the adapter declares (``product_is_update``, :class:`~rankwise.core.rank.FactorProduct` ``exact``):

* exact (ΔW = s·B·A; LoRA, rsLoRA, rank / alpha patterns, PiSSA, OLoRA, GoRA): G = ∂L/∂W, the full
  fine-tuning gradient, as in LoRA-Pro's Theorem 2.1;
* not exact (DoRA, BoRA: s·B·A is added to the direction V = W₀ + s·B·A, which magnitudes rescale,
  W' = diag(g/c)·V for DoRA): G = ∂L/∂V. The adjusted pair is then the best low-rank step *for V*, not
  for W': with DoRA's c detached, ∂L/∂V = diag(g/c)·∂L/∂W', so the two agree only where g/c = 1 (at
  DoRA's init) and otherwise the rows are weighted differently; the magnitudes get plain AdamW, and
  the coupling through them is ignored. LoRA-Pro's paper derives nothing for such adapters, so
  :func:`two_factor_pairs` refuses them unless ``directions=True`` asks for this approximation.

Adapters without the declaration (AdaLoRA and ElaLoRA, whose update B·(E ⊙ A) holds the singular
values between the factors; GraLoRA, SingLoRA, ARD-LoRA, the other methods) get a ``ValueError``
naming their method and the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..core.inject import adapted_layers
from ..core.rank import TwoFactors
from ..core.registry import registered


@dataclass(frozen=True, eq=False)
class FactorPair:
    """The two factors of one adapted layer, whose product scaling · B · A is its update (or its direction's).

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


def two_factor_methods(exact: bool = True) -> list[str]:
    """Registered methods whose adapters declare two factors with ΔW = s·B·A (``exact``), or without it."""
    return [method.name for method in registered()
            if issubclass(method.adapter_cls, TwoFactors) and method.adapter_cls.product_is_update == exact]


def two_factor_pairs(model: nn.Module, directions: bool = False) -> list[FactorPair]:
    """Every adapted layer's (A, B, s, name), in model order, from its :class:`~rankwise.core.rank.TwoFactors`
    declaration.

    Raises ``ValueError`` when the model has no adapted layer, when some adapted layer declares no two
    factors (naming the methods found and the supported ones), when a layer's product is not its whole
    update (DoRA, BoRA) and ``directions`` is False (module docstring), or when a pair's shapes do not
    fit (r > min(m, n), mismatched ranks) or only one of its factors is trainable.
    """
    layers = list(adapted_layers(model))
    others = [(name, layer.adapter) for name, layer in layers if not isinstance(layer.adapter, TwoFactors)]
    supported = f"the methods {two_factor_methods()} (and {two_factor_methods(exact=False)} with directions=True)"
    if not layers or others:
        found = sorted({_method_name(adapter) for _, adapter in others})
        where = f"the adapted methods found are {found} (e.g. layer '{others[0][0]}')" if others else "it has no adapted layer"
        raise ValueError(
            f"LoRA-Pro cannot adjust {type(model).__name__}: {where}. It adjusts adapters that declare two factors "
            f"(ΔW = s·B·A), i.e. {supported}; adapt the model with one of them, e.g. "
            "rankwise.adapt(model, rankwise.LoRAConfig(...))"
        )
    declared = [(name, layer.adapter, layer.adapter.factor_product()) for name, layer in layers]
    inexact = [(name, adapter) for name, adapter, product in declared if not product.exact]
    if inexact and not directions:
        name, adapter = inexact[0]
        raise ValueError(
            f"LoRA-Pro: layer '{name}' is adapted with {_method_name(adapter)!r}, whose update is not ΔW = s·B·A: "
            "s·B·A is added to a direction that magnitudes rescale, while LoRA-Pro's equivalent gradient assumes "
            "ΔW = s·B·A. Pass directions=True to adjust the direction's gradient instead (an approximation of full "
            f"fine-tuning, see rankwise.optim.factors), or adapt with {two_factor_methods()}"
        )
    pairs = [FactorPair(product.A, product.B, product.scaling, name) for name, _, product in declared]
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
