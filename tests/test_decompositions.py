"""Decompositions of "Low-Rank Approximation, Adaptation, and Other Tales" (ALS, Hadamard, Kronecker, Khatri-Rao).

Oracles are independent numpy computations: Eckart–Young truncation, closed-form ridge and per-column
least-squares solves written as loops, the Van Loan–Pitsianis rearrangement written with explicit
index loops, np.kron, and the tail singular values of each rearranged matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.compress import (
    als_low_rank,
    hadamard_decomposition,
    khatri_rao,
    khatri_rao_decomposition,
    kronecker_decomposition,
)
from rankwise.compress.decompositions import _solve_spd

pytestmark = pytest.mark.usefixtures("one_thread")


def gapped_matrix(m: int = 40, n: int = 30, seed: int = 0) -> np.ndarray:
    """A matrix with singular values 10, 8, 6 then a gap down to 1 ... 0.1 (so rank 3 is well separated)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    sigma = np.concatenate([[10.0, 8.0, 6.0], np.linspace(1.0, 0.1, k - 3)])
    return (u[:, :k] * sigma) @ v[:, :k].T


def truncation(a: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def non_increasing(history: list[float]) -> bool:
    h = np.asarray(history)
    return bool(np.all(h[1:] <= h[:-1] * (1 + 1e-12) + 1e-300))


# ----------------------------------------------------------------------------------------------
# ALS
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["svd", "random"])
def test_als_full_data_converges_to_truncated_svd(init: str) -> None:
    a = gapped_matrix()
    w, z, info = als_low_rank(torch.tensor(a), 3, init=init, tol=1e-14, max_iter=200, seed=3)
    assert w.shape == (40, 3) and z.shape == (3, 30) and w.dtype == torch.float64
    np.testing.assert_allclose((w @ z).numpy(), truncation(a, 3), atol=1e-6)
    sigma = np.linalg.svd(a, compute_uv=False)
    assert info.converged
    assert info.residual == pytest.approx(np.sqrt((sigma[3:] ** 2).sum()) / np.linalg.norm(a), rel=1e-6)
    assert non_increasing(info.history)


def test_als_keeps_float32() -> None:
    a = torch.tensor(gapped_matrix(), dtype=torch.float32)
    w, z, _ = als_low_rank(a, 2)
    assert w.dtype == z.dtype == torch.float32
    np.testing.assert_allclose((w @ z).double().numpy(), truncation(a.double().numpy(), 2), atol=1e-4)


def test_als_ridge_one_step_is_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((12, 9))
    w0, z0 = rng.standard_normal((12, 4)), rng.standard_normal((4, 9))
    lam_w, lam_z = 0.3, 0.7
    w, z, info = als_low_rank(torch.tensor(a), 4, ridge=(lam_w, lam_z), init=(torch.tensor(w0), torch.tensor(z0)), max_iter=1)
    z1 = np.linalg.solve(w0.T @ w0 + lam_z * np.eye(4), w0.T @ a)
    w1 = np.linalg.solve(z1 @ z1.T + lam_w * np.eye(4), z1 @ a.T).T
    np.testing.assert_allclose(z.numpy(), z1, atol=1e-10)
    np.testing.assert_allclose(w.numpy(), w1, atol=1e-10)
    assert info.iterations == 1

    def objective(w_: np.ndarray, z_: np.ndarray) -> float:
        return np.sum((a - w_ @ z_) ** 2) + lam_w * np.sum(w_**2) + lam_z * np.sum(z_**2)

    assert info.history == pytest.approx([objective(w0, z0), objective(w1, z1)], rel=1e-10)


def test_masked_als_one_step_is_the_per_column_solve() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((10, 8))
    observed = rng.random((10, 8)) < 0.7
    observed[np.arange(8), np.arange(8)] = True  # every row and column observed somewhere
    w0 = rng.standard_normal((10, 3))
    lam = 0.1
    w, z, _ = als_low_rank(torch.tensor(a), 3, ridge=lam, mask=torch.tensor(observed),
                           init=(torch.tensor(w0), torch.zeros(3, 8, dtype=torch.float64)), max_iter=1)
    z1 = np.zeros((3, 8))
    for j in range(8):
        rows = observed[:, j]
        z1[:, j] = np.linalg.solve(w0[rows].T @ w0[rows] + lam * np.eye(3), w0[rows].T @ a[rows, j])
    w1 = np.zeros((10, 3))
    for i in range(10):
        cols = observed[i]
        w1[i] = np.linalg.solve(z1[:, cols] @ z1[:, cols].T + lam * np.eye(3), z1[:, cols] @ a[i, cols])
    np.testing.assert_allclose(z.numpy(), z1, atol=1e-10)
    np.testing.assert_allclose(w.numpy(), w1, atol=1e-10)


def test_masked_als_recovers_a_low_rank_matrix() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))
    observed = rng.random(x.shape) < 0.6
    a = np.where(observed, x, np.nan)  # unobserved entries are never read
    w, z, info = als_low_rank(torch.tensor(a), 3, mask=torch.tensor(observed), max_iter=500)
    assert np.linalg.norm((w @ z).numpy() - x) / np.linalg.norm(x) < 1e-6
    assert info.converged and info.residual < 1e-6
    assert non_increasing(info.history)


def test_masked_als_from_random_init_is_monotone() -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal((20, 15))
    observed = rng.random(a.shape) < 0.6
    _, _, info = als_low_rank(torch.tensor(a), 4, mask=torch.tensor(observed), init="random", max_iter=30, tol=0.0)
    assert info.iterations == 30 and not info.converged
    assert non_increasing(info.history)


def test_als_rank_deficient_data_warns_and_stays_finite() -> None:
    rng = np.random.default_rng(6)
    a = rng.standard_normal((15, 2)) @ rng.standard_normal((2, 12))  # rank 2 < K = 3: singular WᵀW
    with pytest.warns(RuntimeWarning, match="singular"):
        w, z, info = als_low_rank(torch.tensor(a), 3)
    assert torch.isfinite(w).all() and torch.isfinite(z).all() and info.jittered > 0
    assert np.linalg.norm((w @ z).numpy() - a) / np.linalg.norm(a) < 1e-6


def test_singular_normal_equations_get_the_documented_jitter_and_regular_ones_none() -> None:
    """A batch of two systems: the singular one (rank 2, K = 3) is solved with G + 1e-8·trace(G)/K·I, the
    regular one exactly (numpy oracle); the count says one system was jittered."""
    rng = np.random.default_rng(8)
    b = rng.standard_normal((3, 2))
    singular, regular = b @ b.T, np.eye(3) * 2.0 + 0.1
    rhs = rng.standard_normal((2, 3, 4))
    x, count = _solve_spd(torch.tensor(np.stack([singular, regular])), torch.tensor(rhs))
    assert count == 1
    jittered = singular + 1e-8 * np.trace(singular) / 3 * np.eye(3)
    np.testing.assert_allclose(x[0].numpy(), np.linalg.solve(jittered, rhs[0]), rtol=1e-6)
    np.testing.assert_allclose(x[1].numpy(), np.linalg.solve(regular, rhs[1]), rtol=1e-12)


def test_als_bad_inputs() -> None:
    a = torch.randn(6, 5, dtype=torch.float64)
    full = torch.ones(6, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        als_low_rank(a, 5)
    with pytest.raises(ValueError, match="rank"):
        als_low_rank(a, 0)
    missing_row = full.clone()
    missing_row[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        als_low_rank(a, 2, mask=missing_row)
    missing_column = full.clone()
    missing_column[:, 4] = False
    with pytest.raises(ValueError, match=r"columns \[4\]"):
        als_low_rank(a, 2, mask=missing_column)
    with pytest.raises(ValueError, match=r"mask must be a tensor of A's shape \(6, 5\)"):
        als_low_rank(a, 2, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="float16"):
        als_low_rank(a.half(), 2)
    with pytest.raises(ValueError, match="2-D"):
        als_low_rank(a[0], 2)
    with_nan = a.clone()
    with_nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        als_low_rank(with_nan, 2)
    with pytest.raises(ValueError, match="ridge"):
        als_low_rank(a, 2, ridge=-1.0)
    with pytest.raises(ValueError, match="init"):
        als_low_rank(a, 2, init="nope")
    with pytest.raises(ValueError, match=r"\(6, 2\) and \(2, 5\)"):
        als_low_rank(a, 2, init=(torch.zeros(6, 3), torch.zeros(3, 5)))
    # audit 3: these used to return NaN factors behind a misleading "numerically singular" warning
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"init factor\(s\) \['W0'\] have NaN or inf"):
            als_low_rank(a, 2, init=(torch.full((6, 2), bad, dtype=a.dtype), torch.ones(2, 5, dtype=a.dtype)))
        with pytest.raises(ValueError, match=r"init factor\(s\) \['Z0'\] have NaN or inf"):
            als_low_rank(a, 2, init=(torch.ones(6, 2, dtype=a.dtype), torch.full((2, 5), bad, dtype=a.dtype)))
    for ridge in (float("inf"), (0.0, float("inf")), (float("inf"), 1.0), float("nan")):
        with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
            als_low_rank(a, 2, ridge=ridge)
    for seed in (1.5, "0", None):
        with pytest.raises(ValueError, match="seed must be an integer"):
            als_low_rank(a, 2, init="random", seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer"):
        hadamard_decomposition(a, (1, 1), seed=2.0)


# ----------------------------------------------------------------------------------------------
# Kronecker
# ----------------------------------------------------------------------------------------------


def rearranged(a: np.ndarray, m1: int, n1: int, m2: int, n2: int) -> np.ndarray:
    """Van Loan–Pitsianis R(A), written with explicit loops: row (i1, j1), column (i2, j2)."""
    r = np.zeros((m1 * n1, m2 * n2))
    for i1 in range(m1):
        for j1 in range(n1):
            block = a[i1 * m2:(i1 + 1) * m2, j1 * n2:(j1 + 1) * n2]
            r[i1 * n1 + j1] = block.reshape(-1)
    return r


def test_kronecker_recovers_an_exact_product() -> None:
    rng = np.random.default_rng(7)
    b0, c0 = rng.standard_normal((3, 4)), rng.standard_normal((5, 2))
    a = np.kron(b0, c0)
    b, c = kronecker_decomposition(torch.tensor(a), (3, 4), (5, 2))
    assert b.shape == (1, 3, 4) and c.shape == (1, 5, 2)
    np.testing.assert_allclose(np.kron(b[0].numpy(), c[0].numpy()), a, atol=1e-12)
    np.testing.assert_allclose(torch.kron(b[0], c[0]).numpy(), a, atol=1e-12)


def test_kronecker_two_terms_recover_a_sum() -> None:
    rng = np.random.default_rng(8)
    a = sum(np.kron(rng.standard_normal((2, 3)), rng.standard_normal((4, 5))) for _ in range(2))
    b, c = kronecker_decomposition(torch.tensor(a), (2, 3), (4, 5), terms=2)
    np.testing.assert_allclose(sum(np.kron(b[k].numpy(), c[k].numpy()) for k in range(2)), a, atol=1e-12)


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_kronecker_residual_is_the_tail_of_the_rearranged_spectrum(terms: int) -> None:
    rng = np.random.default_rng(9)
    a = rng.standard_normal((15, 8))
    b, c = kronecker_decomposition(torch.tensor(a), (3, 4), (5, 2), terms=terms)
    approx = sum(torch.kron(b[k], c[k]) for k in range(terms)).numpy()
    sigma = np.linalg.svd(rearranged(a, 3, 4, 5, 2), compute_uv=False)
    assert np.linalg.norm(a - approx) ** 2 == pytest.approx((sigma[terms:] ** 2).sum(), rel=1e-10)


def test_kronecker_bad_shapes() -> None:
    a = torch.randn(15, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape_b \(3, 4\).*shape_c \(4, 2\).*A is 15 x 8"):
        kronecker_decomposition(a, (3, 4), (4, 2))
    with pytest.raises(ValueError, match="terms"):
        kronecker_decomposition(a, (3, 4), (5, 2), terms=11)
    with pytest.raises(ValueError, match="shape_c"):
        kronecker_decomposition(a, (3, 4), (5, 0))


# ----------------------------------------------------------------------------------------------
# Khatri-Rao
# ----------------------------------------------------------------------------------------------


def khatri_rao_loop(*factors: np.ndarray) -> np.ndarray:
    columns = []
    for j in range(factors[0].shape[1]):
        column = factors[0][:, j]
        for f in factors[1:]:
            column = np.kron(column, f[:, j])
        columns.append(column)
    return np.stack(columns, axis=1)


def test_khatri_rao_is_the_column_wise_kronecker_product() -> None:
    rng = np.random.default_rng(10)
    b, c, d = rng.standard_normal((3, 6)), rng.standard_normal((4, 6)), rng.standard_normal((2, 6))
    np.testing.assert_allclose(khatri_rao(torch.tensor(b), torch.tensor(c)).numpy(), khatri_rao_loop(b, c), atol=1e-14)
    np.testing.assert_allclose(khatri_rao(torch.tensor(b), torch.tensor(c), torch.tensor(d)).numpy(),
                               khatri_rao_loop(b, c, d), atol=1e-14)
    with pytest.raises(ValueError, match=r"same number of columns.*\(3, 6\), \(4, 5\)"):
        khatri_rao(torch.tensor(b), torch.tensor(c[:, :5]))


def test_khatri_rao_decomposition_recovers_an_exact_product() -> None:
    rng = np.random.default_rng(11)
    b0, c0 = rng.standard_normal((4, 7)), rng.standard_normal((3, 7))
    a = khatri_rao_loop(b0, c0)
    b, c = khatri_rao_decomposition(torch.tensor(a), (4, 3))
    assert b.shape == (4, 7) and c.shape == (3, 7)
    np.testing.assert_allclose(khatri_rao_loop(b.numpy(), c.numpy()), a, atol=1e-12)


def test_khatri_rao_column_errors_are_the_tail_singular_values() -> None:
    rng = np.random.default_rng(12)
    a = rng.standard_normal((12, 5))
    b, c = khatri_rao_decomposition(torch.tensor(a, dtype=torch.float32), (3, 4))
    assert b.dtype == torch.float32
    approx = khatri_rao_loop(b.double().numpy(), c.double().numpy())
    for j in range(5):
        sigma = np.linalg.svd(a[:, j].reshape(3, 4), compute_uv=False)
        assert np.sum((a[:, j] - approx[:, j]) ** 2) == pytest.approx(np.sum(sigma[1:] ** 2), rel=1e-4)


def test_khatri_rao_decomposition_bad_rows() -> None:
    with pytest.raises(ValueError, match=r"\(3, 5\) give P·Q = 15 rows, but A is 16 x 7"):
        khatri_rao_decomposition(torch.randn(16, 7), (3, 5))


# ----------------------------------------------------------------------------------------------
# Hadamard
# ----------------------------------------------------------------------------------------------


def hadamard_target(m: int, n: int, k1: int, k2: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c1, d1 = rng.standard_normal((m, k1)), rng.standard_normal((k1, n))
    c2, d2 = rng.standard_normal((m, k2)), rng.standard_normal((k2, n))
    return (c1 @ d1) * (c2 @ d2)


def test_hadamard_recovers_an_exact_product() -> None:
    a = hadamard_target(40, 30, 2, 2, seed=7)
    c1, d1, c2, d2, info = hadamard_decomposition(torch.tensor(a), (2, 2), seed=0)
    assert (c1.shape, d1.shape, c2.shape, d2.shape) == ((40, 2), (2, 30), (40, 2), (2, 30))
    product = (c1.numpy() @ d1.numpy()) * (c2.numpy() @ d2.numpy())
    assert np.linalg.norm(product - a) / np.linalg.norm(a) < 1e-3
    assert info.residual == pytest.approx(np.linalg.norm(product - a) / np.linalg.norm(a), rel=1e-6, abs=1e-12)
    assert non_increasing(info.history)
    assert np.linalg.matrix_rank(product) <= 4


def test_hadamard_rank_bound_and_monotone_on_a_generic_matrix() -> None:
    a = np.random.default_rng(13).standard_normal((20, 16))
    c1, d1, c2, d2, info = hadamard_decomposition(torch.tensor(a), (2, 3), seed=1, max_iter=40)
    product = (c1.numpy() @ d1.numpy()) * (c2.numpy() @ d2.numpy())
    assert np.linalg.matrix_rank(product) <= 6
    assert non_increasing(info.history)
    assert info.residual < 1.0


def test_hadamard_restarts_keep_the_best_seed() -> None:
    a = torch.tensor(hadamard_target(24, 20, 2, 2, seed=7))
    singles = [hadamard_decomposition(a, (2, 2), seed=s, max_iter=20)[-1].objective for s in (4, 5, 6)]
    best = hadamard_decomposition(a, (2, 2), seed=4, max_iter=20, restarts=3)[-1]
    assert best.objective == pytest.approx(min(singles), rel=1e-12)


def test_hadamard_bad_ranks() -> None:
    a = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="K2 must be an integer"):
        hadamard_decomposition(a, (2, 5))
    with pytest.raises(ValueError, match="ranks must be a pair"):
        hadamard_decomposition(a, (2,))
    with pytest.raises(ValueError, match="restarts"):
        hadamard_decomposition(a, (2, 2), restarts=0)
