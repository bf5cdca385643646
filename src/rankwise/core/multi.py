"""Several named adapters on one model: add, switch, delete, combine, and a different adapter per example.

The verbs carry PEFT 0.21.2's names and semantics (``LoraModel.add_adapter`` / ``set_adapter`` /
``delete_adapter`` / ``add_weighted_adapter`` and the ``adapter_names`` forward argument)::

    model = rankwise.adapt(model, cfg)                  # adapter "default", active
    rankwise.add_adapter(model, "b", cfg_b)             # beside it, inactive (frozen)
    rankwise.set_adapter(model, "b")                    # the forward now runs "b"; only "b" trains
    with rankwise.adapter_per_example(model, ["default", "b", "__base__"]):
        out = model(batch_of_three)                     # example i runs with adapter i
    rankwise.add_weighted_adapter(model, ["default", "b"], [0.7, 0.3], "mix", combination="cat")
    rankwise.delete_adapter(model, "default")

Rules (each a ``ValueError`` naming the fix when broken):

* Every layer runs one adapter at a time, the active one, so adapters of *any* methods may coexist, also
  on the same layer: each was built on the frozen base weight, and only one is ever in effect.
* Only the active adapter trains: switching freezes the old one's parameters and gives the new one back the
  ``requires_grad`` flags it had (PEFT's ``set_adapter`` does the same). A new adapter starts inactive.
* A merged model is unmerged (with a warning) before it switches adapters, as in PEFT; an adapter is not
  added or deleted while merged. ``merge`` / ``unload(merge=True)`` merge the active adapter.
* Not supported, refused: a second adapter on a model whose adapter rewrote the base weights (PiSSA /
  OLoRA), or with ``modules_to_save`` on either side (one trained copy per module), and deleting the last
  adapter (``rankwise.unload(model, merge=False)`` does that). Rank allocators refuse models with several
  adapters (:func:`rankwise.allocator`); LoRA-Pro adjusts the active adapter, the only one that trains.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..adapters.lora import LoRAAdapter, LoRAConfig
from .config import AdapterConfig
from .inject import (
    _ACTIVE_ATTR,
    _set_child,
    active_adapter,
    adapter_configs,
    check_unmerge,
    inject,
    is_adapted,
    saved_modules,
    wrappers,
)
from .layer import BASE_ADAPTER, AdaptedLayer, Adapter, is_conv_layer, linear_shape

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
COMBINATIONS = ("linear", "cat", "svd")
_TRAINABLE_ATTR = "_rankwise_trainable"  # an inactive adapter's own requires_grad flags


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapter names, in the order they were added."""
    return list(adapter_configs(model))


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None or name == BASE_ADAPTER:
        raise ValueError(
            f"adapter name {name!r} is not usable: a name is letters, digits, '_' and '-' (it becomes a module key "
            f"and a directory name), not starting with '-', and not {BASE_ADAPTER!r}"
        )
    if is_adapted(model) and name in adapter_configs(model):
        raise ValueError(
            f"{type(model).__name__} already has an adapter named {name!r} (adapters: {adapter_names(model)}); "
            "choose another name, or rankwise.delete_adapter(model, name) first"
        )


def _check_exists(model: nn.Module, name: str, verb: str) -> None:
    if name not in adapter_configs(model):
        raise ValueError(f"{verb}: {type(model).__name__} has no adapter named {name!r}; "
                         f"its adapters are {adapter_names(model)}")


def _merged_layers(model: nn.Module) -> list[str]:
    return [name for name, layer in wrappers(model) if layer.merged]


def add_adapter(model: nn.Module, name: str, config: AdapterConfig) -> nn.Module:
    """Add adapter ``name`` built from ``config`` beside the model's adapters (PEFT's ``add_adapter``).

    The new adapter is inactive (its parameters frozen) until :func:`set_adapter` selects it. On a model
    without rankwise adapters this is ``rankwise.adapt`` with the adapter named ``name``. Its targets may
    differ from the other adapters'; a layer without the active adapter computes the base alone.
    """
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"add_adapter expects a rankwise config (e.g. rankwise.LoRAConfig), got {type(config).__name__}")
    _check_new_name(model, name)
    if not is_adapted(model):
        return inject(model, config, name)
    problem = ""
    if _merged_layers(model):
        problem = (f"adapter {active_adapter(model)!r} is merged into the base weights, so a new adapter would "
                   "be built on the merged weights; rankwise.unmerge(model) first")
    elif config.modules_to_save or any(True for _ in saved_modules(model)):
        problem = ("modules_to_save is supported for a model's only adapter (one trained copy of each module); "
                   "drop modules_to_save from the configs, or adapt a separate copy of the base model")
    elif config.changes_base_weights or any(c.changes_base_weights for c in adapter_configs(model).values()):
        problem = ("a PiSSA / OLoRA init rewrites the base weights (W_res = W - s·B0·A0), so the other adapter "
                   "would adapt the residual instead of W; use another init_weights, or adapt separate copies")
    if problem:
        raise ValueError(f"cannot add adapter {name!r} ({config.method}) to {type(model).__name__}: {problem}")
    inject(model, config, name)
    for layer in _holding(model, name):
        _freeze(layer.get_adapter(name))  # type: ignore[arg-type]
    return model


def _holding(model: nn.Module, name: str) -> list[AdaptedLayer]:
    return [layer for _, layer in wrappers(model) if layer.get_adapter(name) is not None]


def _freeze(adapter: Adapter) -> None:
    """Remember the adapter's ``requires_grad`` flags and freeze it (an inactive adapter)."""
    setattr(adapter, _TRAINABLE_ATTR, {n: p.requires_grad for n, p in adapter.named_parameters()})
    adapter.requires_grad_(False)


def _thaw(adapter: Adapter) -> None:
    """Give an adapter back the ``requires_grad`` flags :func:`_freeze` remembered."""
    flags: dict[str, bool] = adapter.__dict__.pop(_TRAINABLE_ATTR, {})
    for key, parameter in adapter.named_parameters():
        parameter.requires_grad_(flags.get(key, parameter.requires_grad))


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one (PEFT's ``set_adapter``): the forward, ``merge`` and training use it.

    A merged model is unmerged first, with a warning (PEFT does the same).
    """
    _check_exists(model, name, "set_adapter")
    old = active_adapter(model)
    if old == name:
        return model
    if _merged_layers(model):
        check_unmerge(model)  # a layer that cannot be unmerged refuses before any is
        warnings.warn(f"adapter {old!r} is merged; unmerging it before switching to {name!r}", stacklevel=2)
        for _, layer in wrappers(model):
            layer.unmerge()
    for _, layer in wrappers(model):
        if layer.adapter is not None:
            _freeze(layer.adapter)
        layer.active_adapter = name
        if layer.adapter is not None:
            _thaw(layer.adapter)
    setattr(model, _ACTIVE_ATTR, name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer (PEFT's ``delete_adapter``).

    Deleting the active adapter activates the first of the remaining names in sorted order, with a warning,
    as PEFT does. A layer left without adapters becomes its plain base layer again.
    """
    _check_exists(model, name, "delete_adapter")
    names = adapter_names(model)
    if len(names) == 1:
        raise ValueError(f"delete_adapter: {name!r} is the model's only adapter; rankwise.unload(model, merge=False) "
                         "removes it (and gives the base model back)")
    if name == active_adapter(model) and _merged_layers(model):
        raise ValueError(f"delete_adapter: adapter {name!r} is merged into the base weights; "
                         "rankwise.unmerge(model) first")
    if name == active_adapter(model):
        successor = min(n for n in names if n != name)
        warnings.warn(f"adapter {name!r} was active and is deleted; the active adapter is now {successor!r}",
                      stacklevel=2)
        set_adapter(model, successor)
    for path, layer in list(wrappers(model)):
        if layer.get_adapter(name) is None:
            continue
        layer.remove_adapter(name)
        if not layer.adapters():
            _set_child(model, path, layer.base_layer)
    del adapter_configs(model)[name]
    return model


@contextlib.contextmanager
def adapter_per_example(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, example ``i`` of every batch runs with adapter ``names[i]`` (PEFT's ``adapter_names``
    forward argument): one forward for a batch whose examples need different adapters.

    ``"__base__"`` runs an example on the base model (``modules_to_save`` modules included: their original,
    not the trained copy, as PEFT does); a layer that does not hold an example's adapter computes the base for it. Each group of examples that shares an adapter runs as one sub-batch through
    that adapter's own forward, so the result equals running each example alone with its adapter active
    (any method; dropout aside). The batch is dimension 0 of every adapted layer's input, so ``len(names)``
    must be the batch size. Refused while an adapter is merged. A context manager rather than a forward
    argument because ``transformers`` models do not pass unknown arguments down to their layers.
    """
    known = adapter_names(model)
    unknown = sorted({n for n in names if n not in known and n != BASE_ADAPTER})
    if isinstance(names, str) or unknown:
        raise ValueError(f"adapter_per_example: unknown adapter name(s) {unknown or names!r}; pass a list with one "
                         f"name per example, each one of {known} or {BASE_ADAPTER!r}")
    if _merged_layers(model):
        raise ValueError(f"adapter_per_example: adapter {active_adapter(model)!r} is merged into the base weights, "
                         "so the examples cannot use other adapters; rankwise.unmerge(model) first")
    layers = [layer for _, layer in wrappers(model)] + [module for _, module in saved_modules(model)]
    before = [layer.example_adapters for layer in layers]
    try:
        for layer in layers:
            layer.example_adapters = list(names)
        yield model
    finally:
        for layer, old in zip(layers, before):
            layer.example_adapters = old


# ----------------------------------------------------------------------------------------------
# Weighted combination
# ----------------------------------------------------------------------------------------------


def _is_additive(adapter: Adapter) -> bool:
    """True when merging adds ``delta_weight()`` to W (the merge of :class:`Adapter` itself is not overridden)."""
    kind = type(adapter)
    return kind.merged_weight is Adapter.merged_weight and kind.unmerged_weight is Adapter.unmerged_weight


def _peft_rank(config: AdapterConfig) -> int | None:
    """A config's rank as PEFT's ``add_weighted_adapter`` reads it: ``r``, or the largest ``rank_pattern`` entry."""
    r = getattr(config, "r", None)
    pattern = getattr(config, "rank_pattern", None) or {}
    return None if r is None else max([r, *pattern.values()])


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "svd",
    svd_rank: int | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name``, a LoRA combining ``adapters`` with ``weights`` (PEFT's ``add_weighted_adapter``).

    For each layer, with source adapters i (those that hold the layer), weights w_i, scales s_i and factors
    B_i A_i (ΔW_i = s_i B_i A_i), the new LoRA has scale s = 1 (alpha = r) and

    * ``"linear"`` (LoRA / rsLoRA, equal ranks r): A = Σ sign(w_i s_i) √|w_i s_i| A_i and
      B = Σ √|w_i s_i| B_i, PEFT's task arithmetic on the factors. Note B A ≠ Σ w_i ΔW_i in general (the
      cross terms B_i A_j stay): PEFT calls it "a very rough approximation".
    * ``"cat"`` (LoRA / rsLoRA): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], so
      B A = Σ w_i ΔW_i exactly; rank Σ r_i (rows of adapters that miss the layer stay zero, as in PEFT).
    * ``"svd"`` (every additive method: merging adds ``delta_weight()``): ΔW = Σ w_i ΔW_i, its SVD
      U S Vᵀ, then B = U_k S_k and A = V_kᵀ with k = ``svd_rank`` (default: the largest source rank r): the
      best rank-k approximation of ΔW (Eckart–Young). Methods without ``r`` need ``svd_rank``.

    With one source adapter, PEFT uses ``"linear"`` whatever ``combination`` says; so does this function.
    The new adapter keeps the first source's dropout (it is a LoRA config). Where rankwise differs from
    PEFT 0.21.2, on purpose: a rsLoRA source gives a plain-LoRA result with s = 1 (PEFT keeps
    ``use_rslora`` with alpha = r, so its combined adapter is scaled by √r, a bug); DoRA and adapters with
    a trained bias (``lora_bias``) are refused (PEFT resets the DoRA magnitudes to ‖W‖ and drops the biases);
    the SVD uses the reduced SVD (same leading factors) and ``svd_rank`` may not exceed min(out, in).
    The combination is computed in the adapters' precision; the new adapter starts inactive.
    """
    names = list(adapters) if not isinstance(adapters, str) else [adapters]
    weights = list(weights) if not isinstance(weights, (int, float)) else [weights]
    configs = adapter_configs(model)
    _check_new_name(model, adapter_name)
    unknown = [n for n in names if n not in configs]
    if not names or unknown:
        raise ValueError(f"add_weighted_adapter: unknown adapter name(s) {unknown or names!r}; "
                         f"the model's adapters are {list(configs)}")
    if len(weights) != len(names) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: got {len(names)} adapters {names} and weights {weights}; pass one "
                         "finite number per adapter")
    if combination not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination={combination!r} is not supported; choose one of "
                         f"{list(COMBINATIONS)}")
    combination = "linear" if len(names) == 1 else combination
    sources = [configs[n] for n in names]
    ranks = [_peft_rank(c) for c in sources]
    if combination in ("linear", "cat"):
        wrong = [f"{n} ({c.method})" for n, c in zip(names, sources) if type(c) is not LoRAConfig]
        if wrong:
            raise ValueError(f"add_weighted_adapter: combination={combination!r} combines the factors of LoRA / "
                             f"rsLoRA adapters only, not {wrong}; use combination='svd' (any additive method)")
    if combination == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"add_weighted_adapter: combination='linear' needs adapters of one rank, got ranks "
                         f"{dict(zip(names, ranks))}; use 'cat' or 'svd'")
    if combination == "svd" and svd_rank is None and None in ranks:
        raise ValueError(f"add_weighted_adapter: adapters {[n for n, r in zip(names, ranks) if r is None]} have no "
                         "rank r; pass svd_rank=<target rank>")
    if combination == "svd" and svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                                          or svd_rank <= 0):
        raise ValueError(f"add_weighted_adapter: svd_rank must be a positive integer, got {svd_rank!r}")
    new_rank = {"linear": ranks[0], "cat": sum(r or 0 for r in ranks), "svd": svd_rank or max(r or 0 for r in ranks)}
    rank = new_rank[combination]
    layers = [(path, layer, [(layer.get_adapter(n), w) for n, w in zip(names, weights)])
              for path, layer in wrappers(model) if any(layer.get_adapter(n) is not None for n in names)]
    for path, layer, pairs in layers:
        _check_combinable(path, layer, pairs, combination, rank)
    with torch.no_grad():  # every layer's factors before the new adapter exists: a failure adds nothing
        combined = {path: _combine([(a, w) for a, w in pairs if a is not None], combination, rank)
                    for path, _, pairs in layers}

    first = sources[0]
    base = {"dropout": first.dropout} if isinstance(first, LoRAConfig) else {}
    targets = "|".join(re.escape(path) for path, _, _ in layers)
    config = LoRAConfig(r=rank, alpha=float(rank), targets=targets, allow_excess_rank=True, **base)
    add_adapter(model, adapter_name, config)
    with torch.no_grad():
        for path, layer, _ in layers:
            new: LoRAAdapter = layer.get_adapter(adapter_name)  # type: ignore[assignment]
            B, A = combined[path]
            new.set_factor_matrices(A, B)
    return model


def _check_combinable(path: str, layer: AdaptedLayer, pairs: list[tuple[Adapter | None, float]],
                      combination: str, rank: int) -> None:
    """``ValueError`` naming ``path`` and the fix when the layer's adapters cannot be combined as asked: a non-additive
    adapter, a trained bias, unequal ranks for ``"linear"``, a grouped convolution (its LoRA factors are no
    matrices for ``"linear"`` / ``"cat"``; no LoRA holds the grouped update for ``"svd"``), an SVD rank above
    min(out, in). :func:`add_weighted_adapter` runs it on every layer before the new adapter is added."""
    for adapter, _ in pairs:
        if adapter is None:
            continue
        kind = type(adapter).__name__
        if not _is_additive(adapter):
            raise ValueError(f"add_weighted_adapter: {kind} on layer '{path}' is not additive (its merge is not "
                             "W + ΔW), so no weighted sum of updates is defined; combine LoRA-family or other "
                             "additive adapters")
        if adapter.delta_bias() is not None:
            raise ValueError(f"add_weighted_adapter: {kind} on layer '{path}' trains a bias, which a LoRA "
                             "combination cannot carry; combine adapters built with lora_bias=False")
    present = [adapter for adapter, _ in pairs if adapter is not None]
    groups = layer.base_layer.groups if is_conv_layer(layer.base_layer) else 1
    if combination in ("linear", "cat") and groups > 1:
        raise ValueError(f"add_weighted_adapter: layer '{path}' is a grouped convolution (groups={groups}); a "
                         f"{combination!r} combination joins the LoRA factors as matrices, which a grouped LoRA's B "
                         "kernel does not hold. Leave the layer out of the adapters you combine")
    ranks = [adapter.factor_matrices()[0].shape[0] for adapter in present] if combination == "linear" else []  # type: ignore[union-attr]
    if len(set(ranks)) > 1:
        raise ValueError(f"add_weighted_adapter: combination='linear' needs one rank per layer, but layer '{path}' "
                         f"has ranks {ranks} (rank_pattern); "
                         "use 'cat' or 'svd'")
    if combination == "svd":
        if groups > 1:  # LoHa / LoKr adapt grouped convolutions with a grouped kernel
            raise ValueError(f"add_weighted_adapter: layer '{path}' is a grouped convolution (groups={groups}); the "
                             "combined LoRA's A kernel reads every input channel, so it cannot hold the grouped "
                             "updates. Leave the layer out of the adapters you combine")
        out_f, in_f = linear_shape(layer.base_layer)
        if rank > min(out_f, in_f):
            raise ValueError(f"add_weighted_adapter: svd_rank={rank} exceeds min(out, in)={min(out_f, in_f)} of "
                             f"layer '{path}' (out={out_f}, in={in_f}); pass svd_rank <= {min(out_f, in_f)}")


def _combine(pairs: list[tuple[Adapter, float]], combination: str, rank: int) -> tuple[Tensor, Tensor]:
    """(B, A) of the combined LoRA of one layer (see :func:`add_weighted_adapter`)."""
    if combination == "svd":
        delta = sum(w * adapter.delta_weight() for adapter, w in pairs)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :rank] * S[:rank], Vh[:rank]
    factors = [(*reversed(a.factor_matrices()), w * a.scaling) for a, w in pairs]  # type: ignore[union-attr]
    if combination == "linear":
        A = sum(math.copysign(math.sqrt(abs(ws)), ws) * A_i for _, A_i, ws in factors)
        B = sum(math.sqrt(abs(ws)) * B_i for B_i, _, ws in factors)
        return B, A
    A = torch.cat([ws * A_i for _, A_i, ws in factors], dim=0)
    B = torch.cat([B_i for B_i, _, _ in factors], dim=1)
    return (torch.nn.functional.pad(B, (0, rank - B.shape[1])),
            torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0])))

