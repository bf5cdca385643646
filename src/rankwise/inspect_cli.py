"""``rankwise inspect PATH``: describe a saved adapter or compressed model without loading any model.

PATH is a directory written by ``rankwise.save`` (``adapter_config.json`` + ``adapter.safetensors``) or
by ``rankwise compress --output`` / ``save_compressed`` (``compress_config.json`` +
``compressed.safetensors``). Only the JSON and the safetensors *header* are read (names, shapes,
dtypes; never the tensor data, never a pickle). Adapters: the method and its config, then each adapted
layer with its tensors and its stored and closed-form trainable parameter counts, then the modules saved
in full (the classification head). Compressed models: each factorised layer with its rank, its tensors
and the parameters it keeps of the dense layer, then the rest of the model in one line (``--all-tensors``
lists it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compress import storage
from .core import io
from .core.registry import get_method

KINDS = {"adapter": (io.CONFIG_FILE, io.WEIGHTS_FILE, io.FORMAT),
         "compressed": (storage.CONFIG_FILE, storage.WEIGHTS_FILE, storage.FORMAT)}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``inspect`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "inspect",
        help="describe a saved adapter or compressed model (no model is loaded)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="a directory written by rankwise.save or rankwise compress --output")
    parser.add_argument("--json", action="store_true", help="print the description as JSON instead of tables")
    parser.add_argument("--all-tensors", action="store_true",
                        help="compressed models: list every tensor, not only those of the factorised layers")
    parser.set_defaults(func=run)
    return parser


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
            closed = method.adapter_cls.expected_num_params(out_features, in_features, config.for_layer(name))
        except NotImplementedError:
            closed = None
        rows.append({"layer": name, "out_features": out_features, "in_features": in_features,
                     "tensors": _tensor_list(own), "stored": sum(t.numel for t in own.values()), "trainable": closed})
    saved = {name: tensors[name] for name in sorted(tensors, key=_natural) if name not in claimed}
    stored = sum(row["stored"] for row in rows)
    saved_params = sum(info.numel for info in saved.values())
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
            "stored": stored + saved_params,
            "trainable": None if closed_total is None else closed_total + saved_params,
            "file_bytes": (directory / io.WEIGHTS_FILE).stat().st_size,
        },
    }


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


def describe_compressed(directory: Path) -> dict[str, Any]:
    """The compressed model in ``directory``: per-layer ranks, tensors and parameter counts."""
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
    factorised = sum(row["stored"] for row in rows)
    dense = sum(row["dense"] for row in rows)
    other = sum(info.numel for info in rest.values())
    return {
        "kind": "compressed",
        "path": str(directory),
        "rankwise_version": payload.get("rankwise_version"),
        "layers": rows,
        "other_tensors": _tensor_list(rest),
        "aliases": aliases,
        "totals": {
            "layers": len(rows),
            "factorised": factorised,
            "dense_before": dense,
            "other": other,
            "stored": factorised + other,
            "before": dense + other,
            "file_bytes": (directory / storage.WEIGHTS_FILE).stat().st_size,
        },
    }


def describe(path: str | Path) -> dict[str, Any]:
    """The description of an adapter or compressed-model directory, as printed by ``rankwise inspect --json``."""
    kind, directory = find_kind(Path(path))
    return describe_adapter(directory) if kind == "adapter" else describe_compressed(directory)


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _tensor_rows(label: str, tensors: list[dict[str, Any]], extra: list[str]) -> list[list[str]]:
    """One row per tensor; the layer's own columns only on its first row."""
    if not tensors:
        return [[label, "(no tensors)", "", "", "", *extra]]
    rows = []
    for i, t in enumerate(tensors):
        shape = "x".join(str(d) for d in t["shape"]) or "scalar"
        rows.append([label if i == 0 else "", t["name"], shape, t["dtype"], f"{t['numel']:,}",
                     *(extra if i == 0 else [""] * len(extra))])
    return rows


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def format_adapter(info: dict[str, Any]) -> str:
    totals = info["totals"]
    settings = " ".join(f"{k}={v}" for k, v in info["config"].items())
    lines = [
        f"adapter {info['path']}",
        f"method: {info['method']} (written by rankwise {info['rankwise_version']}, base model {info['base_model']})",
        f"config: {settings}",
        "",
    ]
    rows = []
    for layer in info["layers"]:
        shape = f"{layer['out_features']} x {layer['in_features']}"
        rows += _tensor_rows(layer["layer"], layer["tensors"], [shape, f"{layer['stored']:,}", _count(layer["trainable"])])
    lines += _table(["layer", "tensor", "shape", "dtype", "values", "out x in", "layer values", "trainable (closed form)"],
                    rows, right={4, 6, 7})
    if info["modules_to_save"]:
        lines += ["", "saved in full (modules_to_save):"]
        saved = [[t["name"], "x".join(map(str, t["shape"])), t["dtype"], f"{t['numel']:,}"] for t in info["modules_to_save"]]
        lines += _table(["tensor", "shape", "dtype", "params"], saved, right={3})
    lines += [
        "",
        (f"{totals['layers']} adapted layers: {_count(totals['adapter_stored'])} stored adapter values, "
         f"{_count(totals['adapter_trainable'])} trainable by the closed form"),
        f"modules saved in full: {_count(totals['modules_to_save'])}",
        (f"total: {_count(totals['trainable'])} trainable parameters, {_count(totals['stored'])} stored values, "
         f"{totals['file_bytes']:,} bytes"),
    ]
    return "\n".join(lines)


def format_compressed(info: dict[str, Any], all_tensors: bool) -> str:
    totals = info["totals"]
    lines = [f"compressed model {info['path']} (written by rankwise {info['rankwise_version']})", ""]
    rows = []
    for layer in info["layers"]:
        kept = "?" if layer["kept"] is None else f"{layer['kept']:.3f}"
        rows += _tensor_rows(layer["layer"], layer["tensors"],
                             [layer["shape"], str(layer["rank"]), f"{layer['stored']:,}", f"{layer['dense']:,}", kept])
    lines += _table(["layer", "tensor", "shape", "dtype", "params", "dense shape", "rank", "layer params", "dense params",
                     "kept"], rows, right={4, 6, 7, 8, 9})
    other = info["other_tensors"]
    if all_tensors and other:
        lines += ["", "other tensors:"]
        lines += _table(["tensor", "shape", "dtype", "params"],
                        [[t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['numel']:,}"] for t in other],
                        right={3})
    dtypes = sorted({t["dtype"] for t in other})
    before, stored = totals["before"], totals["stored"]
    lines += [
        "",
        f"{totals['layers']} factorised layers: {totals['factorised']:,} parameters (dense: {totals['dense_before']:,})",
        f"other tensors: {len(other)} ({totals['other']:,} parameters, {', '.join(dtypes) or '-'})"
        + ("" if all_tensors or not other else "; --all-tensors lists them"),
        f"shared (stored once): {len(info['aliases'])}" if info["aliases"] else "shared (stored once): none",
        f"total: {stored:,} parameters stored, {before:,} before compression "
        f"({stored / before:.3f} kept), {totals['file_bytes']:,} bytes" if before else f"total: {stored:,} parameters",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The ``inspect`` subcommand."""
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    elif info["kind"] == "adapter":
        print(format_adapter(info))
    else:
        print(format_compressed(info, args.all_tensors))
    return 0
