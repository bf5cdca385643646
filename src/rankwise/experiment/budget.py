"""Matched budgets: give every method the size hyper-parameter that lands its trainable-parameter count closest
to a target, without training.

The budget is the number of trainable adapter parameters on the chosen target layers, the count
``rankwise.trainable_parameters`` reports right after ``rankwise.adapt`` (a classification head trained in
full is the same for every method and is not part of it). The target is a number (``budget=N``) or the count of
a reference configuration (``budget_like="lora:r=8"``).

Each method declares its size knob (:class:`SizeKnob`): the hyper-parameter values to try, in the order
of increasing parameter count, and the options one value sets. Per layer of shape m×n (out × in)::

    method                  knob          trainable parameters per layer
    LoRA (rsLoRA), GoRA     r             r(m + n)
    DoRA                    r             r(m + n) + m
    BoRA                    r             r(m + n) + m + n
    SingLoRA                r             r·max(m, n)
    LoLDU                   r             r ≤ min(m, n): below even rank-1 LoRA's m + n
    MiSS                    r             r·m  (r·mini_r with init_weights="mini")
    LoHa                    r             2r(m + n)
    AdaLoRA, ElaLoRA        init_r        init_r(m + n + 1)  (AdaLoRA's target_r keeps its ratio to init_r)
    ARD-LoRA                r             H·c·(d + n') + H for H heads of d rows (or n' columns) each,
                                          c = r_max = 2r (a given r_max keeps its ratio to r)
    GraLoRA                 r             r(m + n); k = 2 below r = 64 and 4 from there (the paper's rule)
                                          unless gralora_k is given
    C3A                     block_size b  m·n / b
    SURM circulant,         block_size g  2·m·n / g (1·m·n / g without use_prod), 2·m·n / g, 2K·m·n / g, every
    Toeplitz, LDR                         layer tiled with g×g blocks (rectangular="tile")

Counting: for each candidate value the method's adapter is built on a weightless (``meta``) stand-in of
every target layer's geometry (:func:`~rankwise.core.layer.meta_stand_in`: its shape, and a convolution's kernel
and groups), so the count is the adapter's own parameter count and a value that does not
fit a layer (LoRA's r > min(m, n), a block size that does not divide a width) is refused by the adapter's
own check. An adapter that needs the weight's values at construction (DoRA's norms, LoLDU's LU) is counted
with its closed form ``expected_num_params``; :func:`adapted_count` adapts a copy of the real model and is
the ground truth the tests compare both against.

Search: the count is non-decreasing along a knob's candidate list and a value that does not fit one layer
does not fit any larger one, so a bisection finds the last value at or below the target; it and its valid
neighbour above are compared and the closer one wins (the smaller on a tie). A method whose closest count is
more than :data:`TOLERANCE` away from the target, or that has no knob (SURM's Kronecker form: m + n per
layer whatever r; LoKr, whose count is fixed mostly by the Kronecker factorisation of each width, is not
monotone in r (W2 switches from rank r to full) and stays far below LoRA r = 8 on MiniLM; KRAdapter, whose
size follows from each layer's shape; a method registered without a knob), keeps a ``reason`` and is shown at its own budget.

AdaLoRA and ElaLoRA are matched at the size they train with (init_r components per layer); AdaLoRA's
schedule prunes to target_r by the end. GoRA is matched at its reference rank r₀ (its rank-r₀ placeholder,
the count after ``adapt``); its gradient allocation then moves rank between layers: with
``budget_features="linear"`` the count stays at most that of rank-r₀ LoRA, with the paper's ``"sqrt"`` it is
Σ r_l·√(m_l + n_l) that is kept, and the count depends on which layers get the rank.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import adapt, find_targets, trainable_parameters
from ..core.layer import Adapter, layer_geometry, linear_shape, meta_stand_in
from ..core.registry import config as make_config
from ..core.registry import get_method, methods, option_names

#: A matched count more than this relative distance from the target gets a ``reason``.
TOLERANCE = 0.10

Shapes = Sequence[tuple[int, int]]
Options = Mapping[str, Any]


def _always_available(base: Options) -> str | None:
    return None


@dataclass(frozen=True)
class SizeKnob:
    """A method's size hyper-parameter.

    Args:
        name: the option shown as the knob (``"r"``, ``"block_size"``).
        values: ``(shapes, base options)`` -> the candidate values, ordered by non-decreasing parameter count
            (``shapes`` are the target layers' ``(out_features, in_features)``).
        options: ``(value, base options)`` -> the config options that value sets (the knob and whatever must
            move with it).
        unavailable: ``base options`` -> why the knob does not apply to them (None when it does).
    """

    name: str
    values: Callable[[Shapes, Options], Sequence[int]]
    options: Callable[[int, Options], dict[str, Any]]
    unavailable: Callable[[Options], str | None] = _always_available


def _ranks(start: int = 1) -> Callable[[Shapes, Options], Sequence[int]]:
    """Ranks ``start``, ..., max over layers of max(out, in); the adapters refuse the ones a layer cannot hold."""
    return lambda shapes, base: range(start, max(max(shape) for shape in shapes) + 1)


def _block_sizes(shapes: Shapes, base: Options) -> Sequence[int]:
    """Divisors of every width, largest first (the fewest parameters first)."""
    width = math.gcd(*(w for shape in shapes for w in shape))
    return [d for d in range(width, 0, -1) if width % d == 0]


def _set(name: str) -> Callable[[int, Options], dict[str, Any]]:
    return lambda value, base: {name: value}


def _scaled(value: int, base: Options, field_name: str, reference: str, default_ratio: float) -> int:
    """``field_name`` keeping its ratio to ``reference`` (the base's, else ``default_ratio``), at least 1."""
    given, ref = base.get(field_name), base.get(reference)
    ratio = given / ref if given is not None and ref else default_ratio
    return max(1, round(value * ratio))


def _adalora_options(value: int, base: Options) -> dict[str, Any]:
    return {"init_r": value, "target_r": min(value, _scaled(value, base, "target_r", "init_r", 8 / 12))}


def _ardlora_options(value: int, base: Options) -> dict[str, Any]:
    if base.get("r_max") is None:
        return {"r": value}
    return {"r": value, "r_max": max(value, _scaled(value, base, "r_max", "r", 2.0))}


def _gralora_k(value: int, base: Options) -> int:
    """The given ``gralora_k``, else the paper's: 2 blocks per side below r = 64, 4 from there."""
    return base.get("gralora_k", 2 if value < 64 else 4)


def _gralora_values(shapes: Shapes, base: Options) -> Sequence[int]:
    return [r for r in _ranks()(shapes, base) if r % _gralora_k(r, base) == 0]


def _surm_unavailable(base: Options) -> str | None:
    if base.get("structure") == "kronecker":
        return "structure='kronecker' has m + n parameters per layer whatever r"
    return None


_RANK = SizeKnob("r", _ranks(), _set("r"))
_BLOCK = SizeKnob("block_size", _block_sizes, _set("block_size"))

_KNOBS: dict[str, SizeKnob] = {
    "lora": _RANK,
    "dora": _RANK,
    "bora": _RANK,
    "gora": _RANK,
    "singlora": _RANK,
    "loldu": _RANK,
    "miss": _RANK,
    "loha": _RANK,
    "ardlora": SizeKnob("r", _ranks(), _ardlora_options),
    "adalora": SizeKnob("init_r", _ranks(), _adalora_options),
    "elalora": SizeKnob("init_r", _ranks(start=2), _set("init_r")),
    "gralora": SizeKnob("r", _gralora_values, lambda value, base: {"r": value, "gralora_k": _gralora_k(value, base)}),
    "c3a": _BLOCK,
    "surm": SizeKnob("block_size", _block_sizes, lambda value, base: {"block_size": value, "rectangular": "tile"},
                     _surm_unavailable),
}


def register_size_knob(method: str, knob: SizeKnob) -> None:
    """Declare the size knob of a registered method (a method without one is shown at its own budget)."""
    get_method(method)
    if method in _KNOBS:
        raise ValueError(f"method {method!r} already has a size knob ({_KNOBS[method].name})")
    _KNOBS[method] = knob


def size_knob(method: str) -> SizeKnob | None:
    """The size knob of ``method``, or None when it has none."""
    return _KNOBS.get(method)


@dataclass
class Match:
    """One method's matched size.

    ``options`` are the options it runs with (the base options and the knob's), ``count`` its trainable
    adapter parameters, ``ratio`` = count / target; ``reason`` says why it is shown at another budget
    (no knob, or no value within :data:`TOLERANCE`), None when it is matched.
    """

    method: str
    options: dict[str, Any]
    count: int | None
    ratio: float | None
    knob: str | None
    reason: str | None = None

    @property
    def matched(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "count": self.count, "ratio": self.ratio,
                "knob": self.knob, "reason": self.reason}


@dataclass
class _Layers:
    """The target layers of one config: names, (out, in) shapes and weightless stand-ins."""

    names: list[str]
    shapes: list[tuple[int, int]]
    stand_ins: list[nn.Module]


def _layers(model: nn.Module, config: AdapterConfig) -> _Layers:
    names = find_targets(model, config)
    modules = [model.get_submodule(name) for name in names]
    return _Layers(names, [linear_shape(m) for m in modules], [meta_stand_in(layer_geometry(m)) for m in modules])


class _Unfit(Exception):
    """A candidate that some layer refuses (the adapter's ValueError, kept as the message)."""


def count_parameters(model: nn.Module, config: AdapterConfig) -> int:
    """Trainable adapter parameters of ``config`` on ``model``, without adapting it (see the module docstring).

    Raises the adapter's ``ValueError`` when the config does not fit a target layer.
    """
    try:
        return _count(config, _layers(model, config))
    except _Unfit as unfit:
        raise ValueError(str(unfit)) from None


def layer_parameters(adapter_cls: type[Adapter], stand_in: nn.Module, config: AdapterConfig, name: str = "") -> int:
    """Trainable parameters of ``adapter_cls`` with ``config`` on one layer, built on its weightless ``stand_in``
    (:func:`~rankwise.core.layer.meta_stand_in`); the class's closed form ``expected_num_params`` where the adapter
    reads the weight's values at construction, which a meta tensor does not have. Raises the adapter's
    ``ValueError`` when the config does not fit the layer."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = adapter_cls(stand_in, config, name)
    except (RuntimeError, NotImplementedError):
        return adapter_cls.expected_num_params(*linear_shape(stand_in), config)
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def _count(config: AdapterConfig, layers: _Layers) -> int:
    adapter_cls = get_method(config.method).adapter_cls
    try:
        return sum(layer_parameters(adapter_cls, stand_in, config.for_layer(name), name)
                   for name, stand_in in zip(layers.names, layers.stand_ins))
    except ValueError as error:
        raise _Unfit(str(error)) from None


def adapted_count(model: nn.Module, config: AdapterConfig) -> int:
    """``rankwise.trainable_parameters`` of a copy of ``model`` adapted with ``config`` (``model`` is left alone)."""
    return trainable_parameters(adapt(copy.deepcopy(model), config))


def parse_reference(text: str) -> tuple[str, dict[str, Any]]:
    """``"lora:r=8,alpha=16"`` -> ``("lora", {"r": 8, "alpha": 16})``; values are read as JSON, else as text."""
    method, _, rest = text.partition(":")
    method = method.strip()
    get_method(method)
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"budget_like {text!r}: expected METHOD:KEY=VALUE,KEY=VALUE (e.g. lora:r=8), got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return method, options


def _with_run_length(method: str, options: Options) -> dict[str, Any]:
    """``options`` with a placeholder ``total_step`` for a schedule that needs one (it does not change a count)."""
    if "total_step" in option_names(method) and options.get("total_step") is None:
        return {**options, "total_step": 1000}
    return dict(options)


def _build(method: str, targets: Any, options: Options) -> AdapterConfig:
    """The config of one candidate (warnings about a candidate, such as C3A's block_size=1, are not shown)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_config(method, targets=targets, **_with_run_length(method, options))


def reference_count(model: nn.Module, budget_like: str, targets: Any = "all-linear") -> int:
    """The trainable adapter parameters of the reference ``budget_like`` (``"lora:r=8"``) on ``targets``."""
    method, options = parse_reference(budget_like)
    return count_parameters(model, _build(method, targets, options))


def match_budget(
    model: nn.Module,
    methods_to_match: Sequence[str] | None = None,
    *,
    budget: int | None = None,
    budget_like: str | None = None,
    targets: Any = "all-linear",
    options: Mapping[str, Options] | None = None,
) -> dict[str, Match]:
    """For each method (default: every registered one), the knob value whose count lands closest to the target.

    Args:
        model: the base model (read only; nothing is adapted or trained).
        methods_to_match: registered method names.
        budget: the target number of trainable adapter parameters; or
        budget_like: a reference configuration whose count is the target, ``"METHOD:KEY=VALUE,..."``.
        targets: the layers every method adapts (``AdapterConfig.targets``).
        options: ``{method: {option: value}}`` fixed options of a method (its ``comparison_defaults`` apply
            under them); the knob's options override them.
    """
    if (budget is None) == (budget_like is None):
        raise ValueError("match_budget: give exactly one of budget=N (trainable parameters) or budget_like='lora:r=8'")
    if budget_like is not None:
        budget = reference_count(model, budget_like, targets)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"match_budget: budget must be a positive number of parameters, got {budget!r}")
    names = list(methods_to_match) if methods_to_match is not None else methods()
    options = options or {}
    return {name: _match(model, name, budget, targets, options.get(name, {})) for name in names}


def _match(model: nn.Module, method: str, target: int, targets: Any, given: Options) -> Match:
    base = {**get_method(method).config_cls.comparison_defaults, **given}
    knob = size_knob(method)
    why_not = "no size knob" if knob is None else knob.unavailable(base)
    if knob is None or why_not is not None:
        return _own_budget(model, method, target, targets, base, f"{why_not}: shown at its own budget")
    try:
        layers = _layers(model, _build(method, targets, base))
    except ValueError as error:
        return Match(method, base, None, None, knob.name, f"its options do not build: {error}")
    values = list(knob.values(layers.shapes, base))

    def count_at(index: int) -> int | None:
        try:
            return _count(_build(method, targets, {**base, **knob.options(values[index], base)}), layers)
        except (_Unfit, ValueError):
            return None

    # Bisection for the last value whose count is at most the target (an unfit value counts as above it).
    low, high = -1, len(values)
    while high - low > 1:
        middle = (low + high) // 2
        count = count_at(middle)
        if count is not None and count <= target:
            low = middle
        else:
            high = middle
    found = [(count, index) for index in (low, high) if 0 <= index < len(values)
             for count in [count_at(index)] if count is not None]
    if not found:
        return Match(method, base, None, None, knob.name,
                     f"no {knob.name} in {values[0]}..{values[-1]} fits every target layer: shown at none")
    count, index = min(found, key=lambda pair: (abs(pair[0] - target), pair[0]))
    chosen = {**base, **knob.options(values[index], base)}
    ratio = count / target
    reason = None
    if abs(ratio - 1) > TOLERANCE:
        reason = (f"the closest {knob.name}={values[index]} gives {count:,} parameters, {ratio:.3g}× the target "
                  f"{target:,}; no {knob.name} this method accepts on these layers comes within "
                  f"{TOLERANCE:.0%}: shown at that size")
    return Match(method, chosen, count, ratio, knob.name, reason)


def _own_budget(model: nn.Module, method: str, target: int, targets: Any, base: dict[str, Any], reason: str) -> Match:
    try:
        count = count_parameters(model, _build(method, targets, base))
    except ValueError as error:
        return Match(method, base, None, None, None, f"{reason}, which does not build: {error}")
    return Match(method, base, count, count / target, None, reason)


__all__ = ["TOLERANCE", "Match", "SizeKnob", "adapted_count", "count_parameters", "layer_parameters", "match_budget",
           "parse_reference", "reference_count", "register_size_knob", "size_knob"]
