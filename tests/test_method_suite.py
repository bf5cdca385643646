"""The contract every registered method must keep (DESIGN.md, "Tests").

Parametrised over ``rankwise.methods()``; the per-method inputs live in ``method_cases.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from method_cases import CASES
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise
from rankwise.core.layer import AdaptedLayer, linear_shape
from rankwise.core.registry import get_method

METHODS = rankwise.methods()


class ToyMLP(nn.Module):
    """Linear layers of widths 32, 48 and 64, square and rectangular both ways."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.mid = nn.Linear(64, 48)
        self.down = nn.Linear(48, 32, bias=False)
        self.square = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(self.down(torch.tanh(self.mid(torch.tanh(self.up(x))))))


class ToyGPT(nn.Module):
    """transformers Conv1D layers (weight stored as in x out)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(64, 32)
        self.c_proj = Conv1D(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


def make(model_cls: type[nn.Module] = ToyMLP, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return model_cls().to(dtype).eval()


def build(name: str, model_cls: type[nn.Module] = ToyMLP, dtype=torch.float32, **extra):
    case = CASES[name]
    base = make(model_cls, dtype)
    reference = copy.deepcopy(base)
    torch.manual_seed(1)
    model = rankwise.adapt(base, rankwise.config(name, **{**case.kwargs, **extra}))
    return reference, model.eval()


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.1) -> None:
    """Move every trainable adapter tensor away from its init so the update is not zero."""
    generator = torch.Generator().manual_seed(2)
    for _, layer in rankwise.adapted_layers(model):
        for parameter in layer.adapter.parameters():
            if parameter.is_floating_point():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(3), dtype=dtype)


def test_every_method_has_a_case():
    assert set(METHODS) <= set(CASES), f"add a row to tests/method_cases.py for {set(METHODS) - set(CASES)}"


@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init(name):
    if not CASES[name].starts_at_zero:
        pytest.skip("this method does not start from the base model")
    reference, model = build(name)
    x = inputs()
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("model_cls", [ToyMLP, ToyGPT], ids=["linear", "conv1d"])
def test_merge_equals_forward_and_unmerge_restores(name, model_cls):
    if model_cls is ToyGPT and not CASES[name].conv1d:
        pytest.skip("no Conv1D support")
    reference, model = build(name, model_cls, **CASES[name].random_init)
    perturb(model)
    x = inputs()
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, reference(x), atol=1e-4), "the perturbed adapter changed nothing"
        rankwise.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        merged_weights = {n: p.clone() for n, p in model.named_parameters()}
        rankwise.merge(model)  # idempotent
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, merged_weights[n], atol=0, rtol=0)
        rankwise.unmerge(model)
        rankwise.unmerge(model)  # idempotent
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    for name_, layer in rankwise.adapted_layers(model):
        original = reference.get_submodule(name_)
        torch.testing.assert_close(layer.base_layer.weight, original.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_delta_weight_matches_forward(name):
    """For every layer, forward on that layer alone equals the dense merged weight's output."""
    _, model = build(name, **CASES[name].random_init)
    perturb(model)
    with torch.no_grad():
        for _, layer in rankwise.adapted_layers(model):
            _out_f, in_f = linear_shape(layer.base_layer)
            x = torch.randn(6, in_f, generator=torch.Generator().manual_seed(4))
            weight = layer.adapter.merged_weight(layer.base_layer.weight.clone())
            dense = x @ weight.T + (0 if layer.base_layer.bias is None else layer.base_layer.bias)
            torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_unload(name):
    reference, model = build(name, **CASES[name].random_init)
    perturb(model)
    x = inputs()
    with torch.no_grad():
        adapted = model(x)
        kept = copy.deepcopy(model)
        plain = rankwise.unload(model, merge=True)
        assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=1e-5)
        dropped = rankwise.unload(kept, merge=False)
        torch.testing.assert_close(dropped(x), reference(x), atol=0, rtol=0)
    assert all(p.requires_grad for p in dropped.parameters()), "unload must restore the trainable flags"


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name, tmp_path):
    _, model = build(name, **CASES[name].random_init)
    perturb(model)
    x = inputs()
    rankwise.save(model, tmp_path / "adapter")
    restored = rankwise.load(make(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), atol=0, rtol=0)
    assert rankwise.trainable_parameters(restored) == rankwise.trainable_parameters(model)


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_only_adapter_tensors(name):
    _, model = build(name, **CASES[name].random_init)
    perturb(model)
    model.train()
    model(inputs()).square().mean().backward()
    adapter_params = {id(p) for _, layer in rankwise.adapted_layers(model) for p in layer.adapter.parameters()}
    for pname, parameter in model.named_parameters():
        if id(parameter) in adapter_params and parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), pname
        else:
            assert parameter.grad is None, f"frozen parameter {pname} received a gradient"
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for _, layer in rankwise.adapted_layers(model)
        for p in layer.adapter.parameters()
    )


@pytest.mark.parametrize("name", METHODS)
def test_parameter_count_matches_closed_form(name):
    _, model = build(name)
    method = get_method(name)
    config = rankwise.adapter_config(model)
    expected = sum(
        method.adapter_cls.expected_num_params(*linear_shape(layer.base_layer), config)
        for _, layer in rankwise.adapted_layers(model)
    )
    assert rankwise.trainable_parameters(model) == expected


@pytest.mark.parametrize("name", METHODS)
def test_bad_configs_raise(name):
    case = CASES[name]
    assert case.bad, f"give {name} at least one invalid config in method_cases.py"
    for bad in case.bad:
        with pytest.raises(ValueError):
            rankwise.config(name, **{**case.kwargs, **bad})


@pytest.mark.parametrize("name", METHODS)
def test_unfit_configs_raise_and_leave_model_untouched(name):
    case = CASES[name]
    if case.fits_every_layer:
        assert not case.unfit
        pytest.skip(case.fits_every_layer)
    assert case.unfit, f"give {name} at least one config that does not fit the toy layers"
    for unfit in case.unfit:
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError) as error:
            rankwise.adapt(model, rankwise.config(name, **{**case.kwargs, **unfit}))
        assert any(layer in str(error.value) for layer in ("up", "mid", "down", "square")), str(error.value)
        assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], atol=0, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_float64_forward_matches_merge(name):
    _, model = build(name, dtype=torch.float64, **CASES[name].random_init)
    perturb(model)
    x = inputs(torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        rankwise.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_base_forward_is_finite(name):
    _, model = build(name, dtype=torch.bfloat16, **CASES[name].random_init)
    with torch.no_grad():
        out = model(inputs(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_adapting_twice_raises(name):
    _, model = build(name)
    with pytest.raises(ValueError, match="already"):
        rankwise.adapt(model, rankwise.config(name, **CASES[name].kwargs))
