"""Calibration statistics of Linear-layer inputs: Gram matrices ``XᵀX`` and cross-Grams ``X_cᵀX_o``.

The data-aware compressors only need second moments of each layer's input ``X`` (tokens x in),
accumulated in float64 over a calibration set (SVD-LLM, arXiv 2403.07378, Sec. 3.1, builds the
whitening matrix from ``XXᵀ`` the same way). Padding tokens are dropped when the batch carries an
``attention_mask`` whose shape matches the layer input's leading dimensions.

Sequential calibration runs the model in *stages*: a stage is a run of consecutive layers (in
execution order) that read the very same input tensor (Q, K and V of one attention block). For a
stage, each batch is run twice and stopped at the stage: once through the original model (the
already-compressed layers temporarily swapped back) and once through the partly compressed model,
giving ``G = X_cᵀX_c`` and ``C = X_cᵀX_o`` (see :func:`rankwise.compress.svd.regression_decomposition`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.inject import _set_child

Batch = Mapping[str, Any]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def materialize(calibration: Iterable[Batch] | None, where: str) -> list[Batch]:
    """The calibration batches as a list (they are read several times); ``ValueError`` if unusable."""
    if calibration is None:
        raise ValueError(f"{where} needs calibration data: pass calibration=[{{'input_ids': ..., 'attention_mask': ...}}, ...]")
    batches = list(calibration)
    if not batches or not all(isinstance(b, Mapping) for b in batches):
        raise ValueError(f"{where}: calibration must be a non-empty iterable of model-input dicts, got {batches[:1]!r}")
    return batches


def _on_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def token_rows(x: Tensor, batch: Batch) -> Tensor:
    """The input's tokens as rows (tokens, in) in float32 or wider, padding dropped where the mask fits."""
    mask = batch.get("attention_mask")
    x = x.detach()
    x = x.float() if x.element_size() < 4 else x
    if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


def gram(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` of one batch, multiplied in the rows' precision and returned in float64 for accumulation
    (a float32 product over one batch is accurate to ~1e-6 relative; the sums over batches are float64)."""
    return (a.T @ b).to(torch.float64)


def _run(model: nn.Module, batch: Batch) -> None:
    device = next(model.parameters()).device
    with contextlib.suppress(_Stop):
        model(**_on_device(batch, device))


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def input_grams(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, Tensor]:
    """``XᵀX`` (float64, in x in) of every named layer's input, from one pass per batch.

    Layers reading the same input tensor (Q, K, V) share one product per batch. A named layer that never ran
    on the batches has no Gram matrix to whiten with: that is a ValueError listing every such layer (rather
    than a KeyError later, or a silent plain SVD when none ran).
    """
    grams: dict[str, Tensor] = {}
    current: dict[str, Any] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if current.get("input") is not args[0]:
                rows = token_rows(args[0], current["batch"])
                current["input"], current["product"] = args[0], gram(rows, rows)
            product = current["product"]
            grams[name] = grams[name] + product if name in grams else product

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with _eval_no_grad(model):
            for batch in batches:
                current.update(batch=batch, input=None, product=None)
                _run(model, batch)
                current.clear()
    finally:
        for handle in handles:
            handle.remove()
    require_ran(names, grams, f"the {len(batches)} calibration batch(es)", "whitened compression",
                "they have no input Gram matrix")
    return grams


def require_ran(names: list[str], ran: Container[str], data: str, where: str, consequence: str) -> None:
    """ValueError listing every named layer not in ``ran`` (the layers seen running on the calibration batches).

    A targeted layer the calibration forward passes never reach has no statistics: whitening has no Gram
    matrix for it, and the sensitivity measurement sees zero output distortion at every rank, so the
    allocator would cut it to rank 1 without a word. ``data`` names what the passes ran on and ``consequence``
    says which of the two the caller means.
    """
    missing = [n for n in names if n not in ran]
    if missing:
        raise ValueError(
            f"{where}: the targeted layer(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} of {len(names)}) never ran on {data}, so {consequence}; "
            "exclude them (exclude=...) or feed batches that reach them"
        )


@contextlib.contextmanager
def recording_calls(model: nn.Module, names: list[str]) -> Iterator[set[str]]:
    """Within the block, the set of the named layers that have been called (filled by forward pre-hooks)."""
    ran: set[str] = set()

    def hook(name: str):
        def record(_module: nn.Module, _args: tuple[Tensor, ...]) -> None:
            ran.add(name)

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def execution_stages(model: nn.Module, names: list[str], batch: Batch) -> list[list[str]]:
    """The named layers in execution order, grouped into runs that read the same input tensor."""
    seen: list[tuple[str, Tensor]] = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if all(name != n for n, _ in seen):
                seen.append((name, args[0]))

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with _eval_no_grad(model):
            _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(names) - {n for n, _ in seen})
    if missing:
        raise ValueError(
            f"sequential calibration: the layers {missing[:5]} never ran on the calibration batch; "
            "exclude them from targets or use sequential=False"
        )
    stages: list[list[str]] = []
    for i, (name, x) in enumerate(seen):
        if i and x is seen[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def _capture(model: nn.Module, name: str, batch: Batch) -> Tensor:
    """The token rows entering layer ``name`` for this batch (the forward stops there)."""
    box: dict[str, Tensor] = {}

    def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        box["x"] = token_rows(args[0], batch)
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(grab)
    try:
        _run(model, batch)
    finally:
        handle.remove()
    return box["x"]


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Put ``modules`` in place of the model's current modules of those names, then restore them."""
    current = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            _set_child(model, name, module)
        yield
    finally:
        for name, module in current.items():
            _set_child(model, name, module)


def paired_grams(model: nn.Module, name: str, originals: dict[str, nn.Module], batches: list[Batch]) -> tuple[Tensor, Tensor]:
    """``(X_cᵀX_c, X_cᵀX_o)`` for layer ``name``: X_c from the model as it is, X_o with ``originals`` back."""
    sums: list[Tensor] = []
    with _eval_no_grad(model):
        for batch in batches:
            with swapped(model, originals):
                x_o = _capture(model, name, batch)
            x_c = _capture(model, name, batch)
            pair = (gram(x_c, x_c), gram(x_c, x_o))
            if sums:
                sums[0] += pair[0]
                sums[1] += pair[1]
            else:
                sums.extend(pair)
    return sums[0], sums[1]
