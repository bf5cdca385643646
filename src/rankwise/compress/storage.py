"""Save and load a compressed model: ``compressed.safetensors`` + ``compress_config.json``, atomic, no pickle.

The JSON lists every :class:`FactorizedLinear` by name with its (out, in, rank, bias), the idea of
ASVD's per-module ``truncation_ranks`` (STYLE.md Sec. 7): :func:`load_compressed` rebuilds that
skeleton on a fresh base model, then loads the *whole* state dict strictly, so weights changed after
compression (``--then-adapt`` merged into the model, or any fine-tuning) come back too. Tensors that
share storage (tied embeddings) are written once and listed as aliases.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from .._version import __version__
from ..core.inject import _set_child
from ..core.io import read_json, read_tensors, save_json, save_tensors
from ..core.layer import is_supported_layer, linear_shape
from .factorized import FactorizedLinear

CONFIG_FILE = "compress_config.json"
WEIGHTS_FILE = "compressed.safetensors"
FORMAT = "rankwise-compressed"


def _unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each shared storage kept once, and alias -> kept name for the rest."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in owners:
            aliases[name] = owners[key]
        else:
            owners[key] = name
            kept[name] = tensor
    return kept, aliases


def save_compressed(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the compressed model to ``directory`` (created if needed) and return it."""
    layers = {
        name: {"out_features": m.out_features, "in_features": m.in_features, "rank": m.rank, "bias": m.up.bias is not None}
        for name, m in model.named_modules() if isinstance(m, FactorizedLinear)
    }
    if not layers:
        raise ValueError(f"save_compressed: {type(model).__name__} has no FactorizedLinear layer; call rankwise.compress first")
    tensors, aliases = _unique_state(model)
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": FORMAT})
    save_json(directory / CONFIG_FILE, {"format": FORMAT, "rankwise_version": __version__, "layers": layers, "aliases": aliases})
    return directory


def load_compressed(base_model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Factorise ``base_model``'s layers as saved in ``directory`` and load the saved weights into it."""
    directory = Path(directory)
    payload = read_json(directory / CONFIG_FILE, "load_compressed")
    if payload.get("format") != FORMAT or not isinstance(payload.get("layers"), dict):
        raise ValueError(f"load_compressed: {directory / CONFIG_FILE} is not a rankwise compressed-model config")
    tensors = read_tensors(directory / WEIGHTS_FILE, "load_compressed")
    modules = dict(base_model.named_modules())
    skeleton: dict[str, FactorizedLinear] = {}
    for name, spec in payload["layers"].items():
        module = modules.get(name)
        want = (spec["out_features"], spec["in_features"])
        if module is None or not is_supported_layer(module) or linear_shape(module) != want:
            have = linear_shape(module) if module is not None and is_supported_layer(module) else type(module).__name__
            raise ValueError(f"load_compressed: saved layer '{name}' is {want[0]} x {want[1]} but the base model has "
                             f"{have}; load onto the base model that was compressed")
        weight = module.weight
        skeleton[name] = FactorizedLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"]).to(
            device=weight.device, dtype=weight.dtype)
    originals = {name: modules[name] for name in skeleton}
    for name, layer in skeleton.items():
        _set_child(base_model, name, layer)
    try:
        state = dict(tensors)
        state.update({alias: tensors[kept] for alias, kept in payload.get("aliases", {}).items() if kept in tensors})
        expected = base_model.state_dict()
        for key, value in state.items():
            if key in expected and tuple(expected[key].shape) != tuple(value.shape):
                raise ValueError(f"load_compressed: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(expected[key].shape)}")
        missing, unexpected = base_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"load_compressed: {directory} does not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    except BaseException:
        for name, module in originals.items():
            _set_child(base_model, name, module)
        raise
    return base_model


__all__ = ["load_compressed", "save_compressed"]
