"""Read and write Hugging Face PEFT adapter directories (``adapter_config.json`` +
``adapter_model.safetensors``) for every method that registers a :class:`PeftFormat`.

PEFT stores a tensor of layer ``<path>`` as ``base_model.model.<path>.<name>`` (the adapter name
``default`` is stripped on disk) and a ``modules_to_save`` tensor as ``base_model.model.<path>.<name>``.
rankwise keeps the same tensor names wherever it can, so the mapping is a prefix change plus the
method's ``tensor_names`` table. PEFT itself is not needed to read or write these files.

Every field of PEFT's config is accounted for on import (:func:`audit_peft_config`): it is metadata,
or a field rankwise reproduces exactly (the shared ones below, and every field the method's
``to_peft_config`` writes), or it must be at its PEFT default, else ``import_peft`` raises a
``ValueError`` naming it. A field is never silently ignored, so a PEFT release that adds one fails
``tests/test_peft_audit.py`` until someone decides what it means for rankwise.

Convolution and embedding layers keep PEFT's tensor names and shapes (``lora_A.weight`` / ``lora_B.weight``
kernels, ``lora_embedding_A`` / ``lora_embedding_B``), except DoRA's magnitude on a convolution: rankwise keeps
one vector (C_out) per layer as on every layer, PEFT stores it as (1, C_out, 1, …); the two directions
reshape it (:func:`_to_peft_layout`). LoHa and LoKr on Conv1d / Conv2d keep PEFT's names and shapes too (the
Tucker cores ``hada_t1`` / ``hada_t2`` / ``lokr_t2``, a Conv1d's core as (r, r, k, 1), a full ``lokr_w2`` with the
kernel's dimensions), so they need no reshaping. A convolution PEFT 0.21.2 does not adapt as rankwise does is refused
both ways (:func:`check_peft_reproduces`): with LoRA / DoRA one with dilation ≠ 1 or a padding mode other than zeros
(its ``lora_A`` drops both, peft#3697), with LoHa / LoKr one with a padding mode other than zeros (PEFT convolves
with ΔW under zero padding) or, for LoKr, a Tucker core on a kernel whose last size is 1 (PEFT raises), with the
methods rankwise runs on convolution patches every one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..core.inject import (
    active_adapter,
    adapted_layers,
    adapter_config,
    find_targets,
    layer_modules,
    saved_modules,
    wrappers,
)
from ..core.io import adapter_state, load_state_into, read_json, read_tensors, save_json, save_tensors
from ..core.layer import DEFAULT_ADAPTER, is_conv_layer, is_fan_in_fan_out
from ..core.registry import Method, registered

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _peft_key_map(model: nn.Module, method: Method, adapter_name: str):
    """Our adapter-state key -> PEFT's on-disk key (None for tensors PEFT does not store), for adapter ``adapter_name``."""
    layers = [name for name, layer in wrappers(model) if layer.get_adapter(adapter_name) is not None]
    names = method.peft.tensor_names if method.peft else {}

    def to_peft(key: str) -> str | None:
        for layer in layers:
            head = f"{layer}.adapter."
            if key.startswith(head):
                local = key[len(head):]
                peft_local = names.get(local, local)
                return None if peft_local is None else PEFT_PREFIX + layer + "." + peft_local
        return PEFT_PREFIX + key  # a modules_to_save tensor

    return to_peft


def check_peft_reproduces(layers: dict[str, nn.Module], method: Method, config: Any, source: object) -> None:
    """``ValueError`` for a layer whose adapter PEFT 0.21.2 does not compute as rankwise does: any convolution for
    a method rankwise runs on convolution patches (PEFT's C3A, MiSS, GraLoRA have no convolution layers), and
    what the method's ``refuse_layer`` names: for LoRA / DoRA a convolution with dilation ≠ 1 or a padding mode
    other than zeros (PEFT's ``lora_A`` drops both, peft#3697), for LoHa / LoKr one with a padding mode other than
    zeros (PEFT convolves with ΔW under zero padding) and LoKr's Tucker core on a kernel whose last size is 1
    (PEFT's ``torch.kron`` raises there)."""
    for name, module in layers.items():
        if is_conv_layer(module) and method.adapter_cls.conv_as_patches:
            raise ValueError(
                f"{source}: layer '{name}' is a {type(module).__name__}; PEFT's {method.peft.peft_type} adapts no "
                "convolution layers (rankwise adapts it through its flattened kernel). Use rankwise.save / "
                "rankwise.load for this model, or leave the layer out of targets"
            )
        reason = None if method.peft.refuse_layer is None else method.peft.refuse_layer(module, config.for_layer(name))
        if reason is not None:
            raise ValueError(
                f"{source}: layer '{name}' is a {type(module).__name__} with {reason}. Use rankwise.save / "
                "rankwise.load for this model, or leave the layer out of targets"
            )


def _to_peft_layout(layers: dict[str, nn.Module], tensors: dict[str, Tensor], to_peft: bool) -> None:
    """Reshape, in place, the DoRA magnitude of each convolution in ``layers`` (PEFT key
    ``base_model.model.<layer>.lora_magnitude_vector``) to PEFT's (1, C_out, 1, …) when ``to_peft``, else to rankwise's (C_out)."""
    for name, module in layers.items():
        key = f"{PEFT_PREFIX}{name}.lora_magnitude_vector"
        if is_conv_layer(module) and key in tensors:
            peft_shape = (1, module.out_channels) + (1,) * (module.weight.dim() - 2)
            if to_peft or tuple(tensors[key].shape) == peft_shape:  # another shape: the load reports it
                tensors[key] = tensors[key].reshape(peft_shape if to_peft else (-1,))


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's ``target_modules`` that select exactly the layers ``names`` of ``model``.

    PEFT reads a list as suffixes on a dot boundary: ``["up"]`` selects ``up`` and also ``block.up``. A
    list of full names is written when it selects nothing else; otherwise a regex that PEFT full-matches
    (``up|layer\\.0\\.up``), so a PEFT reload never adapts a layer the export did not (with a fresh,
    possibly non-zero adapter, or an error on a module type it does not support)."""
    wanted = set(names)
    selected = {
        key for key in layer_modules(model)
        if key in wanted or any(key.endswith("." + name) for name in wanted)
    }
    if selected == wanted:
        return sorted(wanted)
    return "|".join(re.escape(name) for name in sorted(wanted))


def export_peft(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the model's active adapter as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads
    (another adapter: ``rankwise.set_adapter`` it first).

    The written config is checked with the method's import reader first, so a model PEFT would not
    reload as rankwise computes it (e.g. OLoRA on a Conv1D layer, or ``modules_to_save`` entries PEFT's
    suffix rule stretches to other modules: :func:`check_peft_modules_to_save`) raises ``ValueError`` and
    nothing is written. A PiSSA / OLoRA adapter is written without conversion (``init_lora_weights`` kept): PEFT
    reloads it onto the *original* base, recomputing the residual, as it does for its own files.
    """
    config = adapter_config(model)
    method = next(m for m in registered() if m.name == config.method)
    if method.peft is None:
        supported = sorted(m.name for m in registered() if m.peft)
        raise ValueError(f"method {config.method!r} has no PEFT equivalent; export_peft supports {supported}")
    layers = list(adapted_layers(model))
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    payload: dict[str, Any] = {
        "peft_type": method.peft.peft_type,
        "task_type": None,
        "base_model_name_or_path": base_name if isinstance(base_name, str) else None,
        "inference_mode": True,
        "target_modules": peft_target_modules(model, [name for name, _ in layers]),
        "modules_to_save": config.modules_to_save,
        "bias": "none",
        "revision": None,
        **method.peft.to_peft_config(config),
    }
    # Not every PEFT config class knows fan_in_fan_out (C3A, MiSS do not): write it only when it matters.
    if any(is_fan_in_fan_out(layer.base_layer) for _, layer in layers):
        payload["fan_in_fan_out"] = True
    # What import_peft would refuse, PEFT would not reload as this model computes it (e.g. OLoRA on Conv1D).
    method.peft.from_peft_config(payload)
    bases = {name: layer.base_layer for name, layer in layers}
    check_peft_reproduces(bases, method, config, "export_peft")
    check_peft_modules_to_save(model, config.modules_to_save)
    to_peft = _peft_key_map(model, method, active_adapter(model))
    state = adapter_state(model)
    if method.peft.prepare_export is not None:
        method.peft.prepare_export(model, payload, state)
    tensors = {}
    for key, value in state.items():
        peft_key = to_peft(key)
        if peft_key is not None:
            tensors[peft_key] = value
    _to_peft_layout(bases, tensors, to_peft=True)
    directory = Path(directory)
    save_tensors(directory / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    # Pattern dicts in their own order: PEFT reads the file's order, and its first matching key wins (PEFT's own
    # save_pretrained sorts them, so a PEFT model can reload as another; rankwise's export keeps the meaning).
    save_json(directory / PEFT_CONFIG, payload, keep_order=True)
    return directory


# Fields that describe the file, not the adapter's function.
METADATA_FIELDS = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
# Fields every method reproduces: the layer selection (PEFT's list / regex semantics are rankwise's),
# modules_to_save (resolved with PEFT's suffix rule by :func:`peft_modules_to_save`) and
# fan_in_fan_out (rankwise detects Conv1D layers itself, which is what PEFT's auto-correction of the
# flag amounts to).
SHARED_FIELDS = frozenset({"target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out"})
# Fields that change nothing on their own: PEFT drops ``runtime_config`` when it reads a config,
# ``eva_config`` only says how EVA computed its starting tensors from data (a reload never reads it; the
# file's tensors replace them), and the others only qualify a field that is refused when set
# (layers_to_transform, megatron_config, use_qalora).
INERT_FIELDS = frozenset({"runtime_config", "eva_config", "layers_pattern", "megatron_core", "qalora_group_size"})
# PEFT defaults that are not empty / None / False.
_NON_EMPTY_DEFAULTS = {"bias": "none"}


def _is_default(key: str, value: Any) -> bool:
    return value in (None, False, "", [], {}) or _NON_EMPTY_DEFAULTS.get(key) == value


def reproduced_fields(method: Method, config: Any) -> frozenset[str]:
    """The PEFT config fields import_peft reproduces for ``method``: the shared ones plus those its exporter writes."""
    return SHARED_FIELDS | frozenset(method.peft.to_peft_config(config))


def audit_peft_config(peft_config: dict[str, Any], method: Method, config: Any, source: Path) -> None:
    """Refuse every PEFT field that is set to a non-default value and that rankwise does not reproduce.

    Per-module overrides (``rank_pattern``, ``alpha_pattern``, ``block_size_pattern``), layer subsets
    (``layers_to_transform``), trained biases (``bias`` other than ``"none"``), QALoRA, layer
    replication, Megatron, trainable tokens, target parameters, the LoRA variants' option blocks
    (LoRA-GA, Arrow, aLoRA, VeLoRA, ...) and any field a later PEFT adds all land here.
    """
    allowed = METADATA_FIELDS | INERT_FIELDS | reproduced_fields(method, config)
    problems = [
        f"{key}={value!r}" for key, value in sorted(peft_config.items())
        if key not in allowed and not _is_default(key, value)
    ]
    if problems:
        raise ValueError(
            f"{source}: PEFT {peft_config.get('peft_type')} option(s) {', '.join(problems)} have no rankwise "
            "equivalent, so import_peft cannot reproduce this adapter and refuses it rather than ignore them. "
            "Re-train without them, or merge the adapter into the base with PEFT's merge_and_unload"
        )


def peft_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str] | None:
    """The full names of the modules PEFT wraps for ``modules_to_save``: PEFT selects every module whose
    name ends with an entry, with no dot boundary (``"head"`` also selects ``lm_head``), and wraps the
    outermost of nested hits."""
    if not names:
        return None
    return _peft_wrapped([key for key, _ in model.named_modules()], names) or list(names)


def _peft_wrapped(modules: list[str], names: list[str]) -> list[str]:
    """Of the module names ``modules`` (in model order), those PEFT wraps for the ``modules_to_save`` entries
    ``names``: every one ending with an entry, no dot boundary, the outermost of nested hits."""
    hits = [key for key in modules if key and any(key.endswith(name) for name in names)]
    return [key for key in hits if not any(key.startswith(other + ".") for other in hits)]


def check_peft_modules_to_save(model: nn.Module, names: list[str] | None) -> None:
    """``ValueError`` unless PEFT, reading ``modules_to_save=names``, wraps only modules this model saves in full.

    PEFT selects every module whose name *ends with* an entry, with no dot boundary, where rankwise requires one:
    ``"head"`` saves ``head`` here but also selects ``pre_head`` (DistilBERT's ``pre_classifier`` next to
    ``classifier``) in PEFT. Such a file does not load: PEFT wraps an adapted layer as a module to save (a
    TypeError) or expects tensors the file lacks, and ``import_peft`` reads the same selection. The names are
    those of the base model (an adapted layer as its own name, nothing inside a wrapper), as PEFT sees them."""
    if not names:
        return
    saved = {name for name, _ in saved_modules(model)}
    adapted = {name for name, _ in wrappers(model)}
    extra = [key for key in _peft_wrapped(list(layer_modules(model)), names) if key not in saved]
    if extra:
        what = ", ".join(f"'{key}'" + (" (an adapted layer)" if key in adapted else "") for key in extra)
        raise ValueError(
            f"export_peft: PEFT reads modules_to_save={names} as name endings without a dot boundary, so it would "
            f"also wrap {what}, which rankwise does not save in full (it saves {sorted(saved)}); PEFT could not load "
            "the file. Use rankwise.save / rankwise.load for this model, or name the saved modules by entries no "
            "other module's name ends with"
        )


def _method_for(peft_config: dict[str, Any], source: Path) -> Method:
    peft_type = peft_config.get("peft_type")
    for method in registered():
        if method.peft and method.peft.peft_type == peft_type and method.peft.matches(peft_config):
            return method
    supported = sorted({m.peft.peft_type for m in registered() if m.peft})
    raise ValueError(f"{source}: PEFT adapter type {peft_type!r} is not supported; rankwise imports {supported}")


def import_peft(
    base_model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER
) -> nn.Module:
    """Adapt ``base_model`` with an adapter saved by PEFT's ``save_pretrained`` and load its tensors.

    The adapter is named ``adapter_name``; on a model that carries rankwise adapters already it is added
    beside them, inactive (PEFT's ``load_adapter``).

    The result computes what ``PeftModel.from_pretrained(base_model, directory)`` computes. Every PEFT
    config field is audited first (:func:`audit_peft_config`); an adapter with a field rankwise cannot
    reproduce is refused before the model changes. Ranks above min(out, in), which PEFT accepts, are
    imported (the config gets ``allow_excess_rank=True``). LoRA adapters initialised with PiSSA or
    OLoRA and saved without conversion change the base weight exactly as PEFT's reload does (see
    :mod:`rankwise.adapters.lora`), so ``base_model`` must be the original base they were trained on.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {directory} does not exist")
    peft_config = read_json(directory / PEFT_CONFIG, "rankwise.import_peft")
    if not (directory / PEFT_WEIGHTS).is_file() and (directory / "adapter_model.bin").is_file():
        raise ValueError(
            f"{directory} holds only adapter_model.bin (a pickle); rankwise never unpickles. Re-save it with "
            "PEFT's save_pretrained(safe_serialization=True)"
        )
    method = _method_for(peft_config, directory)
    targets = peft_config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    if not targets:
        raise ValueError(f"{directory / PEFT_CONFIG} names no target_modules")
    config = method.config_cls(
        targets=targets,
        exclude=peft_config.get("exclude_modules") or None,
        modules_to_save=peft_modules_to_save(base_model, peft_config.get("modules_to_save")),
        **method.peft.from_peft_config(peft_config),
    )
    audit_peft_config(peft_config, method, config, directory)
    modules = layer_modules(base_model)  # an adapted layer as its base layer (a second, named adapter)
    bases = {name: modules[name] for name in find_targets(base_model, config)}
    check_peft_reproduces(bases, method, config, directory)
    tensors = read_tensors(directory / PEFT_WEIGHTS, "rankwise.import_peft")
    _to_peft_layout(bases, tensors, to_peft=False)
    # The key map reads the adapted layers, which exist only once load_state_into has adapted the
    # model (in place), so it is built on first use.
    built: dict[str, Any] = {}

    def key_map(key: str) -> str | None:
        if "map" not in built:
            built["map"] = _peft_key_map(base_model, method, adapter_name)
        return built["map"](key)

    return load_state_into(base_model, config, tensors, source=str(directory), key_map=key_map,
                           adapter_name=adapter_name)
