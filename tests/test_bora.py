"""BoRA oracle: an independent dense implementation of the paper's matrix definition.

V = W0 + s·B·A; row_then_col: H = diag(g_out) V / ‖V‖_row, W' = H / ‖H‖_col · diag(g_in)
(col_then_row mirrors it). Outputs to 1e-5 (float32) / 1e-10 (float64), and gradients of all
four trained tensors by autograd of the dense formula, with and without detached norms.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toy_models import forward_and_dropped_input

import rankwise


def dense_scales(W0, A, B, s, g_out, g_in, order, detach):
    """(d_out, d_in) of W' = diag(d_out) V diag(d_in), from explicit norms of the explicit matrices."""
    V = W0 + s * B @ A
    norm = (lambda t: t.detach()) if detach else (lambda t: t)
    if order == "row_then_col":
        d_out = g_out / norm(V.norm(dim=1))
        return d_out, g_in / norm((d_out[:, None] * V).norm(dim=0))
    d_in = g_in / norm(V.norm(dim=0))
    return g_out / norm((V * d_in).norm(dim=1)), d_in


def dense_bora(W0, A, B, s, g_out, g_in, order, detach):
    """W' straight from the definition: H = diag(g_out) V / ‖V‖_row, W' = H / ‖H‖_col · diag(g_in)
    (row_then_col; col_then_row mirrors it)."""
    d_out, d_in = dense_scales(W0, A, B, s, g_out, g_in, order, detach)
    return d_out[:, None] * (W0 + s * B @ A) * d_in


def build(dtype, order="row_then_col", detach=True, shape=(40, 24), **extra):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(shape[1], shape[0])).to(dtype)
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.config("bora", r=4, alpha=8, order=order, detach_norms=detach, **extra))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model[0].adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return reference[0], model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("order", ["row_then_col", "col_then_row"])
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "through-norms"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_forward_and_gradients_match_dense_definition(dtype, tol, order, detach, shape):
    base, model = build(dtype, order, detach, shape)
    adapter = model[0].adapter
    leaves = {
        "A": adapter.lora_A.weight.detach().clone().requires_grad_(True),
        "B": adapter.lora_B.weight.detach().clone().requires_grad_(True),
        "g_out": adapter.bora_magnitude_out.detach().clone().requires_grad_(True),
        "g_in": adapter.bora_magnitude_in.detach().clone().requires_grad_(True),
    }
    W = dense_bora(base.weight.detach(), leaves["A"], leaves["B"], adapter.scaling, leaves["g_out"], leaves["g_in"],
                   order, detach)
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(2), dtype=dtype)
    expected = x @ W.T + base.bias
    out = model(x)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    ((out - target) ** 2).sum().backward()
    ((expected - target) ** 2).sum().backward()
    ours = {
        "A": adapter.lora_A.weight.grad, "B": adapter.lora_B.weight.grad,
        "g_out": adapter.bora_magnitude_out.grad, "g_in": adapter.bora_magnitude_in.grad,
    }
    for name, leaf in leaves.items():
        assert leaf.grad.abs().sum() > 0, name
        torch.testing.assert_close(ours[name], leaf.grad, atol=tol * 10, rtol=tol * 10, msg=name)


@pytest.mark.parametrize("order", ["row_then_col", "col_then_row"])
def test_dropout_acts_on_the_lora_branch_input_only(order):
    """y = x (D_out W0 D_in)ᵀ + dropout(x) (D_out s·B·A D_in)ᵀ + b, the norms from the undropped
    weights; the reference draws the same mask (one dropout call on x, same seed). Dropout removed,
    or applied to the W0 path, fails here."""
    base, model = build(torch.float64, order, dropout=0.5)
    adapter = model[0].adapter
    A, B, s = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach(), adapter.scaling
    d_out, d_in = dense_scales(base.weight.detach(), A, B, s, adapter.bora_magnitude_out.detach(),
                               adapter.bora_magnitude_in.detach(), order, True)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, dropped = forward_and_dropped_input(lambda: model.train()(x), x, 0.5)
    frozen_part = d_out[:, None] * base.weight.detach() * d_in
    low_rank_part = d_out[:, None] * (s * B @ A) * d_in
    torch.testing.assert_close(out, x @ frozen_part.T + dropped @ low_rank_part.T + base.bias, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("order", ["row_then_col", "col_then_row"])
def test_merge_writes_the_dense_weight(order):
    base, model = build(torch.float64, order)
    adapter = model[0].adapter
    expected = dense_bora(base.weight, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling,
                          adapter.bora_magnitude_out, adapter.bora_magnitude_in, order, True).detach()
    rankwise.merge(model)
    torch.testing.assert_close(model[0].base_layer.weight, expected, atol=1e-12, rtol=1e-12)
    rankwise.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base.weight, atol=1e-12, rtol=1e-12)


def test_last_step_magnitudes_are_exact_norms():
    """row_then_col: the column norms of W' are g_in exactly; col_then_row: the row norms are g_out."""
    for order, dim, name in [("row_then_col", 0, "bora_magnitude_in"), ("col_then_row", 1, "bora_magnitude_out")]:
        _, model = build(torch.float64, order)
        adapter = model[0].adapter
        merged = adapter.merged_weight(adapter.base_weight().clone())
        torch.testing.assert_close(merged.norm(dim=dim), getattr(adapter, name).detach().abs(), atol=1e-12, rtol=1e-12)


def test_init_is_identity_and_magnitudes_are_base_norms():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40))
    x = torch.randn(4, 24)
    before = base(x)
    model = rankwise.adapt(base, rankwise.config("bora", r=4))
    adapter = model[0].adapter
    torch.testing.assert_close(adapter.bora_magnitude_out.detach(), base[0].base_layer.weight.norm(dim=1))
    torch.testing.assert_close(adapter.bora_magnitude_in.detach(), base[0].base_layer.weight.norm(dim=0))
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)


def test_zero_column_stays_finite():
    base = nn.Sequential(nn.Linear(24, 40))
    with torch.no_grad():
        base[0].weight[:, 3] = 0.0
    model = rankwise.adapt(base, rankwise.config("bora", r=4))
    out = model(torch.randn(2, 24))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(model[0].adapter.bora_magnitude_in.grad).all()


def test_defaults_fit_minilm_shapes():
    net = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 1536), nn.Linear(1536, 384))
    model = rankwise.adapt(net, rankwise.config("bora"))
    expected = sum(8 * (m + n) + m + n for m, n in [(384, 384), (1536, 384), (384, 1536)])
    assert rankwise.trainable_parameters(model) == expected
