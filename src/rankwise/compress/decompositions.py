"""Matrix decompositions of "Low-Rank Approximation, Adaptation, and Other Tales" (Jun Lu, arXiv 2408.05883).

Plain functions on a matrix ``A`` (M x N, float32 or float64; every computation runs in float64 and
the factors come back in A's dtype and device, detached from autograd):

* :func:`als_low_rank` -- ``A ≈ W Z`` (W: M x K, Z: K x N) by alternating least squares on
  ``‖P_Ω(A - W Z)‖_F² + λ_w ‖W‖_F² + λ_z ‖Z‖_F²`` (Ω: the observed entries, all of them by
  default). Z-step ``Z = (WᵀW + λ_z I)⁻¹ Wᵀ A``, W-step ``W = A Zᵀ (Z Zᵀ + λ_w I)⁻¹``; with a mask
  every column z_j (row w_i) solves its own normal equations over the observed rows (columns) only,
  ``(Wᵀ D_j W + λ_z I) z_j = Wᵀ D_j a_j`` with ``D_j = diag(Ω[:, j])`` -- all of them at once as one
  batched Cholesky solve. With λ = 0 and full data the fixed point is the rank-K truncated SVD
  (Eckart–Young, 1936): ``‖A - W Z‖_F² = Σ_{i>K} σ_i²``. Parameters: K (M + N).
* :func:`hadamard_decomposition` -- ``A ≈ (C1 D1) ∘ (C2 D2)`` (∘ elementwise; C_i: M x K_i,
  D_i: K_i x N). No closed form and non-convex; the model is linear in each factor when the other
  three are fixed, so each of the four factors in turn is the exact least-squares solution, e.g.
  row i of C1 from ``A[i, :] ≈ C1[i, :] (D1 ∘ H2[i, :])`` with ``H2 = C2 D2``: normal equations
  ``D1 diag(H2[i, :]²) D1ᵀ c = D1 (H2[i, :] ∘ A[i, :])``. rank((C1 D1) ∘ (C2 D2)) ≤ K1 K2.
  The result depends on the seed (local minima, measured in the function's docstring): read
  ``info.residual``, and keep the best of several seeds with ``restarts``. Parameters: (K1 + K2)(M + N).
* :func:`kronecker_decomposition` -- ``A ≈ Σ_k B_k ⊗ C_k`` (B_k: M1 x N1, C_k: M2 x N2,
  M = M1 M2, N = N1 N2) in closed form by the rearrangement of Van Loan & Pitsianis ("Approximation
  with Kronecker products", 1993): ``R(A)[(i1, j1), (i2, j2)] = A[i1 M2 + i2, j1 N2 + j2]`` is an
  M1N1 x M2N2 matrix, ``R(B ⊗ C) = vec(B) vec(C)ᵀ``, and R is an isometry, so the best sum of
  ``terms`` Kronecker products is the best rank-``terms`` approximation of R(A); its error is
  ``‖A - Σ_k B_k ⊗ C_k‖_F² = Σ_{i>terms} σ_i(R(A))²``. Parameters: M1N1 + M2N2 per term.
* :func:`khatri_rao_decomposition` -- ``A ≈ B ⊙ C`` (column-wise Kronecker product; B: P x N,
  C: Q x N, M = P Q): column j is ``a_j ≈ b_j ⊗ c_j``, i.e. a_j reshaped to P x Q is
  ``b_j c_jᵀ``, so each column is independently the best rank-1 approximation of its reshape (one
  batched SVD over the columns); the error of column j is ``Σ_{i>1} σ_i(reshape(a_j))²``.
  Parameters: N (P + Q).
* :func:`khatri_rao` -- the product ``B ⊙ C`` itself (torch has ``torch.kron`` but no Khatri-Rao).

Factor splits are balanced (``√σ`` on each side), so both factors have equal norms; the factors are
identifiable only up to that scale and sign (and, for ALS, up to an invertible K x K map), so compare
products, not factors.

What is settled and what is not (spec ``methods/lowrank_tales.md``; only the abstract and first
page of the survey could be read, the rest comes from secondary summaries). Settled: the topics
(ALS, Hadamard, Kronecker and Khatri-Rao decompositions, the missing-data case of ALS) and the ALS
updates above, which are standard. Not confirmed from the survey's text: its exact update rules,
initialisation and stopping rule for the special-product decompositions, and whether it gives ridge
or missing-data variants of them. A summary says the survey fits the Kronecker decomposition by
alternating block least squares; rankwise uses the Van Loan–Pitsianis closed form instead, which
is the global optimum such an iteration can at best reach. The per-column Khatri-Rao solve and the
per-factor Hadamard ALS are our choices of exact solvers for the stated models (the spec allows
gradient steps or ALS for Hadamard; ALS needs no learning rate). The survey's new adapter LoKH is
not here: its definition is not settled (spec Sec. 2.5).

Our choices, documented rather than taken from the survey: SVD initialisation by default (with a
mask: the SVD of the zero-filled matrix divided by the observed fraction, the classic
matrix-completion start); a stop when the relative change of the objective falls below ``tol`` or
the fit is exact to 1e-12 relative; numerically singular normal equations (rank-deficient data,
too few observed entries in a row or column, no ridge) get a jitter ``1e-8 · trace(G) / K · I``
and one warning per call instead of NaNs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

_JITTER = 1e-8  # relative to the mean diagonal of a singular Gram matrix (spec Sec. 4)
_SINGULAR = 1e-13  # smallest Cholesky pivot² / largest diagonal entry before a system counts as singular
_EXACT = 1e-24  # objective / ‖P_Ω A‖² below which the fit counts as exact (relative residual 1e-12)


@dataclass
class FitInfo:
    """How an iterative fit ended.

    ``history`` holds the objective at the initial factors, then after each iteration; ``residual``
    is the relative error ``‖P_Ω(A - Â)‖_F / ‖P_Ω A‖_F`` of the returned factors; ``jittered`` counts
    the normal-equation solves that were singular and got a jitter.
    """

    iterations: int
    converged: bool
    residual: float
    history: list[float] = field(default_factory=list)
    jittered: int = 0

    @property
    def objective(self) -> float:
        """The final value of the objective."""
        return self.history[-1]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _matrix(A: Tensor, caller: str) -> Tensor:
    """A as a detached float64 matrix, after checking its type, shape and dtype."""
    if not isinstance(A, Tensor) or A.ndim != 2 or A.numel() == 0:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"{caller}: A must be a non-empty 2-D tensor (M x N), got {shape}")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{caller}: A has dtype {A.dtype}; pass float32 or float64 (e.g. A.float()), "
                         "half precision is too coarse for these least-squares solves")
    return A.detach().to(torch.float64)


def _check_finite(a: Tensor, caller: str, where: str = "") -> None:
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{caller}: A has NaN or inf{where}; clean the matrix (or mask those entries out)")


def _check_rank(rank: int, m: int, n: int, caller: str, name: str = "rank") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < min(m, n):
        raise ValueError(f"{caller}: {name} must be an integer in [1, {min(m, n) - 1}] for a {m} x {n} matrix, got {rank!r}; "
                         f"a rank >= min(M, N) = {min(m, n)} is no low-rank approximation")


def _check_loop(tol: float, max_iter: int, caller: str) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{caller}: max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"{caller}: tol must be a number >= 0, got {tol!r}")


def _pair(value: Sequence[int], caller: str, name: str) -> tuple[int, int]:
    if (not isinstance(value, Sequence) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"{caller}: {name} must be a pair of positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _ridges(ridge: float | tuple[float, float]) -> tuple[float, float]:
    """(λ_w, λ_z) from one number or a pair; each finite and >= 0 (an infinite ridge makes the normal
    equations ``inf · I`` and the factors NaN)."""
    pair = tuple(ridge) if isinstance(ridge, (tuple, list)) else (ridge, ridge)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf
                             for v in pair):
        raise ValueError(f"als_low_rank: ridge must be a finite number >= 0 or a pair (λ_w, λ_z) of them, got {ridge!r}")
    return float(pair[0]), float(pair[1])


def _observed(mask: Tensor | None, a: Tensor) -> Tensor | None:
    """The mask as a float64 0/1 matrix on A's device; every row and column needs an observed entry."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(a.shape):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"als_low_rank: mask must be a tensor of A's shape {tuple(a.shape)} "
                         f"(True/1 = observed), got {shape}")
    observed = (mask.detach().to(a.device) != 0).to(torch.float64)
    for axis, name in ((1, "row"), (0, "column")):
        empty = (observed.sum(axis) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"als_low_rank: {name}s {empty[:10]}{'...' if len(empty) > 10 else ''} of the "
                             f"{a.shape[0]} x {a.shape[1]} mask have no observed entry, so their factors are undetermined; "
                             f"drop those {name}s or observe at least one entry in each")
    return observed


# ----------------------------------------------------------------------------------------------
# Least squares
# ----------------------------------------------------------------------------------------------


def _solve_spd(gram: Tensor, rhs: Tensor) -> tuple[Tensor, int]:
    """x with ``gram x = rhs`` for symmetric PSD ``gram`` (..., K, K), rhs (..., K, C).

    Systems whose Cholesky fails or has a pivot² below ``_SINGULAR`` times the largest diagonal entry
    get ``1e-8 · trace / K`` added to the diagonal. Returns x and how many systems needed it.
    """
    k = gram.shape[-1]
    factor, info = torch.linalg.cholesky_ex(gram)
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square().amin(-1)
    singular = (info > 0) | ~(pivots > _SINGULAR * diagonal.amax(-1))
    count = int(singular.sum())
    if count:
        mean = diagonal.sum(-1) / k
        jitter = _JITTER * torch.where(mean > 0, mean, torch.ones_like(mean)) * singular
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        factor, _ = torch.linalg.cholesky_ex(gram + jitter[..., None, None] * eye)
    return torch.cholesky_solve(rhs, factor), count


def _row_solve(basis: Tensor, weights: Tensor | None, weighted_target: Tensor, ridge: float) -> tuple[Tensor, int]:
    """Rows x_i (R x K) minimising ``Σ_n w_in (t_in - x_i · basis[:, n])² + ridge ‖x_i‖²``.

    ``basis`` is K x N, ``weights`` R x N (None: all ones, one shared Gram matrix) and
    ``weighted_target`` the product ``w ∘ t`` (R x N). Normal equations of row i:
    ``(basis diag(w_i) basisᵀ + ridge I) x_i = basis (w_i ∘ t_i)``, solved for all rows at once.
    """
    k = basis.shape[0]
    eye = torch.eye(k, dtype=basis.dtype, device=basis.device)
    if weights is None:
        solution, count = _solve_spd(basis @ basis.T + ridge * eye, basis @ weighted_target.T)
        return solution.T, count
    outer = (basis[:, None, :] * basis[None, :, :]).reshape(k * k, -1)  # (K², N): basis[k, n] basis[l, n]
    gram = (weights @ outer.T).reshape(-1, k, k) + ridge * eye
    solution, count = _solve_spd(gram, (weighted_target @ basis.T)[..., None])
    return solution[..., 0], count


def _converged(previous: float, current: float, tol: float, exact: float) -> bool:
    """Relative change of the objective below tol, or an exact fit."""
    return current <= exact or abs(previous - current) <= tol * max(previous, exact)


def _generator(seed: int, caller: str) -> torch.Generator:
    """A CPU generator seeded with ``seed``; ValueError (bad input, like every other argument) for a non-integer."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{caller}: seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _jitter_warning(caller: str, count: int) -> None:
    if count:
        warnings.warn(f"{caller}: {count} normal-equation solves were numerically singular (rank-deficient data or "
                      "factors, or too few observed entries for the rank); added a jitter 1e-8·trace/K. "
                      "Pass ridge > 0 or a smaller rank to regularise explicitly.", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# ALS low-rank approximation
# ----------------------------------------------------------------------------------------------


def _svd_factors(a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-K truncated SVD of a, split ``U √S`` and ``√S Vᵀ``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _als_init(a: Tensor, observed: Tensor | None, rank: int, init: str | tuple[Tensor, Tensor],
              seed: int) -> tuple[Tensor, Tensor]:
    m, n = a.shape
    generator = _generator(seed, "als_low_rank")
    if isinstance(init, (tuple, list)):
        if (len(init) != 2 or not all(isinstance(t, Tensor) for t in init)
                or tuple(init[0].shape) != (m, rank) or tuple(init[1].shape) != (rank, n)):
            shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in init]
            raise ValueError(f"als_low_rank: init factors must be tensors of shapes {(m, rank)} and {(rank, n)}, got {shapes}")
        factors = tuple(t.detach().to(device=a.device, dtype=torch.float64) for t in init)
        # A NaN / inf factor poisons every solve (the result was NaN factors behind a "singular" warning).
        bad = [name for name, t in zip(("W0", "Z0"), factors) if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"als_low_rank: the init factor(s) {bad} have NaN or inf entries; pass finite factors "
                             "or init='svd' / 'random'")
        return factors  # type: ignore[return-value]
    if init == "svd":
        filled = a if observed is None else a / observed.mean()
        return _svd_factors(filled, rank)
    if init == "random":
        observed_norm = a.norm() / math.sqrt(a.numel() if observed is None else float(observed.sum()))
        scale = math.sqrt(float(observed_norm) / math.sqrt(rank)) or 1.0
        w = torch.randn(m, rank, generator=generator, dtype=torch.float64) * scale
        z = torch.randn(rank, n, generator=generator, dtype=torch.float64) * scale
        return w.to(a.device), z.to(a.device)
    raise ValueError(f"als_low_rank: init must be 'svd', 'random' or a pair (W0, Z0) of tensors, got {init!r}")


def als_low_rank(
    A: Tensor,
    rank: int,
    *,
    ridge: float | tuple[float, float] = 0.0,
    mask: Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    init: str | tuple[Tensor, Tensor] = "svd",
) -> tuple[Tensor, Tensor, FitInfo]:
    """Rank-K factors ``A ≈ W Z`` by alternating least squares (survey Sec. on ALS; Eckart–Young).

    Minimises ``‖P_Ω(A - W Z)‖_F² + λ_w ‖W‖_F² + λ_z ‖Z‖_F²``, alternating the exact Z-step
    ``Z = (WᵀW + λ_z I)⁻¹ Wᵀ A`` and W-step ``W = A Zᵀ (Z Zᵀ + λ_w I)⁻¹`` (with a mask: one small
    system per column / row over its observed entries, solved as a batch). The objective never
    increases. Stops when its relative change is below ``tol`` (the product is then off its fixed
    point by about √tol times the residual, so use a small tol for tight factors) or the fit is exact.

    Args:
        A: the M x N matrix (float32/float64). With a mask, unobserved entries are ignored (may be NaN).
        rank: K, 1 <= K < min(M, N).
        ridge: λ for both factors, or a pair (λ_w, λ_z); finite and >= 0.
        mask: M x N, True/1 where A is observed; every row and column needs one observed entry.
        tol: stop when ``|f_{t-1} - f_t| <= tol · f_{t-1}``.
        max_iter: at most this many (Z-step, W-step) sweeps.
        seed: an integer; seeds ``init="random"``.
        init: ``"svd"`` (truncated SVD of A; with a mask of the zero-filled A divided by the observed
            fraction), ``"random"`` (Gaussian) or explicit finite factors ``(W0, Z0)``. Z0 only enters
            ``info.history[0]``: the first step recomputes Z from W0.

    Returns:
        W (M x K), Z (K x N) in A's dtype and device, and a :class:`FitInfo`.
    """
    caller = "als_low_rank"
    a = _matrix(A, caller)
    m, n = a.shape
    _check_rank(rank, m, n, caller)
    ridge_w, ridge_z = _ridges(ridge)
    _check_loop(tol, max_iter, caller)
    observed = _observed(mask, a)
    if observed is not None:
        a = torch.where(observed > 0, a, torch.zeros_like(a))
    _check_finite(a, caller, "" if observed is None else " at observed entries")
    w, z = _als_init(a, observed, rank, init, seed)
    observed_t = None if observed is None else observed.T.contiguous()
    target_t = a.T.contiguous()  # a is already zero where unobserved, so it is P_Ω(A) = Ω ∘ A

    def objective(w: Tensor, z: Tensor) -> float:
        error = a - w @ z
        if observed is not None:
            error = error * observed
        return float(error.square().sum() + ridge_w * w.square().sum() + ridge_z * z.square().sum())

    exact = _EXACT * float(a.square().sum())
    history = [objective(w, z)]
    jittered, converged = 0, False
    for _ in range(max_iter):
        z_t, count_z = _row_solve(w.T, observed_t, target_t, ridge_z)
        z = z_t.T
        w, count_w = _row_solve(z, observed, a, ridge_w)
        jittered += count_z + count_w
        history.append(objective(w, z))
        if _converged(history[-2], history[-1], tol, exact):
            converged = True
            break
    error = a - w @ z
    if observed is not None:
        error = error * observed
    norm = float(a.norm())
    residual = float(error.norm()) / norm if norm > 0 else 0.0
    _jitter_warning(caller, jittered)
    info = FitInfo(len(history) - 1, converged, residual, history, jittered)
    return w.to(A.dtype), z.to(A.dtype), info


# ----------------------------------------------------------------------------------------------
# Hadamard decomposition
# ----------------------------------------------------------------------------------------------


def _rebalance(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Scale column k of left and row k of right to equal norms (the product is unchanged)."""
    left_norm = left.norm(dim=0)
    right_norm = right.norm(dim=1)
    ok = (left_norm > 0) & (right_norm > 0)
    scale = torch.where(ok, (right_norm / torch.where(ok, left_norm, 1.0)).sqrt(), torch.ones_like(left_norm))
    return left * scale, right / scale[:, None]


def _update_pair(a: Tensor, left: Tensor, right: Tensor, other: Tensor) -> tuple[Tensor, Tensor, int]:
    """Exact least-squares updates of C then D in ``A ≈ (C D) ∘ H`` with H = ``other`` fixed."""
    weights = other.square()
    weighted = other * a
    left, count_left = _row_solve(right, weights, weighted, 0.0)  # row i: D diag(H_i²) Dᵀ c = D (H_i ∘ a_i)
    right_t, count_right = _row_solve(left.T, weights.T.contiguous(), weighted.T.contiguous(), 0.0)
    return left, right_t.T, count_left + count_right


def _hadamard_fit(a: Tensor, k1: int, k2: int, max_iter: int, tol: float, seed: int) -> tuple[list[Tensor], FitInfo]:
    """One ALS run of the Hadamard model from Gaussian factors drawn with ``seed``."""
    m, n = a.shape
    generator = _generator(seed, "hadamard_decomposition")
    # Gaussian factors with (C1 D1) ∘ (C2 D2) of A's entry scale: each entry of C_i D_i ~ s² √K_i.
    rms = float(a.norm()) / math.sqrt(a.numel())
    scale = (rms / math.sqrt(k1 * k2)) ** 0.25 or 1.0
    c1, d1, c2, d2 = (torch.randn(*shape, generator=generator, dtype=torch.float64).to(a.device) * scale
                      for shape in ((m, k1), (k1, n), (m, k2), (k2, n)))

    def objective() -> float:
        return float((a - (c1 @ d1) * (c2 @ d2)).square().sum())

    exact = _EXACT * float(a.square().sum())
    history = [objective()]
    jittered, converged = 0, False
    for _ in range(max_iter):
        c1, d1, count_1 = _update_pair(a, c1, d1, c2 @ d2)
        c2, d2, count_2 = _update_pair(a, c2, d2, c1 @ d1)
        c1, d1 = _rebalance(c1, d1)
        c2, d2 = _rebalance(c2, d2)
        balance = math.sqrt(float((c2 @ d2).norm()) / max(float((c1 @ d1).norm()), 1e-300))
        if 0 < balance < math.inf:  # equal norms of C1 D1 and C2 D2, split over both factors of each
            root = math.sqrt(balance)
            c1, d1, c2, d2 = c1 * root, d1 * root, c2 / root, d2 / root
        jittered += count_1 + count_2
        history.append(objective())
        if _converged(history[-2], history[-1], tol, exact):
            converged = True
            break
    norm = float(a.norm())
    residual = math.sqrt(history[-1]) / norm if norm > 0 else 0.0
    return [c1, d1, c2, d2], FitInfo(len(history) - 1, converged, residual, history, jittered)


def hadamard_decomposition(
    A: Tensor,
    ranks: tuple[int, int],
    *,
    max_iter: int = 500,
    tol: float = 1e-10,
    seed: int = 0,
    restarts: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, FitInfo]:
    """Factors of ``A ≈ (C1 D1) ∘ (C2 D2)`` by alternating least squares over the four factors.

    Each factor in turn is the exact least-squares solution with the other three fixed (for C1, row i
    solves ``D1 diag(H2[i]²) D1ᵀ c = D1 (H2[i] ∘ A[i])`` with ``H2 = C2 D2``; D1, C2, D2 alike), so the
    objective ``‖A - (C1 D1) ∘ (C2 D2)‖_F²`` never increases. After each sweep the factors are
    rescaled (product unchanged) to keep them balanced. rank((C1 D1) ∘ (C2 D2)) ≤ K1 K2; parameters
    (K1 + K2)(M + N).

    The problem is non-convex and ALS often stalls far from an exact fit: the iterates drift towards
    factors of growing norm whose Hadamard product cancels (the objective then creeps down by tiny
    amounts), or stop at stationary points; L-BFGS on all four factors stalls too. Measured on exact
    products of Gaussian factors, 500 sweeps, seeds 0-5: 40 x 30 with ranks (2, 2) reached an exact
    fit from 5 of 6 seeds, 24 x 20 with (2, 2) from none (L-BFGS: 3 of 6), 30 x 25 with (2, 3) and
    64 x 48 with (3, 3) from none. Fixed or decaying damping and proximal terms did not change that
    picture. So read ``info.residual`` and use ``restarts`` to keep the best of several seeds; not
    every matrix has an exact low-rank Hadamard factorisation in the first place.

    Args:
        A: the M x N matrix (float32/float64).
        ranks: (K1, K2), each in [1, min(M, N) - 1].
        max_iter: at most this many sweeps over (C1, D1, C2, D2) per run.
        tol: stop a run when the relative change of the objective is below tol (or the fit is exact).
        seed: run j starts from Gaussian factors drawn with seed ``seed + j``.
        restarts: number of runs; the one with the smallest final objective is returned.

    Returns:
        C1 (M x K1), D1 (K1 x N), C2 (M x K2), D2 (K2 x N) in A's dtype and device, and the
        :class:`FitInfo` of the returned run.
    """
    caller = "hadamard_decomposition"
    a = _matrix(A, caller)
    _check_finite(a, caller)
    m, n = a.shape
    k1, k2 = _pair(ranks, caller, "ranks")
    _check_rank(k1, m, n, caller, "K1")
    _check_rank(k2, m, n, caller, "K2")
    _check_loop(tol, max_iter, caller)
    _generator(seed, caller)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"{caller}: restarts must be a positive integer, got {restarts!r}")
    best: tuple[list[Tensor], FitInfo] | None = None
    for run in range(restarts):
        factors, info = _hadamard_fit(a, k1, k2, max_iter, tol, seed + run)
        if best is None or info.objective < best[1].objective:
            best = (factors, info)
        if info.converged and info.objective <= _EXACT * float(a.square().sum()):
            break  # an exact fit cannot be beaten
    factors, info = best
    _jitter_warning(caller, info.jittered)
    c1, d1, c2, d2 = (f.to(A.dtype) for f in factors)
    return c1, d1, c2, d2, info


# ----------------------------------------------------------------------------------------------
# Kronecker and Khatri-Rao decompositions
# ----------------------------------------------------------------------------------------------


def kronecker_decomposition(
    A: Tensor,
    shape_b: tuple[int, int],
    shape_c: tuple[int, int],
    terms: int = 1,
) -> tuple[Tensor, Tensor]:
    """Nearest sum of Kronecker products ``A ≈ Σ_k B_k ⊗ C_k`` (Van Loan & Pitsianis, 1993).

    Rearranges A (M1M2 x N1N2) into ``R[(i1, j1), (i2, j2)] = A[i1 M2 + i2, j1 N2 + j2]`` (M1N1 x M2N2),
    where ``B ⊗ C`` becomes ``vec(B) vec(C)ᵀ``; the truncated SVD ``R ≈ Σ_k σ_k u_k v_kᵀ`` then gives
    ``vec(B_k) = √σ_k u_k`` and ``vec(C_k) = √σ_k v_k`` (row-major vec). Exact optimum:
    ``‖A - Σ_k B_k ⊗ C_k‖_F² = Σ_{i>terms} σ_i²``. Parameters: M1N1 + M2N2 per term.

    Returns:
        B (terms x M1 x N1) and C (terms x M2 x N2), stacked even for ``terms=1``, in A's dtype;
        rebuild with ``sum(torch.kron(b, c) for b, c in zip(B, C))``.
    """
    caller = "kronecker_decomposition"
    a = _matrix(A, caller)
    _check_finite(a, caller)
    m, n = a.shape
    (m1, n1), (m2, n2) = _pair(shape_b, caller, "shape_b"), _pair(shape_c, caller, "shape_c")
    if m1 * m2 != m or n1 * n2 != n:
        raise ValueError(f"{caller}: shape_b {(m1, n1)} ⊗ shape_c {(m2, n2)} gives a {m1 * m2} x {n1 * n2} matrix, "
                         f"but A is {m} x {n}; choose M1·M2 = {m} and N1·N2 = {n}")
    most = min(m1 * n1, m2 * n2)
    if isinstance(terms, bool) or not isinstance(terms, int) or not 0 < terms <= most:
        raise ValueError(f"{caller}: terms must be an integer in [1, {most}] (the rank limit of the "
                         f"{m1 * n1} x {m2 * n2} rearranged matrix), got {terms!r}")
    rearranged = a.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
    root = s[:terms].sqrt()
    b = (u[:, :terms] * root).T.reshape(terms, m1, n1)
    c = (root[:, None] * vh[:terms]).reshape(terms, m2, n2)
    return b.to(A.dtype), c.to(A.dtype)


def khatri_rao(B: Tensor, C: Tensor, *more: Tensor) -> Tensor:
    """Column-wise Kronecker product ``B ⊙ C``: column j is ``B[:, j] ⊗ C[:, j]``.

    B (P x N), C (Q x N) give a PQ x N matrix with ``(B ⊙ C)[p Q + q, j] = B[p, j] C[q, j]``; further
    factors chain left to right, ``B ⊙ C ⊙ D = (B ⊙ C) ⊙ D``.
    """
    factors = (B, C, *more)
    if not all(isinstance(f, Tensor) and f.ndim == 2 for f in factors) or len({f.shape[1] for f in factors}) != 1:
        shapes = [tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__ for f in factors]
        raise ValueError(f"khatri_rao: factors must be 2-D tensors with the same number of columns, got shapes {shapes}")
    product = B
    for factor in factors[1:]:
        product = (product[:, None, :] * factor[None, :, :]).reshape(-1, factor.shape[1])
    return product


def khatri_rao_decomposition(A: Tensor, rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Nearest Khatri-Rao product ``A ≈ B ⊙ C`` (B: P x N, C: Q x N, M = P Q), column by column.

    Column j reshaped (row-major) to P x Q is ``b_j c_jᵀ`` for an exact product, so its best
    approximation is the top singular pair of that reshape: ``b_j = √σ₁ u₁``, ``c_j = √σ₁ v₁``
    (one batched SVD over the N columns). Column j's error is ``Σ_{i>1} σ_i²`` of its reshape.
    Parameters: N (P + Q).

    Returns:
        B (P x N) and C (Q x N) in A's dtype and device.
    """
    caller = "khatri_rao_decomposition"
    a = _matrix(A, caller)
    _check_finite(a, caller)
    m, n = a.shape
    p, q = _pair(rows, caller, "rows")
    if p * q != m:
        raise ValueError(f"{caller}: rows (P, Q) = {(p, q)} give P·Q = {p * q} rows, but A is {m} x {n}; "
                         f"choose P and Q with P·Q = {m}")
    u, s, vh = torch.linalg.svd(a.T.reshape(n, p, q), full_matrices=False)
    root = s[:, :1].sqrt()
    b = (u[:, :, 0] * root).T
    c = (vh[:, 0, :] * root).T
    return b.to(A.dtype), c.to(A.dtype)


__all__ = [
    "FitInfo",
    "als_low_rank",
    "hadamard_decomposition",
    "khatri_rao",
    "khatri_rao_decomposition",
    "kronecker_decomposition",
]
