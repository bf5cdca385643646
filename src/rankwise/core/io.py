"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors``, written atomically, read safely.

``save`` writes each file to a temporary name in the target directory and renames it into place,
so a crash never leaves a half-written file under the real name. ``load`` reads and checks
everything (config, method, tensor file, layer names and shapes against the base model, no quantised
layer other than bitsandbytes') before it changes the model, then adapts it and checks every tensor (key, shape, dtype, NaN/Inf)
before copying the first one, and takes the adapters back out if anything fails; tensors are read with
safetensors only, never with pickle.

Named adapters (:mod:`rankwise.core.multi`) use PEFT's layout: one directory per adapter, the adapter's name
not in its keys (``<path>.adapter.<tensor>`` whatever the name, so every adapter file reads like a
single-adapter one). ``save`` writes the adapter ``"default"`` to the directory itself and every other
adapter ``name`` to ``<directory>/<name>/`` (its config records the name), and removes what an earlier save
left there for an adapter not saved this time; ``load(model, directory, adapter_name=...)`` reads one directory
and names the adapter, adding it beside the others when ``model`` is adapted already.

A model sharded by FSDP2's ``fully_shard`` saves the same files as the unsharded model: ``save`` gathers
every sharded tensor whole (``DTensor.full_tensor()``, a collective, so every process must call it),
process 0 alone writes, and every process returns once the files are in place, so any of them can load.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._version import __version__
from .inject import (
    active_adapter,
    adapter_config,
    adapter_configs,
    find_targets,
    is_adapted,
    layer_modules,
    saved_modules,
    unload,
    wrappers,
)
from .layer import DEFAULT_ADAPTER, is_adaptable_layer, layer_geometry
from .multi import add_adapter, delete_adapter
from .quantised import FLOAT_DTYPES, check_adaptable, is_sharded
from .rank import ALLOCATOR_FILE, load_allocator, save_allocator
from .registry import get_method

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "rankwise-adapter"


def adapter_state(model: nn.Module, keep_vars: bool = False, adapter_name: str | None = None) -> dict[str, Tensor]:
    """Every tensor of adapter ``adapter_name`` (default: the active one) and every ``modules_to_save`` tensor,
    keyed by its path in the model as a single adapter's: ``<layer path>.adapter.<tensor>``, whatever the name.

    A ``modules_to_save`` tensor is the trained copy's, keyed by the original module's path
    (``classifier.weight``), as before the copy existed and as PEFT names it on disk. ``keep_vars``
    gives the parameters themselves (as ``state_dict(keep_vars=True)``) instead of detached tensors.
    """
    adapter_config(model, adapter_name)  # no rankwise adapter, or none of that name: its own clear error
    name = active_adapter(model) if adapter_name is None else adapter_name
    state: dict[str, Tensor] = {}
    for path, layer in wrappers(model):
        adapter = layer.get_adapter(name)
        for key, value in ({} if adapter is None else adapter.state_dict(keep_vars=keep_vars)).items():
            state[f"{path}.adapter.{key}"] = value
    for name, module in saved_modules(model):
        for key, value in module.trained_module.state_dict(keep_vars=keep_vars).items():
            state[f"{name}.{key}"] = value
    return state


def saved_parameter_names(model: nn.Module) -> list[str]:
    """The keys, as :func:`adapter_state` writes them, of the ``modules_to_save`` tensors that are parameters; the
    others are buffers (a BatchNorm's ``running_mean`` / ``running_var`` / ``num_batches_tracked``), saved but
    never trained. A parameter shared under two names is listed once, as ``named_parameters`` lists it."""
    return sorted(f"{name}.{key}" for name, module in saved_modules(model)
                  for key, _ in module.trained_module.named_parameters())


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with every sharded one (an FSDP2 ``DTensor``) gathered whole, e.g. ``full_tensors(adapter_state(model))``.

    Gathering is a collective: under FSDP every process must call this, with the same keys in the same order.
    """
    return {key: value.full_tensor() if is_sharded(value) else value for key, value in tensors.items()}


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; adapter files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are copied to contiguous CPU memory first)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def save_json(path: Path, payload: dict[str, Any], *, keep_order: bool = False) -> None:
    """Write JSON atomically, keys sorted. ``keep_order`` sorts the top level only and keeps every nested dict in
    its own order: an adapter config's ``rank_pattern`` / ``alpha_pattern`` gives a layer its *first* matching key
    (PEFT's rule), so sorting their keys would change what the file means."""
    if keep_order:
        payload = dict(sorted(payload.items()))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=not keep_order)
            handle.write("\n")

    atomic_write(path, write)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning a missing or broken file into a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: {path} is not valid JSON ({error}); the file is corrupted") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object")
    return payload


def read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    """Read a safetensors file, turning a missing, truncated or corrupted file into a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ValueError(
            f"{what}: {path} could not be read as safetensors ({type(error).__name__}: {error}); "
            "the file is truncated or corrupted. Save the adapter again."
        ) from None


def _dtype_kind(dtype: torch.dtype) -> str:
    """bool, integer, complex, floating (the four dtypes rankwise trains in) or the dtype itself (float8, ...)."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype in FLOAT_DTYPES:
        return "floating"
    return str(dtype) if dtype.is_floating_point else "integer"


def check_loadable(name: str, value: Tensor, target: Tensor, source: str) -> None:
    """``ValueError`` naming tensor ``name`` of ``source`` unless it may be copied into the model's ``target``.

    The dtypes must be of one kind: a float16 / bfloat16 file for a float32 tensor is cast (a
    half-precision save is legitimate), but an integer, bool or complex tensor for a floating one (or
    the reverse) is a wrong file. NaN / Inf values are refused, except in a tensor whose model
    counterpart holds some itself (an attention mask of -inf).
    """
    if _dtype_kind(value.dtype) != _dtype_kind(target.dtype):
        raise ValueError(
            f"tensor '{name}' in {source} has dtype {value.dtype}, but the model's tensor is {target.dtype}; only "
            "floating-point precisions convert into each other. The file is corrupted or belongs to another model"
        )
    numeric = value.is_floating_point() or value.is_complex()
    if numeric and not bool(torch.isfinite(value).all()) and bool(torch.isfinite(target).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"tensor '{name}' in {source} holds {bad} NaN/Inf value(s) (of {value.numel()}), which would make "
            "the model's outputs NaN; the file is corrupted or was saved after training diverged. Save it again "
            "from a good checkpoint"
        )


def save(model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Write the model's adapters to ``directory`` (created if needed) and return the directory.

    Every adapter, or only ``adapter_name``; ``"default"`` (the one ``rankwise.adapt`` makes) goes to
    ``directory`` itself, any other adapter ``name`` to ``directory/name`` (PEFT's ``save_pretrained`` layout).
    A model sharded by FSDP2 is gathered first (every process must call ``save``); process 0 writes.

    Saving every adapter (no ``adapter_name``) leaves ``directory`` holding the rankwise files of exactly the
    model's adapters: the files an earlier save left for an adapter the model no longer has (deleted since) are
    removed (:func:`_remove_stale`), so ``load(base, directory)`` never brings back a deleted adapter. The new
    files are all in place before anything is removed; nothing rankwise did not write is removed (nor a named
    adapter's subdirectory written by a rankwise older than its ``adapter_name`` record). Saving one adapter
    (``adapter_name``) writes its files and removes nothing, so adapters can be saved one at a time.
    """
    names = list(adapter_configs(model)) if adapter_name is None else [adapter_name]
    adapter_config(model, adapter_name)  # an unknown name raises before anything is written
    directory = Path(directory)
    sharded = False
    for name in names:
        sharded = _save_adapter(model, name, directory if name == DEFAULT_ADAPTER else directory / name) or sharded
    try:
        if adapter_name is None and (not sharded or dist.get_rank() == 0):
            _remove_stale(directory, names)
    finally:
        if sharded:
            dist.barrier()  # no process returns (and loads) before process 0 has cleaned up
    return directory


def _saved_by_rankwise(folder: Path, name: str | None) -> bool:
    """Whether ``folder`` holds an adapter config of rankwise's format; with ``name``, one that records it was
    saved as the named adapter ``name`` (so a subdirectory holding an adapter saved on its own,
    ``save(model, d / "x")``, which records ``"default"``, or written by an older rankwise, is not taken for one).
    A missing or unreadable config is not rankwise's."""
    try:
        payload = read_json(folder / CONFIG_FILE, "rankwise.save")
    except (OSError, ValueError):
        return False
    return payload.get("format") == FORMAT and (name is None or payload.get("adapter_name") == name)


def _remove_stale(directory: Path, saved: list[str]) -> None:
    """Remove rankwise's own files of every adapter in ``directory`` that is not in ``saved``: the top-level
    config, tensors and allocator state when ``"default"`` is not saved, and those of each subdirectory holding
    a named adapter not saved (the subdirectory too when that empties it). Only files whose config says rankwise
    wrote them (:func:`_saved_by_rankwise`) are touched; a PEFT adapter, a symlink or any other file stays. The
    config goes first, so an interrupted clean-up never leaves a config whose tensors are gone."""

    def remove(folder: Path) -> None:
        for file in (CONFIG_FILE, WEIGHTS_FILE, ALLOCATOR_FILE):
            (folder / file).unlink(missing_ok=True)

    if DEFAULT_ADAPTER not in saved and _saved_by_rankwise(directory, None):
        remove(directory)
    for child in sorted(directory.iterdir()):
        if child.name in saved or child.name == DEFAULT_ADAPTER or child.is_symlink() or not child.is_dir():
            continue
        if _saved_by_rankwise(child, child.name):
            remove(child)
            if not any(child.iterdir()):
                child.rmdir()


def _save_adapter(model: nn.Module, name: str, directory: Path) -> bool:
    """Write adapter ``name`` to ``directory``; whether the model is sharded (then process 0 alone wrote)."""
    config = adapter_config(model, name)
    layers = {path: layer_geometry(layer.base_layer)
              for path, layer in wrappers(model) if layer.get_adapter(name) is not None}
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    payload = {
        "format": FORMAT,
        "adapter_name": name,
        "method": config.method,
        "rankwise_version": __version__,
        "config": config.to_dict(),
        "layers": layers,
        "base_model": base_name if isinstance(base_name, str) else None,
        # which modules_to_save tensors are parameters (trained), not buffers (BatchNorm's running statistics):
        # ``rankwise inspect`` counts only these as trainable, having no model to ask
        "modules_to_save_parameters": saved_parameter_names(model),
    }
    tensors = adapter_state(model, adapter_name=name)
    sharded = any(is_sharded(value) for value in tensors.values())
    tensors = full_tensors(tensors)
    try:
        if sharded and dist.get_rank() != 0:
            return sharded
        save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": FORMAT, "method": config.method})
        save_json(directory / CONFIG_FILE, payload, keep_order=True)  # pattern keys: first match wins
        if name == active_adapter(model):
            save_allocator(model, directory)
        else:  # the allocator belongs to the active adapter; a state left by an earlier save is not this one's
            (directory / ALLOCATOR_FILE).unlink(missing_ok=True)
    finally:
        if sharded:
            dist.barrier()  # no process returns (and loads) before process 0 has written
    return sharded


def load(base_model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Adapt ``base_model`` as saved in ``directory`` and load the saved tensors into it.

    The adapter is named ``adapter_name``. A ``base_model`` that already carries rankwise adapters gets this
    one added beside them, inactive (PEFT's ``load_adapter``), so a model saved with several adapters comes
    back as ``load(base, d)`` followed by ``load(model, d / name, adapter_name=name)`` for each other one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    named = sorted(d.name for d in directory.iterdir() if (d / CONFIG_FILE).is_file())
    if not (directory / CONFIG_FILE).is_file() and named:
        raise FileNotFoundError(
            f"rankwise.load: {directory} holds no adapter of its own, only named adapters in subdirectories "
            f"{named}; load one with rankwise.load(model, {str(directory / named[0])!r}, adapter_name={named[0]!r})"
        )
    payload = read_json(directory / CONFIG_FILE, "rankwise.load")
    if payload.get("format") != FORMAT or "method" not in payload or "config" not in payload:
        raise ValueError(
            f"rankwise.load: {directory / CONFIG_FILE} is not a rankwise adapter config "
            "(a PEFT adapter? use rankwise.import_peft)"
        )
    method = get_method(payload["method"])
    config = method.config_cls.from_dict(payload["config"])
    tensors = read_tensors(directory / WEIGHTS_FILE, "rankwise.load")
    check_layers_fit(base_model, payload.get("layers", {}), directory)
    first = not is_adapted(base_model)
    model = load_state_into(base_model, config, tensors, source=str(directory), adapter_name=adapter_name)
    try:
        load_allocator(model, directory)
    except BaseException:
        _discard(model, adapter_name, first)
        raise
    return model


def _discard(model: nn.Module, name: str, first: bool) -> None:
    """Take a just-loaded adapter back out: the whole adaptation when it was the first one."""
    if first:
        unload(model, merge=False)
    else:
        delete_adapter(model, name)


def check_layers_fit(base_model: nn.Module, layers: dict[str, dict[str, Any]], source: Any) -> None:
    """Every saved layer exists in ``base_model``, is a float or quantised bitsandbytes layer (``adapt`` then checks
    that the method supports the latter), and has the same (out, in) shape and, for a convolution saved with
    them, the same kernel size and groups (:func:`~rankwise.core.layer.layer_geometry`)."""
    if not isinstance(layers, dict) or not all(
        isinstance(shape, dict) and all(type(shape.get(key)) is int for key in ("out_features", "in_features"))
        for shape in layers.values()
    ):
        raise ValueError(f"the adapter config in {source} is malformed: 'layers' must map each layer name to its "
                         "integer out_features and in_features; re-save the adapter with rankwise.save")
    modules = layer_modules(base_model)
    for name, shape in layers.items():
        module = modules.get(name)
        if module is not None:
            check_adaptable(name, module)
        if module is None or not is_adaptable_layer(module):
            raise ValueError(
                f"the adapter in {source} was trained on a base model with a layer '{name}', which "
                f"{type(base_model).__name__} does not have; load it onto the base model it was trained on"
            )
        have = layer_geometry(module)
        want = (shape["out_features"], shape["in_features"])
        if (have["out_features"], have["in_features"]) != want:
            raise ValueError(
                f"the adapter in {source} expects layer '{name}' with (out, in) = {want}, but this base model "
                f"has {(have['out_features'], have['in_features'])}; load it onto the base model it was trained on"
            )
        kernel = {key: shape[key] for key in ("kernel_size", "groups") if key in shape}
        if any(have.get(key) != value for key, value in kernel.items()):
            raise ValueError(
                f"the adapter in {source} expects layer '{name}' to be a convolution with {kernel}, but this base "
                f"model has {({key: have.get(key) for key in kernel})}; load it onto the base model it was trained on"
            )


def load_state_into(
    base_model: nn.Module,
    config: Any,
    tensors: dict[str, Tensor],
    source: str,
    key_map: Callable[[str], str | None] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Adapt ``base_model`` with ``config`` as adapter ``adapter_name`` and copy ``tensors`` in; on any failure
    the model is restored. On an adapted model the adapter is added beside the others
    (:func:`rankwise.add_adapter`) and deleted again on failure.

    Every tensor is checked (names, shapes, dtypes and NaN/Inf: :func:`check_loadable`) before the first
    one is copied.

    ``key_map`` turns each of the model's adapter-state keys into the key it has in ``tensors``
    (identity by default); a key mapped to None keeps its freshly initialised value.
    A config that rewrites the base weights (``config.changes_base_weights``: PiSSA / OLoRA) gets them back
    bit for bit on failure; the clean-up's ``unload(merge=False)`` alone would leave the residual, as PEFT's
    ``unload`` does.
    """
    kept = {}
    first = not is_adapted(base_model)
    if config.changes_base_weights and first:  # add_adapter refuses such a config on an adapted model
        kept = {name: base_model.get_submodule(name).weight.detach().clone() for name in find_targets(base_model, config)}
    model = add_adapter(base_model, adapter_name, config)  # on a model without adapters: adapt
    try:
        expected = adapter_state(model, adapter_name=adapter_name)
        mapped = {key: (key_map(key) if key_map else key) for key in expected}
        missing = sorted(m for m in mapped.values() if m is not None and m not in tensors)
        unexpected = sorted(set(tensors) - {m for m in mapped.values() if m is not None})
        if missing or unexpected:
            raise ValueError(
                f"the tensors in {source} do not fit this model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}; was it saved from a different base model or method?"
            )
        pairs = [(target, tensors[mapped[key]], mapped[key]) for key, target in expected.items() if mapped[key]]
        for target, value, name in pairs:
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor '{name}' in {source} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(target.shape)}; the adapter and the base model do not match"
                )
            check_loadable(name, value, target, source)
        with torch.no_grad():
            for target, value, _ in pairs:
                target.copy_(value)
    except BaseException:
        _discard(model, adapter_name, first)
        with torch.no_grad():
            for name, weight in kept.items():
                model.get_submodule(name).weight.copy_(weight)
        raise
    return model
