"""LoLDU oracle: a dense reference built from ``torch.linalg.lu``'s P, L, U (the paper's and the
official code's factorisation), W = W_res + σ P L_r diag(z) Ū_r with W_res = W0 − σ P L_r diag(D_r) Ū_r.
Outputs to 1e-5 (float32) / 1e-10 (float64); the gradient of z by autograd of the dense formula.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise


def dense_reference(weight: torch.Tensor, z: torch.Tensor, r: int, sigma: float) -> torch.Tensor:
    """The official parametrisation, written from the paper: W_res + σ P L_r diag(z) Ū_r."""
    P, L, U = torch.linalg.lu(weight.detach())
    d = U.diagonal()[:r]
    basis_left, basis_right = P @ L[:, :r], U[:r] / d[:, None]
    residual = weight.detach() - sigma * basis_left @ torch.diag(d) @ basis_right
    return residual + sigma * basis_left @ torch.diag(z) @ basis_right


def layer_and_model(dtype: torch.dtype, out_f: int = 40, in_f: int = 24, r: int = 6, alpha: float = 3.0):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f)).to(dtype)
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.config("loldu", r=r, alpha=alpha))
    with torch.no_grad():
        z = model[0].adapter.loldu_z
        z.add_(torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=dtype))
    return reference[0], model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_forward_and_gradient_match_dense_reference(dtype, tol, shape):
    r, alpha = 6, 3.0
    base, model = layer_and_model(dtype, *shape, r=r, alpha=alpha)
    x = torch.randn(5, 3, shape[1], generator=torch.Generator().manual_seed(2), dtype=dtype)
    z = model[0].adapter.loldu_z.detach().clone().requires_grad_(True)
    expected = x @ dense_reference(base.weight, z, r, alpha / r).T + base.bias
    out = model(x)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    ((out - target) ** 2).sum().backward()
    ((expected - target) ** 2).sum().backward()
    torch.testing.assert_close(model[0].adapter.loldu_z.grad, z.grad, atol=tol * 10, rtol=tol)


def test_merged_weight_matches_reference_and_base_stays_intact():
    base, model = layer_and_model(torch.float64)
    adapter = model[0].adapter
    expected = dense_reference(base.weight, adapter.loldu_z.detach(), adapter.r, adapter.scaling)
    torch.testing.assert_close(model[0].base_layer.weight, base.weight, atol=0, rtol=0)
    rankwise.merge(model)
    torch.testing.assert_close(model[0].base_layer.weight, expected, atol=1e-12, rtol=1e-12)
    rankwise.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base.weight, atol=1e-12, rtol=1e-12)


def test_disabled_adapter_gives_the_original_output_exactly():
    base, model = layer_and_model(torch.float32)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), rankwise.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)


def test_basis_is_the_first_r_lu_steps():
    """The rank-r term P L_r diag(D_r) Ū_r reproduces the first r columns of W0 exactly (LU skeleton)."""
    base, model = layer_and_model(torch.float64)
    adapter = model[0].adapter
    term = (adapter.permuted_lower() * adapter.loldu_D) @ adapter.loldu_U
    torch.testing.assert_close(term[:, : adapter.r], base.weight[:, : adapter.r], atol=1e-12, rtol=1e-12)
    assert adapter.loldu_perm.dtype == torch.long and adapter.loldu_perm.shape == (40,)
    assert sorted(adapter.loldu_perm.tolist()) == list(range(40))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_init_is_the_official_lu_init_and_an_exact_identity(shape):
    """z₀ = D_r, the official ``init_method="lu"``: the first r pivots of torch.linalg.lu(W0) (exactly those
    of the float64 factorisation; the official float32 one to 1e-5). The frozen factors are P L_r and
    Ū_r = U_r / D_r of the same factorisation, only z is trained, σ = α/r, and the output is unchanged
    bit for bit."""
    r = 6
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(shape[1], shape[0]))
    weight = base[0].weight.detach().clone()
    model = rankwise.adapt(base, rankwise.config("loldu", r=r, alpha=3.0))
    adapter = model[0].adapter
    P, L, U = torch.linalg.lu(weight.double())
    pivots = U.diagonal()[:r]
    torch.testing.assert_close(adapter.loldu_z.detach(), pivots.float(), atol=0, rtol=0)
    torch.testing.assert_close(adapter.loldu_z.detach(), torch.linalg.lu(weight)[2].diagonal()[:r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.loldu_D, adapter.loldu_z.detach(), atol=0, rtol=0)
    torch.testing.assert_close(adapter.permuted_lower(), (P @ L[:, :r]).float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(adapter.loldu_U, (U[:r] / pivots[:, None]).float(), atol=1e-6, rtol=1e-6)
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["loldu_z"]
    assert adapter.scaling == 0.5
    assert not adapter.delta_weight().any()
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.linear(x, weight, base[0].base_layer.bias), atol=0, rtol=0)


def test_zero_pivot_raises_naming_the_layer():
    base = nn.Sequential(nn.Linear(24, 40))
    with torch.no_grad():
        base[0].weight[:, 0] = 0.0
    with pytest.raises(ValueError, match=r"'0'.*pivot 0"):
        rankwise.adapt(base, rankwise.config("loldu", r=4))
    assert all(p.requires_grad for p in base.parameters())


def test_rank_above_min_dimension_raises():
    with pytest.raises(ValueError, match="r=30 exceeds min"):
        rankwise.adapt(nn.Sequential(nn.Linear(24, 40)), rankwise.config("loldu", r=30))


def test_defaults_fit_minilm_shapes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 1536), nn.Linear(1536, 384))
    x = torch.randn(2, 384)
    before = net(x)
    model = rankwise.adapt(net, rankwise.config("loldu"))
    assert rankwise.trainable_parameters(model) == 3 * 32
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
