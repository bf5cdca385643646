"""Save and load a compressed model: ``compressed.safetensors`` + ``compress_config.json``, atomic, no pickle.

The JSON lists every factorised module by name with what it takes to rebuild its skeleton on a fresh
base model, the idea of ASVD's per-module ``truncation_ranks`` (STYLE.md Sec. 7). Each entry has a
``kind``:

* ``"linear"`` — :class:`FactorizedLinear` (SVD / whitened compression, TRP or Cuttlefish on a Linear):
  ``out_features``, ``in_features``, ``rank``, ``bias``. Files written before ``kind`` existed hold only
  these entries and are read as ``"linear"``.
* ``"conv2d"`` — :class:`~rankwise.compress.lowrank_conv.FactorizedConv2d` (TRP or Cuttlefish on a Conv2d):
  ``rank``, ``scheme`` (``"channel"`` or ``"spatial"``) and the original conv's
  :func:`~rankwise.compress.lowrank_conv.conv_signature` (weight shape, stride, padding, dilation, groups,
  bias, padding mode), since stride/padding/dilation change the function but not the tensor shapes.

:func:`load_compressed` reads both files whole and checks every entry against the base model (the kind
is known, the layer exists with the recorded type and shape/signature) before it changes anything; it
then swaps the skeleton in, checks that the tensor keys, shapes and dtypes fit it exactly and that no
tensor holds NaN/Inf (:func:`rankwise.core.io.check_loadable`) before copying a single weight, and loads
the *whole* state dict strictly, so weights changed after compression
(an adapter merged into the model, any fine-tuning, Cuttlefish's post-switch training) come back
too. ``rankwise compress --output DIR --then-adapt M`` saves the compressed model to ``DIR`` before
adapting it, and the trained adapter with :func:`rankwise.save` to ``DIR/adapter``:
``rankwise.load(load_compressed(base, DIR), DIR/adapter)`` gives back the adapted model. On any failure
the swapped modules are put back, so the base model is left as it was. Tensors that share storage (tied
embeddings) are written once and listed as aliases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .._version import __version__
from ..core.inject import _set_child
from ..core.io import check_loadable, read_json, read_tensors, save_json, save_tensors
from ..core.layer import is_supported_layer, linear_shape
from .factorized import FactorizedLinear
from .lowrank_conv import SCHEMES, FactorizedConv2d, conv_signature, rank_cap

CONFIG_FILE = "compress_config.json"
WEIGHTS_FILE = "compressed.safetensors"
FORMAT = "rankwise-compressed"
FIX = "load onto the (uncompressed) base model that was compressed"

LayerSpec = dict[str, Any]
CONV_FIELDS = ("weight_shape", "stride", "padding", "dilation", "groups", "bias", "padding_mode")


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


def _layer_spec(module: nn.Module) -> LayerSpec | None:
    """The JSON entry of a factorised module, or None for any other module."""
    if isinstance(module, FactorizedLinear):
        return {"kind": "linear", "out_features": module.out_features, "in_features": module.in_features,
                "rank": module.rank, "bias": module.up.bias is not None}
    if isinstance(module, FactorizedConv2d):
        return {"kind": "conv2d", "rank": module.rank, "scheme": module.scheme, **module.conv_signature}
    return None


def save_compressed(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the compressed model to ``directory`` (created if needed) and return it.

    The config's ``parameters`` lists the saved tensors that are parameters; the others are buffers (a
    BatchNorm's running statistics), saved to restore the model but no parameters, so ``rankwise inspect``
    counts them apart. Files written before that list existed have none (inspect then counts every tensor).
    """
    layers = {name: spec for name, module in model.named_modules() if (spec := _layer_spec(module)) is not None}
    if not layers:
        raise ValueError(f"save_compressed: {type(model).__name__} has no factorised layer (FactorizedLinear / "
                         "FactorizedConv2d); call rankwise.compress, TRP.factorize or Cuttlefish.switch first")
    tensors, aliases = _unique_state(model)
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    parameters = sorted(name for name in tensors if name in parameter_names)
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": FORMAT})
    save_json(directory / CONFIG_FILE, {"format": FORMAT, "rankwise_version": __version__, "layers": layers,
                                        "aliases": aliases, "parameters": parameters})
    return directory


def _linear_skeleton(module: nn.Module, spec: LayerSpec) -> nn.Module:
    """An empty FactorizedLinear for ``module``, which must be a Linear of the recorded (out, in)."""
    want = (spec["out_features"], spec["in_features"])
    if not is_supported_layer(module) or linear_shape(module) != want:
        have = linear_shape(module) if is_supported_layer(module) else type(module).__name__
        raise ValueError(f"is a Linear of (out, in) = {want} but the base model has {have}; {FIX}")
    weight = module.weight
    layer = FactorizedLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])
    return layer.to(device=weight.device, dtype=weight.dtype)


def _conv_skeleton(module: nn.Module, spec: LayerSpec) -> nn.Module:
    """An empty FactorizedConv2d for ``module``, which must be a Conv2d with the recorded signature."""
    want = {key: spec[key] for key in CONV_FIELDS}
    if not isinstance(module, nn.Conv2d):
        raise ValueError(
            f"is a Conv2d {want} but the base model has a {type(module).__name__}; {FIX}")
    have = conv_signature(module)
    differ = {key: f"{want[key]} saved, {have[key]} here" for key in want if want[key] != have[key]}
    if differ:
        raise ValueError(f"is a Conv2d {want} but the base model's conv differs: {differ}; {FIX}")
    if spec["scheme"] not in SCHEMES:
        raise ValueError(f"has unknown scheme {spec['scheme']!r} (known: {SCHEMES}); the config is corrupted, "
                         "save the model again")
    cap = rank_cap(tuple(want["weight_shape"]), spec["scheme"])
    if not (isinstance(spec["rank"], int) and 1 <= spec["rank"] <= cap):
        raise ValueError(f"rank {spec['rank']!r} is outside [1, {cap}] for weight {want['weight_shape']} "
                         f"({spec['scheme']} scheme); the config is corrupted, save the model again")
    return FactorizedConv2d(module, spec["rank"], spec["scheme"])


SKELETONS: dict[str, Callable[[nn.Module, LayerSpec], nn.Module]] = {
    "linear": _linear_skeleton,
    "conv2d": _conv_skeleton,
}


def _skeleton(name: str, spec: Any, modules: dict[str, nn.Module], source: Path) -> nn.Module:
    """The empty factorised module for saved entry ``name``; a ValueError naming the layer if it cannot be built."""
    if not isinstance(spec, dict):
        raise ValueError(
            f"load_compressed: saved layer '{name}' in {source} has a malformed entry {spec!r}; save the model again")
    kind = spec.get("kind", "linear")
    if kind not in SKELETONS:
        raise ValueError(f"load_compressed: saved layer '{name}' in {source} has unknown kind {kind!r} (known: "
                         f"{sorted(SKELETONS)}); written by a newer rankwise or corrupted: upgrade, or save again")
    if name not in modules:
        raise ValueError(f"load_compressed: saved layer '{name}' does not exist in the base model; {FIX}")
    try:
        return SKELETONS[kind](modules[name], spec)
    except (KeyError, TypeError) as error:
        raise ValueError(f"load_compressed: saved layer '{name}' in {source} has a malformed entry {spec!r} "
                         f"({type(error).__name__}: {error}); save the model again") from None
    except ValueError as error:
        raise ValueError(f"load_compressed: saved layer '{name}' {error}") from None


def _check_state(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Raise unless ``state`` has exactly the model's keys with the model's shapes, fitting dtypes and no NaN/Inf."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_compressed: {source} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; {FIX}")
    for key, value in state.items():
        if tuple(expected[key].shape) != tuple(value.shape):
            raise ValueError(f"load_compressed: tensor '{key}' in {source} has shape {tuple(value.shape)}, the model "
                             f"expects {tuple(expected[key].shape)}; {FIX}")
        check_loadable(key, value, expected[key], str(source))


def load_compressed(base_model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Factorise ``base_model``'s layers as saved in ``directory`` and load the saved weights into it.

    Everything is checked before the model changes; on any error ``base_model`` is left as it was.
    """
    directory = Path(directory)
    payload = read_json(directory / CONFIG_FILE, "load_compressed")
    if payload.get("format") != FORMAT or not isinstance(payload.get("layers"), dict):
        raise ValueError(f"load_compressed: {directory / CONFIG_FILE} is not a rankwise compressed-model config")
    tensors = read_tensors(directory / WEIGHTS_FILE, "load_compressed")
    modules = dict(base_model.named_modules())
    skeleton = {name: _skeleton(name, spec, modules, directory) for name, spec in payload["layers"].items()}
    state = dict(tensors)
    state.update({alias: tensors[kept] for alias, kept in payload.get("aliases", {}).items() if kept in tensors})
    originals = {name: modules[name] for name in skeleton}
    for name, layer in skeleton.items():
        _set_child(base_model, name, layer)
    try:
        _check_state(base_model, state, directory)
        base_model.load_state_dict(state, strict=True)
    except BaseException:
        for name, module in originals.items():
            _set_child(base_model, name, module)
        raise
    return base_model


__all__ = ["load_compressed", "save_compressed"]
