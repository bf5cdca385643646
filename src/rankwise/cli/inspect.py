"""``rankwise inspect PATH``: describe a saved adapter or compressed model without loading any model.

PATH is a directory written by ``rankwise.save`` (``adapter_config.json`` + ``adapter.safetensors``) or
by ``rankwise compress --output`` / ``save_compressed`` (``compress_config.json`` +
``compressed.safetensors``). Only the JSON and the safetensors *header* are read (names, shapes,
dtypes; never the tensor data, never a pickle). Adapters: the method and its config, then each adapted
layer with its tensors, its stored values and its expected trainable parameter count (the method's adapter
built on a weightless layer of the recorded shape, kernel and groups), then the modules saved in full (the
classification head; only their parameters count as trainable, not buffers such as a BatchNorm's running
statistics). Compressed models: each factorised layer with its rank, its tensors and the parameters
it keeps of the dense layer, then the rest of the model in one line (``--all-tensors`` lists it); buffers
(a BatchNorm's running statistics) are stored but counted apart from the parameters.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..experiment.inspect import describe


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
    lines += _table(["layer", "tensor", "shape", "dtype", "values", "out x in", "layer values", "trainable (expected)"],
                    rows, right={4, 6, 7})
    if info["modules_to_save"]:
        lines += ["", "saved in full (modules_to_save):"]
        saved = [[t["name"], "x".join(map(str, t["shape"])), t["dtype"], f"{t['numel']:,}"] for t in info["modules_to_save"]]
        lines += _table(["tensor", "shape", "dtype", "params"], saved, right={3})
    lines += [
        "",
        (f"{totals['layers']} adapted layers: {_count(totals['adapter_stored'])} stored adapter values, "
         f"{_count(totals['adapter_trainable'])} trainable expected from the layer shapes"),
        f"modules saved in full: {_count(totals['modules_to_save'])}" + (
            "" if totals["modules_to_save_trainable"] == totals["modules_to_save"] else
            f" values, {_count(totals['modules_to_save_trainable'])} of them trainable parameters (the rest buffers)"),
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
        lines += _table(["tensor", "shape", "dtype", "values", "kind"],
                        [[t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['numel']:,}",
                          "buffer" if t.get("buffer") else "parameter"] for t in other],
                        right={3})
    dtypes = sorted({t["dtype"] for t in other})
    before, stored = totals["before"], totals["stored"]
    lines += [
        "",
        f"{totals['layers']} factorised layers: {totals['factorised']:,} parameters (dense: {totals['dense_before']:,})",
        f"other tensors: {len(other)} ({totals['other']:,} parameters"
        + (f", {totals['buffers']:,} buffer values" if totals.get("buffers") else "") + f", {', '.join(dtypes) or '-'})"
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
