"""How many singular directions each layer keeps.

A factorised (out m, in n) layer at rank r holds ``r (m + n)`` weights instead of ``m n``; it only
pays while ``r < m n / (m + n)`` (break-even, LoRD arXiv 2309.14021 spec Sec. 2d). Four rules:

* **uniform ratio** (ASVD arXiv 2312.05821 ``param_ratio`` / SVD-LLM arXiv 2403.07378 Sec. 4):
  ``r = floor(ratio · m n / (m + n))``, the same fraction of weights kept in every layer.
* **energy**: the smallest r with ``Σ_{i<=r} σ_i² >= energy · Σ_i σ_i²``.
* **global** (heterogeneous allocation, in the spirit of SVD-LLM V2, arXiv 2503.12340, Sec. 3.1,
  which allocates by the theoretical truncation loss): choose one option per layer, a rank r or
  "keep dense", minimising ``Σ_l  Σ_{i>r_l} σ_{l,i}² / Σ_i σ_{l,i}²`` (each layer's relative
  truncation loss; with whitened spectra this is its relative output error on the calibration
  set) subject to ``Σ_l cost_l <= ratio · Σ_l m_l n_l``. Solved by the Lagrangian: for a price λ
  each layer independently takes ``argmin loss(r) + λ cost(r)``; λ is bisected to the budget.
  Measured on all-MiniLM-L6-v2 (256 calibration / 256 held-out tweets, ratio 0.5, sequential
  whitening): it keeps 24 of 37 layers dense and reaches only cos 0.768, below uniform whitening
  (0.82): equal weights on each layer's relative loss do not reflect how errors propagate to the
  embedding. It is therefore opt-in.
* **sensitivity**: the same solver with each layer's loss scaled by its *measured* effect on the
  model output (:mod:`rankwise.compress.sensitivity`); cos 0.865 at ratio 0.5 on the same set-up.

:func:`allocate` solves the Lagrangian relaxation and then spends the budget it leaves greedily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .factorized import break_even_rank


def uniform_rank(out_features: int, in_features: int, ratio: float) -> int:
    """``max(1, floor(ratio · m n / (m + n)))``: the rank that keeps ``ratio`` of the layer's weights.

    Below ``ratio = (m + n) / (m n)`` rank 1 keeps more than asked; :func:`rankwise.compress.compress` refuses
    a plan whose total exceeds the ratio (a ValueError naming the smallest reachable ratio).
    """
    return max(1, math.floor(ratio * break_even_rank(out_features, in_features) + 1e-9))


def energy_rank(spectrum: Tensor, energy: float) -> int:
    """The smallest r whose leading σ² reach ``energy`` of the total (at least 1)."""
    power = spectrum.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor([energy - 1e-12], dtype=cumulative.dtype)).item()) + 1


@dataclass
class RankOptions:
    """The choices for one layer: ``ranks[i]`` (None = keep dense) costs ``cost[i]`` weights and ``loss[i]``."""

    ranks: list[int | None]
    loss: Tensor
    cost: Tensor


def relative_tail(spectrum: Tensor) -> Tensor:
    """``tail[r-1] = Σ_{i>r} σ_i² / Σ_i σ_i²``, the relative error left at rank r (1-based)."""
    power = spectrum.double() ** 2
    return (power.sum() - torch.cumsum(power, 0)) / (float(power.sum()) or 1.0)


def exact_rank(spectrum: Tensor, out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """The numerical rank of a layer from its (descending) spectrum: ``#{i : σ_i > σ_1 · max(m, n) · eps}``.

    ``eps`` is the machine epsilon of the weight's ``dtype`` (the tolerance of ``numpy.linalg.matrix_rank``):
    a float32 product of rank-3 factors is rank 3 to that precision even though its float64 SVD shows a
    tail of rounding noise. 0 for an all-zero spectrum.
    """
    if len(spectrum) == 0 or float(spectrum[0]) <= 0.0:
        return 0
    tolerance = float(spectrum[0]) * max(out_features, in_features) * torch.finfo(dtype).eps
    return int((spectrum > tolerance).sum())


def max_useful_rank(spectrum: Tensor, out_features: int, in_features: int) -> int:
    """The largest rank below break-even (and within the spectrum)."""
    return max(1, min(len(spectrum), math.ceil(break_even_rank(out_features, in_features)) - 1))


def spectrum_options(spectrum: Tensor, out_features: int, in_features: int, gain: Tensor | None = None) -> RankOptions:
    """Ranks 1..r_max below break-even with loss ``gain(r) · relative_tail(r)`` (gain 1 by default), then dense."""
    r_max = max_useful_rank(spectrum, out_features, in_features)
    loss = relative_tail(spectrum)[:r_max]
    if gain is not None:
        loss = loss * gain[:r_max]
    ranks = torch.arange(1, r_max + 1, dtype=torch.float64)
    return RankOptions(
        [*list(range(1, r_max + 1)), None],
        torch.cat([loss, torch.zeros(1, dtype=torch.float64)]),
        torch.cat([ranks * (out_features + in_features), torch.tensor([float(out_features * in_features)])]),
    )


def allocate(options: dict[str, RankOptions], budget: float) -> dict[str, int | None]:
    """One option per layer minimising the summed loss with total cost <= ``budget``.

    Lagrangian relaxation: for a price λ every layer independently takes ``argmin loss + λ cost``;
    λ is bisected to the smallest price whose choices fit the budget. The relaxation only reaches
    points on each layer's convex hull, so the budget it leaves is then spent greedily: the upgrade
    with the largest loss drop per extra weight that still fits, until none fits.
    """

    def choose(price: float) -> dict[str, int]:
        return {name: int(torch.argmin(o.loss + price * o.cost)) for name, o in options.items()}

    def spent(picks: dict[str, int]) -> float:
        return sum(float(options[name].cost[i]) for name, i in picks.items())

    low, high = 0.0, 1.0
    while spent(choose(high)) > budget and high < 1e12:
        high *= 4.0
    for _ in range(60):
        middle = (low + high) / 2
        if spent(choose(middle)) > budget:
            low = middle
        else:
            high = middle
    picks = _spend_leftover(options, choose(high), budget)
    return {name: options[name].ranks[i] for name, i in picks.items()}


def _spend_leftover(options: dict[str, RankOptions], picks: dict[str, int], budget: float) -> dict[str, int]:
    """Greedy upgrades (largest loss drop per extra cost) while they fit in the budget."""
    picks = dict(picks)
    left = budget - sum(float(options[name].cost[i]) for name, i in picks.items())
    while True:
        best: tuple[float, str, int] | None = None
        for name, i in picks.items():
            extra = options[name].cost - options[name].cost[i]
            gain = options[name].loss[i] - options[name].loss
            fits = (extra > 0) & (extra <= left) & (gain > 0)
            if bool(fits.any()):
                rate = torch.where(fits, gain / extra.clamp_min(1e-30), torch.tensor(-1.0, dtype=gain.dtype))
                j = int(torch.argmax(rate))
                if best is None or float(rate[j]) > best[0]:
                    best = (float(rate[j]), name, j)
        if best is None:
            return picks
        _, name, j = best
        left -= float(options[name].cost[j] - options[name].cost[picks[name]])
        picks[name] = j


def global_allocation(spectra: dict[str, tuple[Tensor, int, int]], ratio: float,
                      gains: dict[str, Tensor] | None = None) -> dict[str, int | None]:
    """Per-layer rank (None = keep dense) minimising the summed loss within ``ratio`` of the weights.

    ``spectra`` maps a layer name to (singular values, out_features, in_features); each layer's loss
    at rank r is its relative tail, times ``gains[name][r-1]`` when gains are given (the measured
    sensitivity of :mod:`rankwise.compress.sensitivity`).

    A budget below the cheapest option of every layer (rank 1, or dense where that is smaller) cannot be met: the
    cheapest options come back, over budget; :func:`rankwise.compress.compress` refuses such a ratio beforehand.
    """
    options = {name: spectrum_options(s, m, n, None if gains is None else gains[name])
               for name, (s, m, n) in spectra.items()}
    return allocate(options, ratio * sum(m * n for _, m, n in spectra.values()))
