"""Any method's update as a plain LoRA, for engines that serve LoRA only (vLLM, SGLang, diffusers).

``rankwise.to_lora(model, rank=k)`` (or ``energy=e``) gives a new model in which every adapted layer
carries a LoRA adapter whose update is the best rank-k approximation of the layer's update

    ΔW = W' − W,   W' = ``Adapter.merged_weight(W)`` (what ``rankwise.merge`` writes),  W = the unmerged base.

For an additive method ΔW is ``delta_weight()``; for one whose update reads W (DoRA's magnitude rescale,
BoRA's row and column rescales, MiSS "bat") W' − W is still well defined, and full rank in general. ΔW is
computed in float64 on a float64 copy of the layer, then factorised by the thin SVD ΔW = U diag(σ) Vᵀ
(σ descending):

    B = U_k diag(√σ_k),   A = diag(√σ_k) V_kᵀ,   α = r = k per layer, so s = α/r = 1,
    s·B·A = U_k diag(σ_k) V_kᵀ = ΔW_k, the best rank-k approximation of ΔW in the Frobenius (and spectral)
    norm, with relative error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²)

("The approximation of one matrix by another of lower rank", Eckart & Young, Psychometrika 1936; 0 for
ΔW = 0). At k = min(out, in) the LoRA reproduces ΔW exactly (to float rounding), for every method.

Ranks: ``rank=k`` for every layer, or ``rank={layer name: k}`` naming every adapted layer by its full
name (``rankwise.ranks(model)`` has that form); k is clamped to min(out, in), where the SVD ends, so a
large k means "exact". ``energy=e`` (0 < e <= 1) keeps per layer the smallest k with
Σ_{i<=k} σ_i² >= (e − 1e-12) · Σ_i σ_i² (:func:`rankwise.compress.ranks.energy_rank`; the 1e-12 keeps
e = 1 from counting float64 rounding noise as rank), at least 1. The LoRA config has ``r`` and ``alpha``
equal to the most common k and a ``rank_pattern`` / ``alpha_pattern`` entry ``^<escaped name>`` (PEFT's
pattern rule, :func:`rankwise.adapters.lora.pattern_key`, matches it for that one layer only) for each
other layer, so ``rankwise.export_peft`` writes a file ``PeftModel.from_pretrained`` loads as it is.

What else carries over:
    * bias: a method whose merge changes the layer's bias (LoRA with ``lora_bias``) gives a LoRA with
      ``lora_bias=True`` and b_B = Δb (s = 1); layers without a bias update get b_B = 0. PEFT 0.21.2 has
      ``lora_bias`` and loads it.
    * ``modules_to_save``: the same entries, with the trained copies moved into the new model.
    * the base weights W (a merged source is unmerged first), dtype rules of ``rankwise.adapt``
      (float32 factors on a half-precision base), train / eval mode and ``requires_grad`` flags.
    * not carried: dropout (the LoRA has none: it is meant for serving) and anything only a training
      forward does differently (SingLoRA's ramp is taken at its current value, as merging takes it).

``to_lora`` never changes ``model``: it converts a ``copy.deepcopy`` of it (so, while it runs, the
model is held twice; a rank allocator and the optimizer it may hold are not copied) and returns the copy. :func:`to_lora_report` gives the per-layer ranks and errors.

Refused with ``ValueError`` before anything is copied: a model without a rankwise adapter; a method
whose adapter cannot merge (no ``delta_weight`` / ``merged_weight``); an adapter initialised with PiSSA
or OLoRA, whose base weight was replaced by a residual W_res (the LoRA would hold only on W_res, not on
the original base that a serving engine loads: merge it with ``rankwise.unload(merge=True)`` instead);
and a bad ``rank`` / ``energy``.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapters.lora import LoRAConfig
from .compress.ranks import energy_rank
from .compress.svd import plain_decomposition
from .core.config import check_positive_int
from .core.inject import adapt, adapted_layers, adapter_config, saved_modules, unload, unmerge
from .core.layer import AdaptedLayer, Adapter, is_conv_layer, linear_shape, weight_matrix
from .core.rank import _ALLOCATOR_ATTR

_REPORT_ATTR = "_rankwise_lora_report"


@dataclass(frozen=True)
class LayerConversion:
    """One layer of a :func:`to_lora` conversion."""

    out_features: int
    in_features: int
    rank: int  # k, the LoRA's rank
    relative_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (Eckart–Young: sqrt of the dropped σ² over the total)
    bias: bool  # the layer's bias update is carried by lora_B's bias

    @property
    def max_rank(self) -> int:
        """min(out, in): the rank at which the conversion is exact."""
        return min(self.out_features, self.in_features)


@dataclass(frozen=True)
class LoRAConversion:
    """What :func:`to_lora` did: the source method, the LoRA config, each layer's rank and error."""

    method: str
    config: LoRAConfig
    layers: dict[str, LayerConversion] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)  # full names of the carried trained modules

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers.values()), default=0.0)

    def table(self) -> str:
        """One line per layer (shape, rank, relative error, bias) and a closing summary line."""
        width = max(len("layer"), *(len(name) for name in self.layers))
        lines = [f"{'layer':<{width}}  {'shape (out x in)':>16}  {'rank':>9}  {'rel. error':>10}  bias"]
        for name, layer in self.layers.items():
            shape = f"{layer.out_features} x {layer.in_features}"
            rank = f"{layer.rank}/{layer.max_rank}"
            lines.append(f"{name:<{width}}  {shape:>16}  {rank:>9}  {layer.relative_error:>10.3e}  "
                         f"{'yes' if layer.bias else 'no'}")
        lines.append(f"{self.method} -> lora: {len(self.layers)} layers, largest relative error "
                     f"{self.max_relative_error:.3e}, modules_to_save {self.modules_to_save or 'none'}")
        return "\n".join(lines)


def _check_choice(rank: int | dict[str, int] | None, energy: float | None, names: list[str]) -> None:
    """``ValueError`` unless exactly one of a valid ``rank`` / ``energy`` is given."""
    if (rank is None) == (energy is None):
        raise ValueError(f"to_lora: give exactly one of rank= or energy=, got rank={rank!r}, energy={energy!r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
            raise ValueError(f"to_lora: energy must be a number in (0, 1], got {energy!r}")
    elif not isinstance(rank, dict):
        check_positive_int("to_lora", "rank", rank)
    else:
        for key, value in rank.items():
            check_positive_int("to_lora", f"rank[{key!r}]", value)
        missing, unknown = [n for n in names if n not in rank], [k for k in rank if k not in names]
        if missing or unknown:
            raise ValueError(f"to_lora: a rank dict must name every adapted layer by its full name; missing "
                             f"{missing}, unknown {unknown}. The adapted layers are {names}")


def _check_mergeable(method: str, name: str, layer: AdaptedLayer) -> None:
    """``ValueError`` naming the method and layer when the adapter has no dense merged form."""
    cls = type(layer.adapter)
    if cls.delta_weight is Adapter.delta_weight and cls.merged_weight is Adapter.merged_weight:
        out_features, in_features = linear_shape(layer.base_layer)
        raise ValueError(
            f"to_lora: method {method!r} cannot merge ({cls.__name__} on layer '{name}', {out_features} x "
            f"{in_features}, has neither delta_weight nor merged_weight), so its update has no dense form to "
            "factorise. Only methods that rankwise.merge supports convert to LoRA"
        )
    groups = getattr(layer.base_layer, "groups", 1) if is_conv_layer(layer.base_layer) else 1
    if groups > 1:  # LoHa / LoKr adapt grouped convolutions with a grouped kernel
        raise ValueError(
            f"to_lora: layer '{name}' is a grouped convolution (groups={groups}); a LoRA on it reads every input "
            f"channel (its A kernel is not grouped), so no LoRA holds the grouped {method!r} update. Leave the "
            "layer out of targets, or merge the adapter instead: rankwise.unload(model, merge=True)"
        )


def _copy_without_allocator(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` minus the source's rank allocator (AdaLoRA, ElaLoRA, ...) and whatever it holds
    (ElaLoRA's optimizer): the LoRA has no allocator, and copying an optimizer's state would only cost memory."""
    held = model.__dict__.get(_ALLOCATOR_ATTR)
    new = copy.deepcopy(model, memo={} if held is None else {id(held): None})
    new.__dict__.pop(_ALLOCATOR_ATTR, None)
    return new


@torch.no_grad()
def _updates(layer: AdaptedLayer) -> tuple[Tensor, Tensor | None]:
    """(ΔW, Δb) in float64 for an unmerged layer: W' − W from ``merged_weight`` on a float64 copy of the layer.

    The weight is cast too: ``.double()`` leaves a bitsandbytes layer's packed weight alone, and it dequantises to
    the dtype it was quantised from (bf16 under ``load_in_4bit`` with ``torch_dtype=bfloat16``), where W + ΔW − W
    would round ΔW away."""
    work = copy.deepcopy(layer).double()
    weight = weight_matrix(work.base_layer).detach().to(torch.float64).clone()
    delta_bias = work.adapter.delta_bias()
    return work.adapter.merged_weight(weight.clone()) - weight, None if delta_bias is None else delta_bias.double()


def _wanted_rank(name: str, spectrum: Tensor, rank: int | dict[str, int] | None, energy: float | None) -> int:
    """The rank asked for layer ``name``: by the energy rule, its ``rank`` dict entry, or ``rank``."""
    if energy is not None:
        return energy_rank(spectrum, energy)
    return rank[name] if isinstance(rank, dict) else rank


def _relative_error(spectrum: Tensor, k: int) -> float:
    """sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²), summed over the dropped σ (so exactly 0 at full rank); 0 for ΔW = 0."""
    power = spectrum.double().square()
    total = float(power.sum())
    return (float(power[k:].sum()) / total) ** 0.5 if total > 0 else 0.0


def _lora_config(ranks: dict[str, int], source_modules: list[str] | None, bias: bool) -> LoRAConfig:
    """The LoRA config: r = α = the most common rank; pattern entries (matching one layer each) for the others."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    others = {"^" + re.escape(name): k for name, k in ranks.items() if k != common}
    return LoRAConfig(
        targets="|".join(f"(?:{re.escape(name)})" for name in ranks),
        r=common,
        alpha=float(common),
        lora_bias=bias,
        rank_pattern=others or None,
        alpha_pattern={key: float(k) for key, k in others.items()} or None,
        modules_to_save=source_modules,
    )


@torch.no_grad()
def to_lora(model: nn.Module, *, rank: int | dict[str, int] | None = None, energy: float | None = None) -> nn.Module:
    """A new model whose adapters are LoRAs holding the rank-k SVD truncation of each layer's W' − W.

    Give ``rank`` (an int for every layer, or ``{full layer name: k}`` for each adapted layer) or ``energy``
    (in (0, 1]: per layer, the smallest k keeping that fraction of Σσ²); see the module docstring for the
    factors, the scaling (α = r, s = 1), what carries over and what is refused. ``model`` is not changed.
    The per-layer ranks and relative Frobenius errors are in ``rankwise.to_lora_report(new_model)``.
    """
    config = adapter_config(model)
    layers = list(adapted_layers(model))
    _check_choice(rank, energy, [name for name, _ in layers])
    if config.changes_base_weights:
        raise ValueError(
            f"to_lora: the {config.method!r} adapter was initialised with init_weights={config.init_weights!r}, "
            "which replaced each targeted base weight by a residual; a LoRA of the update would hold on that "
            "residual only, not on the original base a serving engine loads. Merge it instead: "
            "rankwise.unload(model, merge=True)"
        )
    for name, layer in layers:
        _check_mergeable(config.method, name, layer)

    new = unmerge(_copy_without_allocator(model))
    updates = {name: _updates(layer) for name, layer in adapted_layers(new)}
    trained = {name: module.trained_module for name, module in saved_modules(new)}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    reports: dict[str, LayerConversion] = {}
    for name, (delta, delta_bias) in updates.items():
        decomposition = plain_decomposition(delta)
        spectrum = decomposition.spectrum
        k = min(_wanted_rank(name, spectrum, rank, energy), len(spectrum))
        factors[name] = decomposition.factors(k)
        error = _relative_error(spectrum, k)
        reports[name] = LayerConversion(*delta.shape, rank=k, relative_error=error, bias=delta_bias is not None)

    carries_bias = any(report.bias for report in reports.values())
    lora_config = _lora_config({name: r.rank for name, r in reports.items()}, config.modules_to_save, carries_bias)
    adapt(unload(new, merge=False), lora_config)
    for name, layer in adapted_layers(new):
        B, A = factors[name]
        adapter = layer.adapter
        adapter.set_factor_matrices(A, B)
        delta_bias = updates[name][1]
        if delta_bias is not None:  # lora_bias is on; layers without a bias update keep the zero init
            adapter.lora_B.bias.copy_(delta_bias)
    for name, module in saved_modules(new):
        module.trained_module = trained[name]
    setattr(new, _REPORT_ATTR, LoRAConversion(config.method, lora_config, reports, list(trained)))
    return new


def to_lora_report(model: nn.Module) -> LoRAConversion:
    """The :class:`LoRAConversion` of a model :func:`to_lora` returned (in this session)."""
    report = getattr(model, _REPORT_ATTR, None)
    if report is None:
        raise ValueError(f"{type(model).__name__} was not made by rankwise.to_lora in this session")
    return report
