"""Cuttlefish: full-rank warm-up while stable ranks settle, then factorised training at those ranks.

Paper: Wang et al., "Cuttlefish: Low-Rank Model Training without All the Tuning", MLSys 2023,
arXiv 2305.02538. The paper body could not be read here; the rule below follows the official code
(hwang595/Cuttlefish, CIFAR ``utils.py`` / ``main.py``) as summarised in ``methods/cuttlefish.md`` §2–§4.

Per tracked layer l with matricised weight M_l (channel scheme for convs)::

    srank(M)  = ⌊‖M‖_F² / ‖M‖₂²⌋                        (floored, as the code's int(...))
    ξ_l       = min(m, n) / srank(M_l⁽⁰⁾)                  (scale measured at initialisation)
    h_l       = [srank(M_l) at each warm-up epoch]          (point 0 = the untrained init)
    stable_l  ⇐ epoch ≥ w  and  mean(|∇ EMA_w(h_l)|[-q:]) ≤ τ · relax(#unstable)   (sticky)
    EMA_w(h)_0 = h_0,  EMA_t = α h_t + (1 − α) EMA_{t−1},  α = 2 / (w + 1);  ∇ = numpy.gradient
    switch    ⇐ every tracked layer stable (the code then trains one more dense epoch and switches)
    r_l       = clip(⌈ξ_l · srank(M_l)⌉, ⌊ρ · min(m, n)⌋, min(m, n))   ("scaled-stable-rank"; ρ = rank_floor)

At the switch each layer becomes B A with A = Σ_r^½ V_rᵀ, B = U_r Σ_r^½ (shared helper
:func:`~rankwise.compress.lowrank_conv.factorize_layer`), so the model function is kept up to the
truncation. Optional Frobenius decay (Khodak et al., ICLR 2021) adds (λ/2)‖B A‖_F² per pair instead of
weight decay on A and B (see :func:`~rankwise.compress.lowrank_conv.frobenius_decay`).

Decisions:

* Detector constants default to the CIFAR script: w = 15, q = 11, τ = 0.1, relaxed ×2.5 when two
  layers remain unstable and ×5 when one remains (``relaxation``). They count evaluation points
  (epochs in the paper's code); scale them for short runs.
* Layer selection by module type and name, never by state-dict index. Default: every Linear and
  ungrouped Conv2d except the first ``dense_prefix`` layers (K; the code hard-codes it per model, e.g.
  stem + layer1 for ResNet-18; the paper picks it by profiling, which is not automated here) and the
  last Linear (the classifier, dense in every official script).
* A layer whose rank is at or above break-even stays dense (the code factorises it anyway, growing
  the model); the report lists it.
* ``max_warmup_points`` forces the switch with a warning when the detector never fires (the code would
  silently train dense to the end).
* The first factor has no bias (the DeiT code keeps a random bias there, which shifts the output).
* Extra BNs between the factors are not offered: they make the switch non-function-preserving.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

from .lowrank_conv import (
    check_not_adapted,
    factorize_layer,
    frobenius_decay,
    layer_break_even,
    matricize,
    rank_cap,
    resolve_targets,
    set_submodule,
    stable_rank,
)


@dataclass(kw_only=True)
class CuttlefishConfig:
    """Hyper-parameters of Cuttlefish (names follow ``methods/cuttlefish.md``)."""

    window: int = field(default=15, metadata={"help": "w: EMA span and minimum warm-up points"})
    points: int = field(default=11, metadata={"help": "q: trailing EMA-gradient points averaged"})
    tolerance: float = field(default=0.1, metadata={"help": "τ: stable when mean |∇EMA| <= τ"})
    relaxation: tuple[tuple[int, float], ...] = field(
        default=((1, 5.0), (2, 2.5)), metadata={"help": "(max #unstable layers, τ multiplier); the smallest bound that covers wins"}
    )
    rank_metric: str = field(default="scaled", metadata={"help": "'scaled' (ξ·srank) or 'vanilla' (srank)"})
    rank_floor: float = field(default=0.0, metadata={"help": "ρ: rank >= ⌊ρ·min(m, n)⌋ (ImageNet 1/5, DeiT 1/2)"})
    dense_prefix: int = field(default=1, metadata={"help": "K: leading Linear/Conv2d layers kept full-rank"})
    targets: Sequence[str] | None = field(default=None, metadata={"help": "module names; None = default rule"})
    frobenius_decay: float = field(default=0.0, metadata={"help": "λ of (λ/2)‖BA‖_F² after the switch; 0 = off"})
    max_warmup_points: int | None = field(default=None, metadata={"help": "force the switch after this many"})

    def __post_init__(self) -> None:
        if not (self.window >= 1 and self.points >= 1 and self.tolerance > 0):
            raise ValueError("CuttlefishConfig: window and points must be >= 1 and tolerance > 0")
        if self.rank_metric not in ("scaled", "vanilla"):
            raise ValueError(f"CuttlefishConfig.rank_metric {self.rank_metric!r}: use 'scaled' or 'vanilla'")
        if not 0.0 <= self.rank_floor <= 1.0:
            raise ValueError(f"CuttlefishConfig.rank_floor {self.rank_floor} must lie in [0, 1]")
        if self.dense_prefix < 0 or self.frobenius_decay < 0:
            raise ValueError("CuttlefishConfig: dense_prefix and frobenius_decay must be >= 0")
        if self.max_warmup_points is not None and self.max_warmup_points < 1:
            raise ValueError("CuttlefishConfig.max_warmup_points must be >= 1 or None")


def exponential_moving_average(history: Sequence[float], window: int) -> np.ndarray:
    """EMA_0 = h_0, EMA_t = α h_t + (1 − α) EMA_{t−1} with α = 2 / (w + 1)."""
    alpha = 2.0 / (window + 1)
    out = np.empty(len(history))
    out[0] = history[0]
    for t in range(1, len(history)):
        out[t] = alpha * history[t] + (1 - alpha) * out[t - 1]
    return out


def is_stable(history: Sequence[float], window: int, points: int, tolerance: float) -> bool:
    """epoch ≥ w (epoch = len(history) − 1) and mean(|∇EMA_w(h)|) over the last q points ≤ τ."""
    if len(history) - 1 < window or len(history) < 2:
        return False
    slope = np.gradient(exponential_moving_average(history, window))
    return float(np.abs(slope[-points:]).mean()) <= tolerance


def relaxed_tolerance(tolerance: float, unstable: int, relaxation: Sequence[tuple[int, float]]) -> float:
    """τ times the first multiplier whose bound covers the number of still-unstable layers."""
    for bound, factor in sorted(relaxation):
        if unstable <= bound:
            return tolerance * factor
    return tolerance


def floored_stable_rank(matrix: Tensor, name: str = "matrix") -> int:
    """⌊srank(M)⌋, at least 1 (the code's int(Σσ²/σ₁²))."""
    return max(1, math.floor(stable_rank(matrix, name)))


def default_targets(model: nn.Module, dense_prefix: int) -> list[str]:
    """Linear and ungrouped Conv2d layers, minus the first ``dense_prefix`` and the last Linear."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else None
    return [n for n, _ in layers[dense_prefix:] if n != classifier]


class Cuttlefish:
    """Stable-rank tracking, the switch rule and the switch itself on ``model``.

    Usage (the CIFAR schedule)::

        cf = Cuttlefish(model, CuttlefishConfig(window=5, points=5))   # ξ measured now, at init
        for epoch in range(epochs):
            if not cf.switched:
                switch_now = cf.observe()          # srank at the start of the epoch
                train_one_epoch(model)             # dense
                if switch_now:
                    report = cf.switch()           # factorises in place; build a new optimizer
            else:
                train_one_epoch(model, extra_loss=cf.penalty)   # Frobenius decay if configured
    """

    def __init__(self, model: nn.Module, config: CuttlefishConfig) -> None:
        self.model = model
        self.config = config
        self.layers = resolve_targets(model, config.targets, default_targets(model, config.dense_prefix), "Cuttlefish")
        self.full_ranks = {n: rank_cap(m.weight.shape) for n, m in self.layers.items()}
        self.scale = {n: self.full_ranks[n] / self._srank(n) for n in self.layers}
        self.history: dict[str, list[int]] = {n: [] for n in self.layers}
        self.stable: dict[str, bool] = dict.fromkeys(self.layers, False)
        self.switched = False
        self.factorized: list[nn.Module] = []

    def _srank(self, name: str) -> int:
        return floored_stable_rank(matricize(self.layers[name].weight.detach()), f"layer '{name}'")

    def _check_dense(self, what: str) -> None:
        if self.switched:
            raise ValueError(f"Cuttlefish.{what}: switch() has already factorised the model (Cuttlefish.layers now holds "
                             "the factorised pairs); stable ranks are tracked on the dense layers before the switch")

    def observe(self) -> bool:
        """Record every tracked layer's ⌊srank⌋, update the sticky stable flags; True once all are stable.

        τ is relaxed by the number of layers still unstable *before* this point's update, as in the code.
        """
        self._check_dense("observe")
        for name in self.layers:
            self.history[name].append(self._srank(name))
        unstable = sum(not flag for flag in self.stable.values())
        tau = relaxed_tolerance(self.config.tolerance, unstable, self.config.relaxation)
        for name, flag in self.stable.items():
            if not flag:
                self.stable[name] = is_stable(self.history[name], self.config.window, self.config.points, tau)
        if all(self.stable.values()):
            return True
        limit = self.config.max_warmup_points
        if limit is not None and len(next(iter(self.history.values()))) >= limit:
            warnings.warn(
                f"Cuttlefish: stable ranks did not settle within {limit} points "
                f"(unstable: {[n for n, f in self.stable.items() if not f]}); forcing the switch",
                stacklevel=2,
            )
            return True
        return False

    def ranks(self) -> dict[str, int]:
        """r_l = clip(⌈ξ_l·⌊srank⌋⌉ (or ⌊srank⌋ for 'vanilla'), ⌊ρ·r_full⌋, r_full) from the current weights."""
        self._check_dense("ranks")
        out = {}
        for name in self.layers:
            full = self.full_ranks[name]
            current = self._srank(name)
            rank = math.ceil(self.scale[name] * current) if self.config.rank_metric == "scaled" else current
            out[name] = max(1, math.floor(self.config.rank_floor * full), min(full, rank))
        return out

    def switch(self) -> dict[str, dict[str, object]]:
        """Factorise every tracked layer below break-even at :meth:`ranks`, in place (once).

        Returns ``{name: {"rank": r, "factorized": bool}}``. Afterwards :attr:`layers` maps each tracked
        layer to the module now in the model (the pair, or the dense layer kept). Build a fresh optimizer.
        A tracked layer that now carries a rankwise adapter (adapted after ``Cuttlefish(...)``) is refused
        before anything changes (:func:`~rankwise.compress.lowrank_conv.check_not_adapted`); every pair is
        built before the first one is swapped in.
        """
        self._check_dense("switch")
        check_not_adapted(self.model, list(self.layers), "Cuttlefish.switch")
        report: dict[str, dict[str, object]] = {}
        pairs: dict[str, nn.Module] = {}
        for name, rank in self.ranks().items():
            layer = self.layers[name]
            worth = rank < layer_break_even(layer.weight.shape)
            if worth:
                pairs[name] = factorize_layer(name, layer, rank)
            report[name] = {"rank": rank, "factorized": worth}
        for name, pair in pairs.items():
            set_submodule(self.model, name, pair)
            self.layers[name] = pair
            self.factorized.append(pair)
        self.switched = True
        return report

    def penalty(self) -> Tensor:
        """(λ/2) Σ ‖B A‖_F² over the factorised layers (zero before the switch or with λ = 0)."""
        return frobenius_decay(self.factorized, self.config.frobenius_decay)
