"""How much each layer's truncation hurts the *model's output*: measured sensitivity for rank allocation.

A layer's own truncation error (its whitened tail ``Σ_{i>r} σ_i²``) says nothing about how far the
error travels to the model's output: MiniLM's attention projections tolerate far less truncation than
its feed-forward layers at the same relative error. ASVD (Yuan et al., "ASVD: Activation-aware
Singular Value Decomposition for Compressing Large Language Models", arXiv 2312.05821, Sec. 3.3)
therefore truncates one layer at a time, measures the model's perplexity, and allocates ranks from
that table. We keep the measurement and make it model-agnostic and cheaper:

* distortion of the model output: ``D = Σ ‖y - ŷ‖² / Σ ‖y‖²`` over the calibration tokens (padding
  dropped), where ``y`` is the model's first output tensor (``last_hidden_state``, ``logits``, ...);
* each layer is truncated alone at the probe ranks ``round(f · r_max)`` for ``f`` in ``fractions``
  (``r_max``: its largest rank below break-even; by default one probe, ``f = 0.5``) and the *gain*
  ``g = D / relative_tail(r)`` is recorded;
* between the measured ranks the gain is interpolated linearly (constant outside), so every rank
  gets the loss ``g(r) · relative_tail(r)``: the measured end-to-end sensitivity, with the exact
  shape of the layer's own spectrum. :func:`rankwise.compress.ranks.allocate` then minimises the
  summed loss within the weight budget (first-order additivity of small per-layer distortions).

Exactly low-rank layers (pruned, small, or trained to low rank): at a probe rank at or above the
layer's numerical rank k (:func:`~rankwise.compress.ranks.exact_rank`) the tail is zero (or rounding
noise), so ``D / tail`` is 0/0 and says nothing about the ranks below k, where truncation does hurt.
Such probes are moved down to rank ``k - 1``, the largest rank whose tail is real; the gain measured
there prices every rank, and the ranks >= k keep their (zero) tail. A layer of numerical rank <= 1
loses nothing at any rank, so it needs no probe (gain 0). Treating a zero tail as "no gain" instead
would make every rank of such a layer look free, and the allocator would cut it to rank 1.

Cost: one forward pass over the calibration batches per probe rank (``len(fractions)``, 1 by
default) per targeted layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .calibration import Batch, _eval_no_grad, _on_device, recording_calls, require_ran, swapped, token_rows
from .factorized import FactorizedLinear
from .ranks import exact_rank, max_useful_rank, relative_tail

DEFAULT_FRACTIONS = (0.5,)
DEFAULT_SEQUENCES = 64


def first_tensor(output: object) -> Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple / dict / ModelOutput."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output
    for value in values:  # type: ignore[union-attr]
        if isinstance(value, Tensor):
            return value
    raise ValueError(f"sensitivity: the model returned {type(output).__name__} with no tensor to compare")


def model_outputs(model: nn.Module, batches: list[Batch]) -> list[Tensor]:
    """The model's main output on every batch, as token rows (padding dropped) in float32 or wider."""
    device = next(model.parameters()).device
    with _eval_no_grad(model):
        return [token_rows(first_tensor(model(**_on_device(b, device))), b) for b in batches]


def distortion(model: nn.Module, batches: list[Batch], references: list[Tensor]) -> float:
    """``Σ ‖y - ŷ‖² / Σ ‖y‖²`` of the model's outputs against ``references``."""
    error = total = 0.0
    for output, reference in zip(model_outputs(model, batches), references):
        error += float((output.double() - reference.double()).pow(2).sum())
        total += float(reference.double().pow(2).sum())
    return error / (total or 1.0)


def _batch_size(batch: Batch, default: int) -> int:
    """The first dimension of the batch's first non-scalar tensor (``default`` when it has none)."""
    return next((v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim()), default)


def _sequences(batches: list[Batch]) -> int:
    """How many sequences the batches hold (a batch without a tensor counts as one)."""
    return sum(_batch_size(batch, 1) for batch in batches)


def take_sequences(batches: list[Batch], count: int) -> list[Batch]:
    """The first ``count`` sequences of the calibration batches (tensors sliced along their first dimension)."""
    taken: list[Batch] = []
    for batch in batches:
        if count <= 0:
            break
        size = _batch_size(batch, count)
        keep = min(size, count)
        taken.append({k: (v[:keep] if isinstance(v, Tensor) and v.dim() and v.shape[0] == size else v)
                      for k, v in batch.items()})
        count -= keep
    return taken


def _interpolate(points: list[tuple[int, float]], length: int) -> Tensor:
    """Piecewise-linear values at ranks 1..length through (rank, value) points, constant outside."""
    ys = torch.tensor([v for _, v in points], dtype=torch.float64)
    if len(points) == 1:
        return ys.expand(length).clone()
    ranks = torch.arange(1, length + 1, dtype=torch.float64)
    xs = torch.tensor([float(r) for r, _ in points], dtype=torch.float64)
    index = torch.searchsorted(xs, ranks).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    values = y0 + (y1 - y0) * (ranks - x0) / (x1 - x0)
    return torch.where(ranks <= xs[0], ys[0], torch.where(ranks >= xs[-1], ys[-1], values))


def sensitivity_gains(
    model: nn.Module,
    factors: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    shapes: Mapping[str, tuple[int, int]],
    batches: list[Batch],
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
) -> dict[str, Tensor]:
    """Per layer, the gain ``g(r)`` for ranks 1..len(spectrum) (see the module docstring).

    ``factors[name] = (left, right, spectrum)`` with ``W_r = left[:, :r] @ right[:r]``; probes sit at
    ``round(f · r_max)`` for ``f`` in ``fractions``, moved below the layer's numerical rank.

    Every layer in ``factors`` must run on ``batches`` (ValueError otherwise, before any probe): a layer the
    model never calls distorts nothing at any rank, so it would get gain 0 and be cut to rank 1 unmeasured.
    """
    with recording_calls(model, list(factors)) as ran:
        references = model_outputs(model, batches)
    require_ran(list(factors), ran, f"the {_sequences(batches)} calibration sequence(s) of the measurement (the first "
                "sensitivity_sequences)", "sensitivity allocation",
                "their effect on the model output cannot be measured (every rank would look free)")
    gains: dict[str, Tensor] = {}
    for name, (left, right, spectrum) in factors.items():
        dense = model.get_submodule(name)
        r_max = max_useful_rank(spectrum, *shapes[name])
        probe_max = min(r_max, exact_rank(spectrum, *shapes[name], dense.weight.dtype) - 1)
        tail = relative_tail(spectrum)
        probes = sorted({max(1, min(probe_max, round(f * r_max))) for f in fractions}) if probe_max >= 1 else []
        points: list[tuple[int, float]] = []
        for rank in probes:
            with swapped(model, {name: FactorizedLinear.replacing(dense, left[:, :rank], right[:rank])}):
                points.append((rank, distortion(model, batches, references) / float(tail[rank - 1])))
        gains[name] = _interpolate(points, len(spectrum)) if points else torch.zeros(len(spectrum), dtype=torch.float64)
    return gains
