"""How many singular directions each layer keeps.

A factorised (out m, in n) layer at rank r holds ``r (m + n)`` weights instead of ``m n``; it only
pays while ``r < m n / (m + n)`` (break-even, LoRD arXiv 2309.14021 spec Sec. 2d). Three rules:

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
  embedding. It is therefore opt-in; a sensitivity-weighted loss (ASVD Sec. 3.3) is the next step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .factorized import break_even_rank


def uniform_rank(out_features: int, in_features: int, ratio: float) -> int:
    """``max(1, floor(ratio · m n / (m + n)))``: the rank that keeps ``ratio`` of the layer's weights."""
    return max(1, math.floor(ratio * break_even_rank(out_features, in_features) + 1e-9))


def energy_rank(spectrum: Tensor, energy: float) -> int:
    """The smallest r whose leading σ² reach ``energy`` of the total (at least 1)."""
    power = spectrum.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor([energy - 1e-12], dtype=cumulative.dtype)).item()) + 1


def _options(spectrum: Tensor, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
    """(loss, cost) of every option: ranks 1..r_max below break-even, then dense (loss 0, cost m n)."""
    power = spectrum.double() ** 2
    total = float(power.sum()) or 1.0
    tail = (power.sum() - torch.cumsum(power, 0)) / total  # tail[r-1] = loss at rank r
    r_max = min(len(spectrum), math.ceil(break_even_rank(out_features, in_features)) - 1)
    ranks = torch.arange(1, r_max + 1, dtype=torch.float64)
    loss = torch.cat([tail[:r_max], torch.zeros(1, dtype=torch.float64)])
    cost = torch.cat([ranks * (out_features + in_features), torch.tensor([float(out_features * in_features)])])
    return loss, cost


def global_allocation(spectra: dict[str, tuple[Tensor, int, int]], ratio: float) -> dict[str, int | None]:
    """Per-layer rank (None = keep dense) minimising the summed relative loss within the budget.

    ``spectra`` maps a layer name to (singular values, out_features, in_features).
    """
    options = {name: _options(s, m, n) for name, (s, m, n) in spectra.items()}
    budget = ratio * sum(m * n for _, m, n in spectra.values())

    def choose(price: float) -> tuple[dict[str, int], float]:
        picks = {name: int(torch.argmin(loss + price * cost)) for name, (loss, cost) in options.items()}
        return picks, sum(float(options[name][1][i]) for name, i in picks.items())

    low, high = 0.0, 1.0
    while choose(high)[1] > budget and high < 1e12:
        high *= 4.0
    for _ in range(60):
        middle = (low + high) / 2
        if choose(middle)[1] > budget:
            low = middle
        else:
            high = middle
    picks, _ = choose(high)
    return {name: (None if i == len(options[name][0]) - 1 else i + 1) for name, i in picks.items()}
