"""SURM oracles: independent dense references written from the matrix definitions (surm.md §2),
for every structure, square and rectangular (block-tiled) layers, float32 and float64, plus
gradcheck of every FFT path and the per-structure contract the method suite covers only for
the default structure."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters import surm
from rankwise.adapters.surm import SURMAdapter, SURMConfig

SHAPES = [(8, 8), (7, 7), (12, 8), (6, 9), (16, 24)]  # (out, in): square, odd, rectangular both ways
STRUCTURES = ["circulant", "toeplitz", "ldr", "kronecker"]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- dense references from the definitions --------------------------------------------------------


def circulant_col(v: torch.Tensor) -> torch.Tensor:
    """First column v; column s is v shifted down by s."""
    return torch.stack([torch.roll(v, s) for s in range(len(v))], dim=1)


def symmetric_toeplitz(v: torch.Tensor) -> torch.Tensor:
    g = len(v)
    return torch.stack([torch.stack([v[abs(t - s)] for s in range(g)]) for t in range(g)])


def skew_circulant(s: torch.Tensor) -> torch.Tensor:
    """First row s; each row is the one above shifted right by one, the wrapped entry negated."""
    rows = [s]
    for _ in range(len(s) - 1):
        rows.append(torch.cat([-rows[-1][-1:], rows[-1][:-1]]))
    return torch.stack(rows)


def tiled(block: Callable[[int, int], torch.Tensor], p: int, q: int) -> torch.Tensor:
    return torch.cat([torch.cat([block(i, j) for j in range(q)], dim=1) for i in range(p)], dim=0)


def reference_delta(adapter: SURMAdapter) -> torch.Tensor:
    """ΔW from the paper/official definitions (surm.md §2a–2d), built without the module's helpers."""
    alpha = adapter.alpha
    if adapter.structure == "kronecker":
        return alpha / adapter.r * torch.kron(adapter.surm_B, adapter.surm_A)
    if adapter.structure == "ldr":
        c, s = adapter.surm_c, adapter.surm_s
        p, q, k, _ = c.shape
        return alpha * tiled(lambda i, j: sum(circulant_col(c[i, j, h]) @ skew_circulant(s[i, j, h]).T
                                             for h in range(k)), p, q)
    a = adapter.surm_a
    p, q, _ = a.shape
    if adapter.structure == "toeplitz":
        b = adapter.surm_b
        return alpha * tiled(lambda i, j: symmetric_toeplitz(b[i, j]) @ symmetric_toeplitz(a[i, j]), p, q)
    kernel = a if adapter.surm_b is None else a * adapter.surm_b
    return alpha * tiled(lambda i, j: circulant_col(kernel[i, j]), p, q)


def make_layer(out_f: int, in_f: int, dtype: torch.dtype, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(in_f, out_f).to(dtype)), SURMConfig(**kwargs))
    with torch.no_grad():
        for parameter in model[0].adapter.parameters():
            parameter.normal_()
    return model[0]


def kwargs_for(structure: str, out_f: int, in_f: int) -> dict:
    if structure == "kronecker":
        return {"structure": structure, "r": max(d for d in (1, 2, 3, 4) if math.gcd(out_f, in_f) % d == 0),
                "alpha": 2.0}
    return {"structure": structure, "displacement_rank": 2, "alpha": 0.5, "use_prod": structure == "circulant"}


# -- oracles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("structure", STRUCTURES)
def test_fast_forward_and_merge_match_dense_definition(structure, shape, dtype, tol):
    out_f, in_f = shape
    layer = make_layer(out_f, in_f, dtype, **kwargs_for(structure, out_f, in_f))
    delta = reference_delta(layer.adapter).detach()
    scale = max(1.0, delta.abs().max().item())
    x = torch.randn(4, 3, in_f, dtype=dtype)
    expected = nn.functional.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=tol * scale, rtol=tol)
        torch.testing.assert_close(layer.adapter.delta_weight(), delta, atol=tol * scale, rtol=tol)


def test_circulant_without_product_and_explicit_block_size():
    layer = make_layer(16, 24, torch.float64, structure="circulant", use_prod=False, block_size=4)
    assert layer.adapter.surm_a.shape == (4, 6, 4) and layer.adapter.surm_b is None
    x = torch.randn(5, 24, dtype=torch.float64)
    delta = reference_delta(layer.adapter).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias),
                                   atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "ldr"])
def test_gradcheck_fft_paths(structure):
    torch.manual_seed(0)
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)  # q = 2 blocks of g = 5 (odd)
    p, q, g = 3, 2, 5
    if structure == "circulant":
        v = torch.randn(p, q, g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(surm.circulant_matvec, (x, v))
    elif structure == "toeplitz":
        a, b = (torch.randn(p, q, g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(surm.toeplitz_matvec, (x, a, b))
    else:
        c, s = (torch.randn(p, q, 2, g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(surm.ldr_matvec, (x, c, s))


# -- the contract for every structure (the method suite runs only the default) ---------------------


@pytest.mark.parametrize("structure", STRUCTURES)
def test_starts_at_zero_counts_and_merge_round_trip(structure, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 16))
    config = SURMConfig(structure=structure, r=4, displacement_rank=2, targets=["0", "2", "3"])
    model = rankwise.adapt(copy.deepcopy(base), config)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    expected = sum(SURMAdapter.expected_num_params(o, i, config) for o, i in ((32, 16), (16, 32), (16, 16)))
    closed_form = {"circulant": 2 * (512 // 16 * 2 + 16), "toeplitz": 2 * (512 // 16 * 2 + 16),
                   "ldr": 4 * (512 // 16 * 2 + 16), "kronecker": 48 + 48 + 32}[structure]
    assert rankwise.trainable_parameters(model) == expected == closed_form
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
        adapted = model(x)
        assert not torch.allclose(adapted, base(x), atol=1e-4)
        rankwise.save(model, tmp_path / "a")
        restored = rankwise.load(copy.deepcopy(base), tmp_path / "a")
        torch.testing.assert_close(restored(x), adapted, atol=0, rtol=0)
        rankwise.merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        rankwise.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, base[0].weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_training_forward_never_builds_the_dense_delta(structure, monkeypatch):
    layer = make_layer(12, 8, torch.float32, **kwargs_for(structure, 12, 8))

    def refuse(*args, **kwargs):
        raise AssertionError("the training forward built the dense ΔW")

    monkeypatch.setattr(surm, "circulant_dense", refuse)
    monkeypatch.setattr(surm, "toeplitz_dense", refuse)
    monkeypatch.setattr(surm, "ldr_dense", refuse)
    monkeypatch.setattr(torch, "kron", refuse)
    layer(torch.randn(2, 8)).sum().backward()


def test_rectangular_rule_and_errors():
    adapter = make_layer(1536, 384, torch.float32).adapter  # MiniLM FFN: g = gcd = 384, 4×1 tiles
    assert adapter.block_size == 384 and adapter.surm_a.shape == (4, 1, 384)
    with pytest.raises(ValueError, match=r"'0'.*block_size=5 does not divide both widths 12 and 8"):
        rankwise.adapt(nn.Sequential(nn.Linear(8, 12)), SURMConfig(block_size=5))
    with pytest.raises(ValueError, match=r"'0'.*kronecker r=3 does not divide"):
        rankwise.adapt(nn.Sequential(nn.Linear(8, 12)), SURMConfig(structure="kronecker", r=3))
    with pytest.raises(ValueError, match="structure"):
        SURMConfig(structure="monarch")
