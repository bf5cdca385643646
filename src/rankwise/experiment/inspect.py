"""Describe a saved adapter or compressed model from its files alone: ``describe(path)``, the pipeline of
``rankwise inspect`` (:mod:`rankwise.cli.inspect`). Only the JSON and the safetensors *header* are read
(names, shapes, dtypes; never the tensor data, never a pickle)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compress import storage
from ..core import io
from ..core.layer import meta_stand_in
from ..core.registry import get_method
from .budget import layer_parameters

KINDS = {"adapter": (io.CONFIG_FILE, io.WEIGHTS_FILE, io.FORMAT),
         "compressed": (storage.CONFIG_FILE, storage.WEIGHTS_FILE, storage.FORMAT)}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """What the safetensors header says about one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names, shapes and dtypes (and the file's metadata) from a safetensors header, without the data."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"rankwise inspect: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                view = handle.get_slice(name)
                tensors[name] = TensorInfo(tuple(int(d) for d in view.get_shape()), str(view.get_dtype()))
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"rankwise inspect: {path} could not be read as safetensors ({type(error).__name__}: "
                         f"{error}); the file is truncated or corrupted") from None


def find_kind(path: Path) -> tuple[str, Path]:
    """``adapter`` or ``compressed``, and the directory; PATH may also name one of the two files."""
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise FileNotFoundError(f"rankwise inspect: {path} does not exist")
    present = [kind for kind, (config, _, _) in KINDS.items() if (directory / config).is_file()]
    if len(present) == 1:
        return present[0], directory
    if present:
        raise ValueError(f"rankwise inspect: {directory} holds both {io.CONFIG_FILE} and {storage.CONFIG_FILE}; "
                         "save adapters and compressed models to separate directories")
    raise FileNotFoundError(f"rankwise inspect: {directory} holds neither {io.CONFIG_FILE} (rankwise.save) nor "
                            f"{storage.CONFIG_FILE} (rankwise compress --output)")


def _natural(name: str) -> list[Any]:
    """Sort key putting ``layer.2`` before ``layer.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _tensors_under(prefix: str, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    return {name[len(prefix):]: info for name, info in tensors.items() if name.startswith(prefix)}


def _tensor_list(tensors: dict[str, TensorInfo]) -> list[dict[str, Any]]:
    return [{"name": name, "shape": list(info.shape), "dtype": info.dtype, "numel": info.numel}
            for name, info in tensors.items()]


def _malformed(path: Path, what: str) -> ValueError:
    return ValueError(f"rankwise inspect: {path} is malformed ({what}); the file is corrupted, save it again")


def _read_config(path: Path, expected_format: str, kind: str, hint: str = "") -> dict[str, Any]:
    """The JSON at ``path``; a ValueError unless its ``format`` is ``expected_format``."""
    payload = io.read_json(path, "rankwise inspect")
    if payload.get("format") != expected_format:
        raise ValueError(f"rankwise inspect: {path} is not a rankwise {kind} "
                         f"(format {payload.get('format')!r}, expected {expected_format!r}{hint})")
    return payload


def describe_adapter(directory: Path) -> dict[str, Any]:
    """The adapter in ``directory``: method, config, per-layer tensors and parameter counts."""
    config_path = directory / io.CONFIG_FILE
    payload = _read_config(config_path, io.FORMAT, "adapter config", "; a PEFT adapter?")
    layers, values = payload.get("layers"), payload.get("config")
    if not isinstance(layers, dict) or not isinstance(values, dict) or not isinstance(payload.get("method"), str):
        raise _malformed(config_path, "'method', 'config' or 'layers' missing or of the wrong type")
    method = get_method(payload["method"])
    config = method.config_cls.from_dict(values)
    tensors, _ = read_header(directory / io.WEIGHTS_FILE)

    rows = []
    claimed: set[str] = set()
    for name, shape in sorted(layers.items(), key=lambda item: _natural(item[0])):
        if not isinstance(shape, dict) or not all(isinstance(shape.get(k), int) for k in ("out_features", "in_features")):
            raise _malformed(config_path, f"layer '{name}' has no integer out_features / in_features")
        prefix = f"{name}.adapter."
        own = _tensors_under(prefix, tensors)
        claimed.update(prefix + key for key in own)
        out_features, in_features = shape["out_features"], shape["in_features"]
        try:
            stand_in = meta_stand_in(shape)
        except ValueError as error:
            raise _malformed(config_path, str(error)) from None
        try:
            closed = layer_parameters(method.adapter_cls, stand_in, config.for_layer(name), name)
        except (ValueError, NotImplementedError):
            closed = None
        rows.append({"layer": name, "out_features": out_features, "in_features": in_features,
                     "tensors": _tensor_list(own), "stored": sum(t.numel for t in own.values()), "trainable": closed})
    saved = {name: tensors[name] for name in sorted(tensors, key=_natural) if name not in claimed}
    stored = sum(row["stored"] for row in rows)
    saved_params = sum(info.numel for info in saved.values())
    saved_trainable = _saved_trainable(payload, saved, config_path)
    closed_total = None if any(r["trainable"] is None for r in rows) else sum(r["trainable"] for r in rows)
    return {
        "kind": "adapter",
        "path": str(directory),
        "method": method.name,
        "config": config.to_dict(),
        "rankwise_version": payload.get("rankwise_version"),
        "base_model": payload.get("base_model"),
        "layers": rows,
        "modules_to_save": _tensor_list(saved),
        "totals": {
            "layers": len(rows),
            "adapter_stored": stored,
            "adapter_trainable": closed_total,
            "modules_to_save": saved_params,
            "modules_to_save_trainable": saved_trainable,
            "stored": stored + saved_params,
            "trainable": None if closed_total is None else closed_total + saved_trainable,
            "file_bytes": (directory / io.WEIGHTS_FILE).stat().st_size,
        },
    }


def _recorded_parameters(payload: dict[str, Any], key: str, config_path: Path) -> set[str] | None:
    """The names of the saved tensors that are parameters, as the writer recorded them under ``key`` (the rest are
    buffers, such as a BatchNorm's running statistics); None for a file written before that record existed."""
    names = payload.get(key)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise _malformed(config_path, f"'{key}' must be a list of tensor names")
    return set(names)


def _saved_trainable(payload: dict[str, Any], saved: dict[str, TensorInfo], config_path: Path) -> int:
    """The trainable values among the ``modules_to_save`` tensors ``saved``: those the config's
    ``modules_to_save_parameters`` names (``rankwise.save`` records which saved tensors are parameters, so a
    BatchNorm's running statistics, buffers, are not counted); a file saved before that record counts every one."""
    parameters = _recorded_parameters(payload, "modules_to_save_parameters", config_path)
    return sum(info.numel for name, info in saved.items() if parameters is None or name in parameters)


def _dense_size(spec: dict[str, Any]) -> int:
    """Weights of the layer before factorisation (weight and bias)."""
    if spec["kind"] == "conv2d":
        shape = spec["weight_shape"]
        return math.prod(shape) + (shape[0] if spec.get("bias") else 0)
    return spec["out_features"] * spec["in_features"] + (spec["out_features"] if spec.get("bias") else 0)


def _shape_text(spec: dict[str, Any]) -> str:
    if spec["kind"] == "conv2d":
        return "conv " + "x".join(str(d) for d in spec["weight_shape"]) + f" ({spec.get('scheme', '?')})"
    return f"{spec['out_features']} x {spec['in_features']}"


def _compressed_buffers(payload: dict[str, Any], rest: dict[str, TensorInfo], config_path: Path) -> set[str]:
    """The names among the non-factorised tensors ``rest`` that are buffers (a BatchNorm's running statistics):
    those missing from the config's ``parameters`` list (``save_compressed`` records which saved tensors are
    parameters); a file saved before that record has none, so every tensor counts as a parameter as before."""
    parameters = _recorded_parameters(payload, "parameters", config_path)
    return set() if parameters is None else set(rest) - parameters


def describe_compressed(directory: Path) -> dict[str, Any]:
    """The compressed model in ``directory``: per-layer ranks, tensors and parameter counts (buffers, such as a
    BatchNorm's running statistics, are counted apart: see :func:`_compressed_buffers`)."""
    config_path = directory / storage.CONFIG_FILE
    payload = _read_config(config_path, storage.FORMAT, "compressed-model config")
    layers, aliases = payload.get("layers"), payload.get("aliases", {})
    if not isinstance(layers, dict) or not isinstance(aliases, dict):
        raise _malformed(config_path, "'layers' or 'aliases' missing or of the wrong type")
    tensors, _ = read_header(directory / storage.WEIGHTS_FILE)

    rows = []
    claimed: set[str] = set()
    for name, spec in sorted(layers.items(), key=lambda item: _natural(item[0])):
        spec = {"kind": "linear", **spec} if isinstance(spec, dict) else spec
        needed = ("weight_shape",) if isinstance(spec, dict) and spec.get("kind") == "conv2d" else ("out_features", "in_features")
        if not isinstance(spec, dict) or not isinstance(spec.get("rank"), int) or any(k not in spec for k in needed):
            raise _malformed(config_path, f"layer '{name}' needs an integer rank and {', '.join(needed)}")
        prefix = f"{name}."
        own = _tensors_under(prefix, tensors)
        claimed.update(prefix + key for key in own)
        try:
            stored, dense = sum(t.numel for t in own.values()), _dense_size(spec)
            shape = _shape_text(spec)
        except (TypeError, ValueError) as error:
            raise _malformed(config_path, f"layer '{name}': {type(error).__name__}: {error}") from None
        rows.append({"layer": name, "kind": spec["kind"], "shape": shape, "rank": spec["rank"],
                     "tensors": _tensor_list(own), "stored": stored, "dense": dense,
                     "kept": stored / dense if dense else None})
    rest = {name: tensors[name] for name in sorted(tensors, key=_natural) if name not in claimed}
    buffers = _compressed_buffers(payload, rest, config_path)
    factorised = sum(row["stored"] for row in rows)
    dense = sum(row["dense"] for row in rows)
    other = sum(info.numel for name, info in rest.items() if name not in buffers)
    return {
        "kind": "compressed",
        "path": str(directory),
        "rankwise_version": payload.get("rankwise_version"),
        "layers": rows,
        "other_tensors": [{**entry, "buffer": entry["name"] in buffers} for entry in _tensor_list(rest)],
        "aliases": aliases,
        "totals": {
            "layers": len(rows),
            "factorised": factorised,
            "dense_before": dense,
            "other": other,
            "buffers": sum(rest[name].numel for name in buffers),
            "stored": factorised + other,
            "before": dense + other,
            "file_bytes": (directory / storage.WEIGHTS_FILE).stat().st_size,
        },
    }


def describe(path: str | Path) -> dict[str, Any]:
    """The description of an adapter or compressed-model directory, as printed by ``rankwise inspect --json``."""
    kind, directory = find_kind(Path(path))
    return describe_adapter(directory) if kind == "adapter" else describe_compressed(directory)
