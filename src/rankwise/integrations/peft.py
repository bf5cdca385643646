"""Read and write Hugging Face PEFT adapter directories (``adapter_config.json`` +
``adapter_model.safetensors``) for every method that registers a :class:`PeftFormat`.

PEFT stores a tensor of layer ``<path>`` as ``base_model.model.<path>.<name>`` (the adapter name
``default`` is stripped on disk) and a ``modules_to_save`` tensor as ``base_model.model.<path>.<name>``.
rankwise keeps the same tensor names wherever it can, so the mapping is a prefix change plus the
method's ``tensor_names`` table. PEFT itself is not needed to read or write these files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.inject import adapted_layers, adapter_config
from ..core.io import adapter_state, load_state_into, read_json, read_tensors, save_json, save_tensors
from ..core.layer import is_fan_in_fan_out
from ..core.registry import Method, registered

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _peft_key_map(model: nn.Module, method: Method):
    """Our adapter-state key -> PEFT's on-disk key (None for tensors PEFT does not store)."""
    layers = [name for name, _ in adapted_layers(model)]
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


def export_peft(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the model's adapter as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
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
        "target_modules": sorted(name for name, _ in layers),
        "modules_to_save": config.modules_to_save,
        "bias": "none",
        "revision": None,
        **method.peft.to_peft_config(config),
    }
    # Not every PEFT config class knows fan_in_fan_out (C3A, MiSS do not): write it only when it matters.
    if any(is_fan_in_fan_out(layer.base_layer) for _, layer in layers):
        payload["fan_in_fan_out"] = True
    to_peft = _peft_key_map(model, method)
    state = adapter_state(model)
    if method.peft.prepare_export is not None:
        method.peft.prepare_export(model, payload, state)
    tensors = {}
    for key, value in state.items():
        peft_key = to_peft(key)
        if peft_key is not None:
            tensors[peft_key] = value
    directory = Path(directory)
    save_tensors(directory / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    save_json(directory / PEFT_CONFIG, payload)
    return directory


def _method_for(peft_config: dict[str, Any], source: Path) -> Method:
    peft_type = peft_config.get("peft_type")
    for method in registered():
        if method.peft and method.peft.peft_type == peft_type and method.peft.matches(peft_config):
            return method
    supported = sorted({m.peft.peft_type for m in registered() if m.peft})
    raise ValueError(f"{source}: PEFT adapter type {peft_type!r} is not supported; rankwise imports {supported}")


def _reject_per_layer_options(peft_config: dict[str, Any], source: Path, own: tuple[str, ...] = ()) -> None:
    """PEFT options that rankwise has no equivalent for, shared by every PEFT method: per-module
    overrides (``rank_pattern``, ``alpha_pattern``, ``block_size_pattern``, ...), a layer subset
    (``layers_to_transform``) and trained biases (``bias`` other than ``"none"``). ``own`` lists the
    options the method itself carries over (AdaLoRA's ``rank_pattern``)."""
    problems = [
        f"{key}={value!r}" for key, value in sorted(peft_config.items())
        if (key.endswith("_pattern") and key != "layers_pattern" and key not in own and value)
        or (key == "layers_to_transform" and value not in (None, [], ""))
        or (key == "bias" and value not in (None, "none"))
    ]
    if problems:
        raise ValueError(
            f"{source}: PEFT option(s) {', '.join(problems)} have no rankwise equivalent, so import_peft cannot "
            "reproduce this adapter; re-train it without them (one rank / block size for every layer, bias='none')"
        )


def import_peft(base_model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Adapt ``base_model`` with an adapter saved by PEFT's ``save_pretrained`` and load its tensors."""
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
    _reject_per_layer_options(peft_config, directory, method.peft.own_options)
    targets = peft_config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    if not targets:
        raise ValueError(f"{directory / PEFT_CONFIG} names no target_modules")
    config = method.config_cls(
        targets=targets,
        exclude=peft_config.get("exclude_modules") or None,
        modules_to_save=peft_config.get("modules_to_save") or None,
        **method.peft.from_peft_config(peft_config),
    )
    tensors = read_tensors(directory / PEFT_WEIGHTS, "rankwise.import_peft")
    # The key map reads the adapted layers, which exist only once load_state_into has adapted the
    # model (in place), so it is built on first use.
    built: dict[str, Any] = {}

    def key_map(key: str) -> str | None:
        if "map" not in built:
            built["map"] = _peft_key_map(base_model, method)
        return built["map"](key)

    return load_state_into(base_model, config, tensors, source=str(directory), key_map=key_map)
