"""Targeting and injection: which layers get an adapter, and the model-level verbs.

``adapt`` is transactional: every adapter is built (and validated against its layer) before the
model is touched, so a config that does not fit some layer raises without leaving the model half
adapted. ``unload`` gives back the plain model with the original ``requires_grad`` flags.
``modules_to_save`` modules train as a copy beside the untouched original (:class:`SavedModule`).
Quantised layers are refused, never wrapped as float layers, except bitsandbytes 4-/8-bit layers for the
methods that support them (:mod:`rankwise.core.quantised`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .layer import DEFAULT_ADAPTER, AdaptedLayer, SavedModule, is_adaptable_layer, is_supported_layer, linear_shape
from .quantised import (
    bnb_kind,
    bnb_settings,
    check_adaptable,
    check_not_quantised,
    check_not_sharded,
    is_quantised_linear,
    quantisation_reason,
)
from .registry import get_method, registered

ALL_LINEAR = "all-linear"
_CONFIGS_ATTR = "_rankwise_configs"  # {adapter name: config}, in the order the adapters were added
_ACTIVE_ATTR = "_rankwise_active"  # the active adapter's name
_FLAGS_ATTR = "_rankwise_requires_grad"


# ----------------------------------------------------------------------------------------------
# Target selection
# ----------------------------------------------------------------------------------------------


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in pattern)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head(s), which ``"all-linear"`` leaves alone.

    For a transformers ``PreTrainedModel`` these are the output embeddings (``lm_head``) and every
    layer outside the backbone named by ``base_model_prefix`` (``classifier``, ``score``,
    ``qa_outputs``, ...). A plain ``nn.Module`` has no recognisable head, so nothing is excluded
    (the same rule as PEFT).
    """
    heads: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    outside_backbone = isinstance(backbone, nn.Module) and backbone is not model
    for name, module in model.named_modules():
        is_output = output is not None and module is output
        if is_output or (outside_backbone and name and name != prefix and not name.startswith(prefix + ".")):
            heads.add(name)
    return heads


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the model as targeting sees it: an adapted layer as its base layer, and nothing
    inside an adapted layer or a ``modules_to_save`` wrapper (an adapter's own ``lora_A`` is no target). For a
    model without adapters this is ``dict(model.named_modules())``."""
    found: dict[str, nn.Module] = {}
    inside = None  # named_modules is a pre-order walk, so a wrapper's contents directly follow it
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, (AdaptedLayer, SavedModule)) else None
        found[name] = module.base_layer if isinstance(module, AdaptedLayer) else module
    return found


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the layers ``config`` selects, in model order; ``ValueError`` if the selection is bad.

    Modules in ``config.modules_to_save`` (and everything inside them) are never targets. A quantised
    layer that the selection reaches (bitsandbytes, torchao, GPTQ, ...: see :mod:`rankwise.core.quantised`)
    is refused with a ``ValueError`` rather than wrapped as if it were a float ``nn.Linear``, or skipped;
    only a method whose config sets ``quantised_base`` may target a quantised bitsandbytes layer
    (:func:`check_target`).
    On an adapted model an adapted layer counts as its base layer (:func:`layer_modules`).
    """
    modules = layer_modules(model)
    supported = [name for name, m in modules.items() if name and is_supported_layer(m)]
    saved = list(_modules_to_save(model, config))

    def excluded(name: str) -> bool:
        if any(name == s or name.startswith(s + ".") for s in saved):
            return True
        return config.exclude is not None and _matches(name, config.exclude)

    if config.targets == ALL_LINEAR:
        heads = output_head_names(model)
        names = [n for n, m in modules.items()
                 if n and (is_supported_layer(m) or is_quantised_linear(m)) and n not in heads and not excluded(n)]
        for name in names:  # "all-linear" never skips a quantised linear layer in silence
            check_target(name, modules[name], config)
    else:
        names, named = [], []  # named: every layer a target names, excluded ones too (PEFT accepts those)
        for name, module in modules.items():
            if not name or not _matches(name, config.targets):
                continue
            named.append(name)
            if excluded(name):
                continue
            check_target(name, module, config)
            if not is_adaptable_layer(module):
                raise ValueError(
                    f"target {config.targets!r} matches '{name}', a {type(module).__name__}, but rankwise "
                    "adapters wrap nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding layers only. "
                    "Name its linear sub-layers instead, e.g. "
                    f"{_examples([n for n in supported if n.startswith(name + '.')])}."
                )
            names.append(name)
        if isinstance(config.targets, list):
            unmatched = [t for t in config.targets if not any(n == t or n.endswith("." + t) for n in named)]
            if unmatched and names:
                raise ValueError(
                    f"target name(s) {unmatched} match no Linear/Conv1D layer of {type(model).__name__}; "
                    f"fix the spelling or drop them. Available suffixes: {_suffixes(supported)}."
                )
    if not names:
        raise ValueError(
            f"targets {config.targets!r} match no Linear/Conv1D layer of {type(model).__name__}. "
            f"Candidate layers: {_examples(supported)}; available suffixes: {_suffixes(supported)}."
        )
    return names


def check_target(name: str, module: nn.Module, config: AdapterConfig) -> None:
    """``ValueError`` unless ``config``'s method may wrap ``module`` as far as quantisation goes.

    Without a method (compression's target selection) every quantised layer is refused. A method may wrap a
    quantised bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` when its config sets ``quantised_base`` and its init
    leaves the base weight alone (PiSSA / OLoRA rewrite it, which a quantised weight cannot hold exactly; PEFT
    refuses them too); the error names the method, the layer and the methods that can.
    """
    if not config.method:
        check_not_quantised(name, module)
        return
    check_adaptable(name, module)
    if bnb_kind(module) is None:
        return
    why = None if config.quantised_base else f"{config.method} has no quantised-base path"
    if config.quantised_base and config.changes_base_weights:
        why = ("its init rewrites the base weight (PiSSA / OLoRA), which a quantised layer cannot hold exactly; "
               "initialise on the float model and quantise the residual, or use another init")
    if why is not None:
        supported = sorted(m.name for m in registered() if m.config_cls.quantised_base)
        raise ValueError(
            f"method {config.method!r} cannot adapt layer '{name}', a bitsandbytes {bnb_settings(module)} layer: "
            f"{why}. Methods that adapt quantised bitsandbytes layers: {supported}. Load the model in floating "
            "point, or leave this layer out (exclude=...)"
        )


def _examples(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _suffixes(names: list[str]) -> str:
    seen: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        seen[parts[-1]] = None
        if len(parts) > 1 and not parts[-2].isdigit():
            seen[".".join(parts[-2:])] = None
    return ", ".join(sorted(seen))


# ----------------------------------------------------------------------------------------------
# Model-level verbs
# ----------------------------------------------------------------------------------------------


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(name, wrapper) for every layer that holds the active adapter (``wrapper.adapter``); the name is the
    original layer's path. With one adapter per model: every adapted layer."""
    for name, module in wrappers(model):
        if module.adapter is not None:
            yield name, module


def wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(name, wrapper) for every adapted layer, whichever adapters it holds."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """(name, wrapper) for every ``modules_to_save`` module; the name is the original module's path."""
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """``{adapter name: config}`` of every adapter of the model, in the order they were added (the model's own
    record: change it through the model-level verbs); ``ValueError`` if it carries no rankwise adapter."""
    configs = getattr(model, _CONFIGS_ATTR, None)
    if not configs:
        raise ValueError(f"{type(model).__name__} carries no rankwise adapter; call rankwise.adapt(model, config) first")
    return configs


def active_adapter(model: nn.Module) -> str:
    """The name of the model's active adapter (``"default"`` for a model adapted by ``rankwise.adapt``)."""
    adapter_configs(model)  # a model without adapters raises its own clear error
    return getattr(model, _ACTIVE_ATTR)


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> AdapterConfig:
    """The config of adapter ``adapter_name`` (default: the active adapter); ``ValueError`` if the model carries
    no rankwise adapter or none of that name."""
    configs = adapter_configs(model)
    name = active_adapter(model) if adapter_name is None else adapter_name
    if name not in configs:
        raise ValueError(f"{type(model).__name__} has no adapter named {name!r}; its adapters are {list(configs)}")
    return configs[name]


def replace_adapter_config(model: nn.Module, config: AdapterConfig) -> None:
    """Record ``config`` as the adapted model's config, for a method that rebuilt its adapters to fit it (GoRA
    writes the ranks it allocated into ``rank_pattern``); the method must stay the same."""
    if adapter_config(model).method != config.method:
        raise ValueError(f"replace_adapter_config: the model is adapted with {adapter_config(model).method!r}, "
                         f"not {config.method!r}")
    adapter_configs(model)[active_adapter(model)] = config


def is_adapted(model: nn.Module) -> bool:
    return bool(getattr(model, _CONFIGS_ATTR, None)) or any(True for _ in wrappers(model))


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in the base's precision, except that half-precision bases get float32 adapters
    (PEFT's ``autocast_adapter_dtype=True``)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze every base parameter and wrap each targeted layer with the config's adapter.

    The model is changed in place and returned. Each module in ``config.modules_to_save`` is wrapped
    in a :class:`SavedModule`: the forward runs a trainable copy, the original stays frozen and as it was.
    The adapter is named ``"default"`` and is active; ``rankwise.add_adapter`` adds more beside it.
    A model FSDP2 already sharded is refused: adapt first, then ``fully_shard``.
    """
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"adapt expects a rankwise config (e.g. rankwise.LoRAConfig), got {type(config).__name__}")
    if is_adapted(model):
        raise ValueError(
            f"{type(model).__name__} already carries a rankwise adapter; rankwise.unload(model) it first, "
            "adapt a fresh copy of the base model, or add a second one with rankwise.add_adapter(model, name, config)"
        )
    return inject(model, config, DEFAULT_ADAPTER)


def inject(model: nn.Module, config: AdapterConfig, name: str) -> nn.Module:
    """Build adapter ``name`` for every layer ``config`` targets, then put it in place (nothing changes if a
    layer refuses the config). On a model without adapters this is ``adapt``, and ``name`` becomes the active
    adapter; on an adapted one (``rankwise.add_adapter``, which checks the rest) the new adapter sits beside
    the others, inactive, and ``config.modules_to_save`` is not used."""
    first = not is_adapted(model)
    method = get_method(config.method)
    names = find_targets(model, config)
    layers = layer_modules(model)
    for target in names:
        check_not_sharded(target, layers[target], "Adapt the plain model first, then call fully_shard, so that FSDP "
                          "shards and synchronises the adapter's parameters too")
    adapters = {target: method.adapter_cls(layers[target], config, target) for target in names}
    saved = {target: SavedModule(layers[target]) for target in _modules_to_save(model, config)} if first else {}

    if first:
        setattr(model, _FLAGS_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        setattr(model, _CONFIGS_ATTR, {})
        setattr(model, _ACTIVE_ATTR, name)
    for target, adapter in adapters.items():
        base = layers[target]
        adapter.to(device=base.weight.device, dtype=adapter_dtype(base.weight.dtype))
        adapter.train(base.training)  # a model adapted in eval mode stays in eval mode
        adapter.attach()
        wrapper = model.get_submodule(target)
        if isinstance(wrapper, AdaptedLayer):
            wrapper.add_adapter(name, adapter)
        else:
            wrapper = AdaptedLayer(base, adapter, name)
            wrapper.active_adapter = getattr(model, _ACTIVE_ATTR)
            _set_child(model, target, wrapper)
    for target, module in saved.items():
        _set_child(model, target, module)
    getattr(model, _CONFIGS_ATTR)[name] = config
    return model


def _modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names (by name or suffix), outermost only, in model order."""
    found: list[str] = []
    for wanted in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n == wanted or n.endswith("." + wanted)]
        if not hits:
            raise ValueError(
                f"modules_to_save entry {wanted!r} matches no module of {type(model).__name__}; "
                f"top-level modules are {[n for n, _ in model.named_children()]}"
            )
        found += [n for n in hits if n not in found]
    outermost = [n for n in found if not any(n.startswith(outer + ".") for outer in found)]
    for path in outermost:  # a trained copy of a quantised module: its integer weights cannot take gradients
        for inner, module in model.get_submodule(path).named_modules():
            reason = quantisation_reason(module)
            if reason is not None:
                where = f"{path}.{inner}" if inner else path
                raise ValueError(
                    f"modules_to_save entry {path!r} holds the quantised layer {where!r} ({reason}); a module to "
                    "save is trained as a full copy, which a quantised weight cannot be. Load that module unquantised "
                    "(e.g. llm_int8_skip_modules in transformers' BitsAndBytesConfig), or leave it out of modules_to_save"
                )
    return outermost


def check_merge(model: nn.Module, safe: bool = False) -> None:
    """``ValueError`` if merging the active adapter would refuse in some layer; nothing changes.

    Runs :func:`check_unshared` (a weight tied to another part of the model) and :meth:`AdaptedLayer.check_merge` on
    every layer (an adapter with no merged form, such as LoRA on a grouped convolution; a bias update on a layer
    without bias; with ``safe``, a non-finite merged weight), so
    :func:`merge` and ``unload(merge=True)`` refuse before the first layer is written rather than after some.
    """
    check_unshared(model)
    for _, layer in adapted_layers(model):
        layer.check_merge(safe=safe)


def check_unshared(model: nn.Module) -> None:
    """``ValueError`` when a layer about to be merged shares a tensor the merge writes with another part of the model.

    Merging writes the update into the base layer's weight (and bias, for a bias update) in place. When that
    tensor is also used elsewhere -- tied input embeddings and ``lm_head`` of a language model, or one module
    reachable under two names -- every use would change, while the unmerged adapter changes only the wrapped
    path: the merged model would silently compute something else (PEFT 0.21.2 merges it anyway, with a warning
    for ``lm_head`` only). Sharing is found with ``named_parameters(remove_duplicate=False)``: the layer's own
    ``<name>.base_layer.weight`` appears once, any other name for the same tensor (the same parameter object, or
    one aliasing its memory) shares it. A ``modules_to_save`` original does not count: the forward never runs it.
    Adapting and training a tied layer stays allowed; only merging it is refused.
    """
    pending = [(name, layer) for name, layer in adapted_layers(model) if layer.adapter is not None and not layer.merged]
    if not pending:
        return
    originals = tuple(f"{name}.original_module." for name, _ in saved_modules(model))
    names: dict[object, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not name.startswith(originals):
            names.setdefault(_tensor_key(parameter), []).append(name)
    modules = [(name, module) for name, module in model.named_modules(remove_duplicate=False)]
    for name, layer in pending:
        written = {"weight": layer.base_layer.weight}
        bias = getattr(layer.base_layer, "bias", None)  # nn.Embedding has none
        if bias is not None and layer.adapter.delta_bias() is not None:
            written["bias"] = bias
        for attr, tensor in written.items():
            own = f"{name}.base_layer.{attr}"
            others = [n for n in names.get(_tensor_key(tensor), []) if n != own]
            if not others:
                continue
            same_module = [n for n, m in modules if m is layer.base_layer and n != f"{name}.base_layer"]
            if same_module:
                what = f"is the same module as {same_module} (one nn.Module used under two names)"
                other = _python_path(same_module[0])
                untie = f"{other} = copy.deepcopy({other})"
            else:
                what = f"shares its {attr} tensor with {others} (tied weights)"
                other = _python_path(others[0])
                untie = f"{other} = nn.Parameter({other}.detach().clone())"
            raise ValueError(
                f"cannot merge layer '{name}' ({type(layer.base_layer).__name__}): it {what}. Merging writes the "
                f"update into that shared tensor, so every use of it would change, while the unmerged adapter changes "
                f"only '{name}': the merged model would compute something else. Nothing was merged. Keep the adapter "
                f"unmerged, or untie the weights before merging, e.g. {untie}"
            )


def _python_path(name: str) -> str:
    """``model.<name>`` as Python reads it: ``h.0.mlp`` is ``model.h[0].mlp``."""
    return "model" + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split("."))


def _tensor_key(tensor: Tensor) -> object:
    """What identifies a tensor's memory: (device, address of its first element), or the object itself when it has
    no address (meta tensors, empty tensors)."""
    pointer = tensor.data_ptr()
    return (tensor.device, pointer) if pointer and tensor.numel() else id(tensor)


def check_unmerge(model: nn.Module) -> None:
    """``ValueError`` if some merged layer cannot be unmerged (MiSS "bat" with a singular I + D_i); nothing changes.

    Runs :meth:`AdaptedLayer.check_unmerge` on every layer, so :func:`unmerge`, ``unload(merge=False)`` and
    ``set_adapter`` refuse before the first layer is unmerged or unwrapped rather than after some.
    """
    for _, layer in wrappers(model):
        layer.check_unmerge()


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapter into its base weights (idempotent). Any refusal (:func:`check_merge`: an adapter
    that cannot be merged, a weight shared with another layer, a non-finite result with ``safe``) raises
    ``ValueError`` before any layer is merged."""
    check_merge(model, safe=safe)
    for _, layer in adapted_layers(model):
        layer.merge(safe=safe)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (idempotent). A layer that cannot be unmerged refuses before any is (:func:`check_unmerge`)."""
    check_unmerge(model)
    for _, layer in wrappers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter, merging the active one first when ``merge``; restore the original trainable flags.

    ``modules_to_save``: with ``merge`` the trained copy takes the original's place (PEFT's
    ``merge_and_unload`` keeps it too); without, the original module comes back and the model is the
    one that was adapted. (PEFT's ``unload()`` keeps the trained copy either way; rankwise's
    ``unload(merge=False)`` means "discard what was trained".)
    """
    found: list[tuple[str, AdaptedLayer | SavedModule]] = [*wrappers(model), *saved_modules(model)]
    if merge:  # a layer that cannot be merged (or unmerged) refuses before any layer is unloaded
        check_merge(model)
    else:
        check_unmerge(model)
    for name, wrapper in found:
        _set_child(model, name, wrapper.unload(merge=merge))
    flags: dict[str, bool] = getattr(model, _FLAGS_ATTR, {})
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name, parameter.requires_grad))
    for attr in (_CONFIGS_ATTR, _ACTIVE_ATTR, _FLAGS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: no adapter (merged adapters are taken out and put back)
    and the original ``modules_to_save`` modules instead of their trained copies."""
    layers = [layer for _, layer in wrappers(model)]
    saved = [module for _, module in saved_modules(model)]
    merged = [layer.merged for layer in layers]
    check_unmerge(model)  # before any layer is unmerged
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        for module in saved:
            module.disabled = True
        yield model
    finally:
        for module in saved:
            module.disabled = False
        for layer, was_merged in zip(layers, merged):
            layer.disabled = False
            if was_merged:
                layer.merge()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(model: nn.Module) -> str:
    """A per-layer table (method, shape, trainable count) and PEFT's one-line total.

    As in PEFT's ``print_trainable_parameters``, "all params" counts every parameter the model holds (a
    ``modules_to_save`` module's frozen original and its trained copy both) and "trainable params" the
    parameters that require gradients (the copy, once). The rows show the active adapter; a model with
    several adapters gets a line naming them all.
    """
    rows: list[tuple[str, ...]] = [("layer", "method", "shape (out x in)", "adapter", "trainable")]
    configs: dict[str, AdapterConfig] = getattr(model, _CONFIGS_ATTR, None) or {}
    active = getattr(model, _ACTIVE_ATTR, None)
    method = configs[active].method if active in configs else "?"
    for name, layer in adapted_layers(model):
        out_f, in_f = linear_shape(layer.base_layer)
        count = sum(p.numel() for p in layer.adapter.parameters() if p.requires_grad)
        rows.append((name, method, f"{out_f} x {in_f}", layer.adapter.describe(), f"{count:,}"))
    for name, module in saved_modules(model):
        count = sum(p.numel() for p in module.trained_module.parameters() if p.requires_grad)
        rows.append((name, "full", type(module.trained_module).__name__, "modules_to_save", f"{count:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    trainable = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    percent = 100.0 * trainable / total if total else 0.0
    lines.append("")
    if len(configs) > 1:
        lines.append("adapters: " + ", ".join(f"{n} ({c.method}{', active' if n == active else ''})"
                                             for n, c in configs.items()))
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
    return "\n".join(lines)
