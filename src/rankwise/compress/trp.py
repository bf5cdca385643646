"""Trained Rank Pruning (TRP): truncated-SVD projection interleaved with training, plus a nuclear-norm term.

Papers: Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 1812.02402, and its
IJCAI 2020 extension "TRP: Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 2004.14566.
The paper bodies could not be read here; every detail below follows the official code
(yuhuixu1993/Trained-Rank-Pruning, ``cifar-TRP.py`` and ``decompose.py``) as summarised in
``methods/trp.md`` §2–§5, and the Fig. 1 caption.

Every ``period`` (m) iterations, for each target layer with matricised weight M = U Σ Vᵀ::

    k   = min{k : Σ_{i≤k} σᵢ² / Σ σᵢ² ≥ e}        (energy threshold e, σ² energy)
    W  <- unmat(U_k Σ_k V_kᵀ)                       (the iteration then trains the low-rank weight)
    S   = unmat(U_k V_kᵀ)                           (sub-gradient of ‖·‖_* at the truncated matrix)
    after backward:  ∇W <- ∇W + λ S                 (nuclear term λ Σ_l ‖M_l‖_*, TRP iterations only)

Other iterations train W freely. At the end each layer is replaced by two thin layers at the rank
#{σᵢ ≥ τ} (value threshold τ = 0.05, the code's final ``ValueThreshold``) or, if ``final_energy`` is
set, at the energy rank; :mod:`rankwise.compress.lowrank_conv` builds them (channel or spatial scheme).

Decisions (source: the official code unless stated):

* ``energy`` = 0.9 (hard-coded in ``low_rank_approx``), ``nuclear_weight`` λ = 3e-4 (README commands),
  ``period`` m = 1 (the argparse default used by the README commands; ``train_TPR.sh`` uses 5).
* The sub-gradient is the truncated U_k V_kᵀ and is added on TRP iterations only, as in the code.
* The period counts the ``step`` the caller passes; the code passes the batch index, which restarts
  each epoch (so the first batch of every epoch projects). Pass the batch index to reproduce that.
* Default targets: every ungrouped Conv2d with a kernel larger than 1×1 except the first conv
  (``get_look_up_table``); the code never touches Linear layers. ``include_linear=True`` also takes
  every Linear except the last one (the classifier) — a rankwise extension, since TRP's formulas apply
  to any matrix. Explicit module names may be given instead.
* Strided convs are factorised at the end too: our pair copies stride/padding/dilation, whereas the
  code hard-codes stride 1 / padding 1 and therefore skipped strided convs.
* A layer whose final rank is at or above the break-even rank stays dense (listed in the report).
* Momentum buffers are not projected (as in the code): they keep the discarded directions.
* The projection's SVD runs in float32, or in float64 for float64 weights, under ``no_grad``; half
  and bfloat16 weights are projected in float32 and written back in their own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .lowrank_conv import (
    Scheme,
    check_energy,
    check_not_adapted,
    check_scheme,
    energy_rank,
    factorize_layer,
    layer_break_even,
    matricize,
    resolve_targets,
    set_submodule,
    unmatricize,
    value_rank,
)


@dataclass(kw_only=True)
class TRPConfig:
    """Hyper-parameters of TRP (names follow ``methods/trp.md``)."""

    energy: float = field(default=0.9, metadata={"help": "training energy threshold e in (0, 1]"})
    period: int = field(default=1, metadata={"help": "project every m iterations (m >= 1)"})
    nuclear_weight: float = field(default=3e-4, metadata={"help": "λ of the nuclear term; 0 turns it off"})
    scheme: str = field(default="channel", metadata={"help": "conv matricisation: 'channel' or 'spatial'"})
    project: bool = field(default=True, metadata={"help": "replace W by its TSVD on TRP iterations (--trp)"})
    targets: Sequence[str] | None = field(default=None, metadata={"help": "module names; None = default rule"})
    include_linear: bool = field(default=False, metadata={"help": "default rule also takes Linear but the last"})
    final_threshold: float = field(default=0.05, metadata={"help": "final rank = #{σ >= τ}"})
    final_energy: float | None = field(default=None, metadata={"help": "if set, final rank by energy instead"})

    def __post_init__(self) -> None:
        check_energy(self.energy, "TRPConfig.energy")
        if self.final_energy is not None:
            check_energy(self.final_energy, "TRPConfig.final_energy")
        if not (isinstance(self.period, int) and self.period >= 1):
            raise ValueError(f"TRPConfig.period {self.period!r} must be an integer >= 1 (1 = every iteration)")
        if self.nuclear_weight < 0 or self.final_threshold < 0:
            raise ValueError("TRPConfig: nuclear_weight and final_threshold must be >= 0")
        check_scheme(self.scheme, "TRPConfig")


def truncate(matrix: Tensor, energy: float) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k, σ_{1..k}, V_kᵀ) of ``matrix`` for its energy rank k."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = energy_rank(s, energy)
    return u[:, :k], s[:k], vh[:k]


def nuclear_subgradient(matrix: Tensor, energy: float = 1.0) -> Tensor:
    """U_k V_kᵀ for the energy rank k of ``matrix``: a sub-gradient of ‖·‖_* at its rank-k truncation."""
    u, _, vh = truncate(matrix, energy)
    return u @ vh


def default_targets(model: nn.Module, include_linear: bool) -> list[str]:
    """Conv2d (groups 1, kernel > 1×1) except the first conv; optionally every Linear except the last."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = [n for n, m in convs[1:] if m.groups == 1 and tuple(m.kernel_size) != (1, 1)]
    if include_linear:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        names += linears[:-1]
    return names


class TRP:
    """Drives TRP on ``model``: call :meth:`before_forward` and :meth:`before_optimizer_step` each iteration.

    Usage::

        trp = TRP(model, TRPConfig(energy=0.9, period=1, nuclear_weight=3e-4))
        for step, (x, y) in enumerate(loader):
            trp.before_forward(step)                    # TSVD projection when step % m == 0
            loss = criterion(model(x), y); loss.backward()
            trp.before_optimizer_step()                 # adds λ U_k V_kᵀ on TRP iterations
            optimizer.step(); optimizer.zero_grad()
        report = trp.factorize()                        # two thin layers per target, in place
    """

    def __init__(self, model: nn.Module, config: TRPConfig) -> None:
        self.model = model
        self.config = config
        self.layers = resolve_targets(model, config.targets, default_targets(model, config.include_linear), "TRP")
        self._subgradients: dict[str, Tensor] = {}
        self.last_ranks: dict[str, int] = {}
        self.factorized = False

    @property
    def scheme(self) -> Scheme:
        return self.config.scheme  # type: ignore[return-value]

    def _check_dense(self, what: str) -> None:
        if self.factorized:
            raise ValueError(f"TRP.{what}: factorize() has already replaced the target layers by their factorised pairs "
                             "(TRP.layers now holds those); TRP acts on the dense weights, so train with it before factorize()")

    def _check_finite(self, what: str, names: list[str] | None = None) -> None:
        """Raise a ValueError naming the first target (of ``names``, default all) whose weight holds NaN or Inf:
        its SVD would fail with torch's LinAlgError. Callers check every weight before they change any."""
        for name in self.layers if names is None else names:
            weight = self.layers[name].weight
            if not torch.isfinite(weight.detach()).all():
                raise ValueError(
                    f"TRP.{what}: the {tuple(weight.shape)} weight of layer '{name}' holds NaN or Inf (training "
                    "diverged), so it has no SVD; nothing was changed. Restore a checkpoint or lower the learning rate"
                )

    @torch.no_grad()
    def before_forward(self, step: int) -> bool:
        """On TRP iterations (step % m == 0) project each weight to its energy-rank TSVD; return whether it did.

        The SVD runs in float32, or in float64 for float64 weights (never below the weight's precision).
        A weight holding NaN or Inf (training diverged) is a ValueError naming the layer, raised before any
        weight is projected.
        """
        self._check_dense("before_forward")
        self._subgradients = {}
        if step % self.config.period:
            return False
        self._check_finite("before_forward")  # every weight, before the first one is projected
        for name, layer in self.layers.items():
            weight = layer.weight
            matrix = matricize(weight.detach().to(torch.promote_types(weight.dtype, torch.float32)), self.scheme)
            u, s, vh = truncate(matrix, self.config.energy)
            self.last_ranks[name] = s.numel()
            if self.config.project:
                weight.copy_(unmatricize((u * s) @ vh, weight.shape, self.scheme).to(weight.dtype))
            if self.config.nuclear_weight > 0:
                self._subgradients[name] = unmatricize(u @ vh, weight.shape, self.scheme).to(weight.dtype)
        return True

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Add λ·unmat(U_k V_kᵀ) to each target's gradient (only after a TRP iteration)."""
        for name, sub in self._subgradients.items():
            weight = self.layers[name].weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.add_(sub, alpha=self.config.nuclear_weight)
        self._subgradients = {}

    def final_rank(self, name: str) -> int:
        """The rank layer ``name`` gets at the end: #{σ >= τ}, or the energy rank if ``final_energy`` is set
        (a ValueError naming the layer if its weight holds NaN or Inf)."""
        self._check_dense("final_rank")
        self._check_finite("final_rank", [name])
        matrix = matricize(self.layers[name].weight.detach().double(), self.scheme)
        sigma = torch.linalg.svdvals(matrix)
        if self.config.final_energy is not None:
            return energy_rank(sigma, self.config.final_energy)
        return value_rank(sigma, self.config.final_threshold)

    def factorize(self) -> dict[str, dict[str, object]]:
        """Replace each target by its two-layer factorisation at :meth:`final_rank`, in place.

        Returns ``{name: {"rank": r, "factorized": bool}}``; a layer at or above break-even stays dense.
        Afterwards :attr:`layers` maps each target to the module now in the model (the pair, or the
        dense layer kept), and the training hooks refuse to run.

        All or nothing: every rank and every pair is computed first (a weight holding NaN or Inf is a
        ValueError naming the layer; a target that now carries a rankwise adapter is refused, see
        :func:`~rankwise.compress.lowrank_conv.check_not_adapted`), and only then are the layers swapped in,
        so a failed call leaves the model as it was and can be repeated.
        """
        self._check_dense("factorize")
        check_not_adapted(self.model, list(self.layers), "TRP.factorize")
        self._check_finite("factorize")
        report: dict[str, dict[str, object]] = {}
        pairs: dict[str, nn.Module] = {}
        for name, layer in self.layers.items():
            rank = self.final_rank(name)
            worth = rank < layer_break_even(layer.weight.shape, self.scheme)
            if worth:
                pairs[name] = factorize_layer(name, layer, rank, self.scheme)
            report[name] = {"rank": rank, "factorized": worth}
        for name, pair in pairs.items():
            set_submodule(self.model, name, pair)
            self.layers[name] = pair
        self.factorized = True
        return report
