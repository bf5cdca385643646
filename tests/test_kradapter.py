"""KRAdapter oracle tests: the paper's Khatri-Rao update entry by entry, and the official layer's forward rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_gralora import assert_uniform
from torch import nn

import rankwise
from rankwise.adapters.kradapter import KRAdapterAdapter, kr_shape

SHAPES = [(24, 16), (16, 24), (36, 36), (30, 30), (1, 8), (8, 1), (64, 48), (48, 64), (100, 7), (7, 100)]


def entrywise_delta(u: torch.Tensor, v: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """ΔW/s from the formula by indices: row i of P is V_i ⊗ U_i, so P[i, a·r + b] = V[i, a]·U[i, b];
    ΔW[i, j] = P[i, j] when m ≤ n, else P[j, i]."""
    r = u.shape[1]
    i, j = torch.arange(m)[:, None], torch.arange(n)[None, :]
    row, col = (i, j) if m <= n else (j, i)
    return v[row, col // r] * u[row, col % r]


def official_forward(adapter: KRAdapterAdapter, x: torch.Tensor, base_out: torch.Tensor, scaling: float) -> torch.Tensor:
    """The official ``KRAdapterLinearLayer`` forward, re-expressed: P is built by broadcasting U against V,
    transposed when argmin(weight shape) differs from argmin(P's shape), cropped to (out, in), and applied
    as x @ cropᵀ · s."""
    u, v = adapter.kradapter_u, adapter.kradapter_v
    update = torch.einsum("ib,ia->iab", u, v).flatten(1)
    shape = (adapter.out_features, adapter.in_features)
    if torch.argmin(torch.tensor(shape)) != torch.argmin(torch.tensor(update.shape)):
        update = update.T
    return x @ update[: shape[0], : shape[1]].T * scaling + base_out


def random_adapter(out_features: int, in_features: int, scaling: float = 2.0) -> tuple[nn.Linear, KRAdapterAdapter]:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    return layer, KRAdapterAdapter(layer, rankwise.config("kradapter", scaling=scaling, init_weights=False), "layer")


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_update_equals_the_formula_and_the_official_forward(out_features, in_features):
    layer, adapter = random_adapter(out_features, in_features, scaling=1.5)
    k, r, d = kr_shape(out_features, in_features)
    assert adapter.kradapter_u.shape == (k, r) and adapter.kradapter_v.shape == (k, r + d)
    assert r * r <= k < (r + 1) ** 2 and r * (r + d) >= max(out_features, in_features) > r * (r + d - 1)
    with torch.no_grad():
        expected = 1.5 * entrywise_delta(adapter.kradapter_u, adapter.kradapter_v, out_features, in_features)
        torch.testing.assert_close(adapter.delta_weight(), expected, atol=0, rtol=0)
        x = torch.randn(2, 3, in_features)
        out = adapter(x, layer(x))
        torch.testing.assert_close(out, layer(x) + x @ expected.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, official_forward(adapter, x, layer(x), 1.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("out_features", "in_features"), [(36, 36), (24, 16), (16, 24)])
def test_merge_adds_the_forward_update_also_on_square_layers(out_features, in_features):
    """The official merge adds its (in × out) forward matrix: the transposed update on a square layer; rankwise
    merges what the forward computes."""
    layer, _ = random_adapter(out_features, in_features)
    model = rankwise.adapt(nn.Sequential(copy.deepcopy(layer)), rankwise.config("kradapter", init_weights=False,
                                                                                targets=["0"]))
    adapter = model[0].adapter
    x = torch.randn(5, in_features)
    with torch.no_grad():
        expected = model(x)
        delta = 2.0 * entrywise_delta(adapter.kradapter_u, adapter.kradapter_v, out_features, in_features)
        rankwise.merge(model)
        torch.testing.assert_close(model[0].base_layer.weight, layer.weight + delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        rankwise.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, layer.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("out_features", "in_features", "over_budget"),
                         [(1024, 768, 0.02), (768, 1024, 0.02), (4096, 4096, 0.0), (4096, 11008, 0.13)])
def test_parameter_count_and_the_papers_budget(out_features, in_features, over_budget):
    """k(2r + d) = k(r + ⌈M/r⌉): the paper's budget 2·min(m, n)·√max(m, n) on square layers, a little more
    on rectangular ones (r ≈ √k balances the two terms only when k = M)."""
    k, r, d = kr_shape(out_features, in_features)
    longest = max(out_features, in_features)
    count = KRAdapterAdapter.expected_num_params(out_features, in_features, rankwise.config("kradapter"))
    assert count == k * (2 * r + d) == k * (r + -(-longest // r))
    assert 0 <= count / (2 * k * math.sqrt(longest)) - 1 <= over_budget
    assert kr_shape(1024, 768) == (768, 27, 11)  # the official README's example layer


@pytest.mark.parametrize(("out_features", "in_features"), [(64, 48), (48, 64), (36, 36)])
def test_random_update_has_full_rank(out_features, in_features):
    """The Khatri-Rao rows are generically independent: rank min(m, n) from k(2r + d) parameters."""
    _, adapter = random_adapter(out_features, in_features)
    with torch.no_grad():
        assert torch.linalg.matrix_rank(adapter.delta_weight().double()) == min(out_features, in_features)


def test_seeded_init_is_the_official_one():
    """U = 0, then V drawn by Kaiming-uniform with a = 5 on its (k, r + d) shape: the official layer's draws."""
    torch.manual_seed(7)
    adapter = KRAdapterAdapter(nn.Linear(48, 64, device="meta"), rankwise.config("kradapter"), "layer")
    torch.manual_seed(7)
    expected_v = nn.init.kaiming_uniform_(torch.empty(48, 6 + 5), a=5)
    assert kr_shape(64, 48) == (48, 6, 5)
    assert not adapter.kradapter_u.any()
    torch.testing.assert_close(adapter.kradapter_v, expected_v, atol=0, rtol=0)


@pytest.mark.parametrize("init_weights", [True, False])
def test_init_bounds_are_kaiming_with_slope_five(init_weights):
    """V ~ U(±√(3 / (13(r + d)))) (gain √(2/(1 + 5²)), fan-in r + d); U = 0, or U(±√(3 / (13 r))) when random."""
    k, r, d = kr_shape(4096, 1024)
    assert (k, r, d) == (1024, 32, 96)
    torch.manual_seed(0)
    adapter = KRAdapterAdapter(nn.Linear(1024, 4096, device="meta"),
                               rankwise.config("kradapter", init_weights=init_weights), "layer")
    with torch.no_grad():
        assert_uniform(adapter.kradapter_v, math.sqrt(3 / (13 * (r + d))))
        if init_weights:
            assert not adapter.kradapter_u.any()
        else:
            assert_uniform(adapter.kradapter_u, math.sqrt(3 / (13 * r)))


def test_scaling_is_applied_once():
    layer, adapter = random_adapter(24, 16, scaling=3.0)
    x = torch.randn(4, 16)
    with torch.no_grad():
        base = layer(x)
        update = adapter(x, base.clone()) - base
        adapter.scaling = 1.0
        torch.testing.assert_close(update, 3.0 * (adapter(x, base.clone()) - base), atol=1e-6, rtol=1e-6)


def test_bad_scaling_names_the_option():
    with pytest.raises(ValueError, match="KRAdapterConfig: scaling must be a finite number > 0, got 0"):
        rankwise.config("kradapter", scaling=0)


def test_export_peft_names_the_supported_methods(tmp_path):
    """PEFT 0.21.2 has no KRAdapter, so export_peft refuses it."""
    model = rankwise.adapt(nn.Sequential(nn.Linear(8, 8)), rankwise.config("kradapter", targets=["0"]))
    with pytest.raises(ValueError, match="method 'kradapter' has no PEFT equivalent; export_peft supports"):
        rankwise.export_peft(model, tmp_path)
