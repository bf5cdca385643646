"""GraLoRA oracle tests: PEFT 0.21.2's GraLoRA with the same weights, and the paper's block formula."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import GraloraConfig, PeftModel, get_peft_model
from torch import nn
from toy_models import minilm_shaped_bert, seeded_train_outputs
from transformers.pytorch_utils import Conv1D

import rankwise
from rankwise.adapters.gralora import GraLoRAAdapter


class Net(nn.Module):
    """A rectangular and a square layer, Linear or GPT-2 Conv1D."""

    def __init__(self, conv1d: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.proj = Conv1D(24, 16) if conv1d else nn.Linear(16, 24)
        self.out = Conv1D(24, 24) if conv1d else nn.Linear(24, 24)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


def pair(hybrid_r: int, conv1d: bool = False, dtype: torch.dtype = torch.float32, r: int = 4, k: int = 2,
         dropout: float = 0.0):
    """PEFT's GraLoRA and ours on copies of one base model, ours holding PEFT's (random) weights."""
    torch.manual_seed(0)
    base = Net(conv1d, dtype)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(
        "gralora", r=r, alpha=3.0, gralora_k=k, hybrid_r=hybrid_r, dropout=dropout, targets=["proj", "out"]))
    peft_model = get_peft_model(base, GraloraConfig(
        target_modules=["proj", "out"], r=r, alpha=3, gralora_k=k, hybrid_r=hybrid_r, init_weights=False,
        fan_in_fan_out=conv1d, gralora_dropout=dropout))
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            theirs = peft_model.base_model.model.get_submodule(name)
            layer.adapter.gralora_A.copy_(theirs.gralora_A["default"])
            layer.adapter.gralora_B.copy_(theirs.gralora_B["default"])
            if hybrid_r:
                layer.adapter.gralora_A_general.copy_(theirs.gralora_A_general["default"].weight)
                layer.adapter.gralora_B_general.copy_(theirs.gralora_B_general["default"].weight)
    return ours, peft_model


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("hybrid_r", [0, 2])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_gradients_and_merge_equal_peft(hybrid_r, conv1d, dtype):
    ours, theirs = pair(hybrid_r, conv1d, dtype)
    x = torch.randn(3, 5, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out_ours, out_theirs = ours(x), theirs(x)
    with torch.no_grad(), theirs.disable_adapter():
        assert not torch.allclose(theirs(x), out_theirs, atol=1e-3)  # the adapter is non-trivial
    torch.testing.assert_close(out_ours, out_theirs, **tolerance(dtype))
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for name, layer in rankwise.adapted_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.adapter.gralora_A.grad, peft_layer.gralora_A["default"].grad, **tolerance(dtype))
        torch.testing.assert_close(layer.adapter.gralora_B.grad, peft_layer.gralora_B["default"].grad, **tolerance(dtype))
        if hybrid_r:
            torch.testing.assert_close(layer.adapter.gralora_B_general.grad,
                                       peft_layer.gralora_B_general["default"].weight.grad, **tolerance(dtype))
        delta = layer.adapter.delta_weight()
        peft_delta = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(delta.T if conv1d else delta, peft_delta, **tolerance(dtype))
    with torch.no_grad():
        rankwise.merge(ours)
        theirs.merge_adapter()
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.base_layer.weight,
                                       theirs.base_model.model.get_submodule(name).base_layer.weight, **tolerance(dtype))
        torch.testing.assert_close(ours(x), theirs(x), **tolerance(dtype))


@pytest.mark.parametrize("hybrid_r", [0, 2])
@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16)], ids=["3d", "2d"])
def test_dropout_in_training_equals_peft_under_the_same_seed(hybrid_r, shape):
    """Dropout acts on each adapter branch's input, never on the base path, with PEFT's masks: one per
    branch (block, then hybrid), drawn from the global RNG, so seeding before both forwards gives
    PEFT's output and gradients exactly."""
    ours, theirs = pair(hybrid_r, dropout=0.5)
    out_ours, out_theirs = seeded_train_outputs(ours, theirs, torch.randn(*shape, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-6, rtol=1e-6)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    names = ["gralora_A", "gralora_B"] + (["gralora_A_general", "gralora_B_general"] if hybrid_r else [])
    for name, layer in rankwise.adapted_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        for tensor in names:
            peft_param = getattr(peft_layer, tensor)["default"]
            peft_grad = peft_param.weight.grad if tensor.endswith("general") else peft_param.grad
            torch.testing.assert_close(getattr(layer.adapter, tensor).grad, peft_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init_weights", [True, False])
def test_seeded_init_equals_peft(init_weights):
    """Without the hybrid branch rankwise draws A (and random B) blocks exactly as PEFT does."""
    torch.manual_seed(0)
    base = Net()
    torch.manual_seed(4)
    theirs = get_peft_model(copy.deepcopy(base), GraloraConfig(
        target_modules=["proj", "out"], r=4, alpha=3, gralora_k=2, init_weights=init_weights))
    torch.manual_seed(4)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(
        "gralora", r=4, alpha=3.0, gralora_k=2, init_weights=init_weights, targets=["proj", "out"]))
    for name, layer in rankwise.adapted_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.adapter.gralora_A, peft_layer.gralora_A["default"], atol=0, rtol=0)
        torch.testing.assert_close(layer.adapter.gralora_B, peft_layer.gralora_B["default"], atol=0, rtol=0)


def assert_uniform(tensor: torch.Tensor, bound: float) -> None:
    """U(±bound), pinned: every value within the bound, the extremes near it and std = bound/√3 (3%)."""
    assert tensor.abs().max() <= bound and tensor.abs().max() > 0.99 * bound
    assert abs(tensor.std().item() / (bound / 3**0.5) - 1) < 0.03
    assert abs(tensor.mean().item()) < 0.05 * bound


@pytest.mark.parametrize("init_weights", [True, False])
def test_init_bounds_pin_each_fan_in(init_weights):
    """A blocks: fan-in n/k (not n, not r); hybrid A_g: fan-in n; random B: fan-in r; random B_g: fan-in h."""
    n, m, k, r, h = 1024, 512, 4, 16, 8
    torch.manual_seed(0)
    adapter = GraLoRAAdapter(nn.Linear(n, m), rankwise.config(
        "gralora", r=r, gralora_k=k, hybrid_r=h, init_weights=init_weights), "layer")
    with torch.no_grad():
        assert_uniform(adapter.gralora_A, (k / n) ** 0.5)
        assert_uniform(adapter.gralora_A_general, 1 / n**0.5)
        if init_weights:
            assert not adapter.gralora_B.any() and not adapter.gralora_B_general.any()
            assert not adapter.delta_weight().any()
        else:
            assert_uniform(adapter.gralora_B, 1 / r**0.5)
            assert_uniform(adapter.gralora_B_general, 1 / h**0.5)


def block_reference(adapter: GraLoRAAdapter) -> torch.Tensor:
    """ΔW assembled block by block from the paper's definition ΔW_ij = s·B_ij A_ij (+ s·B_g A_g)."""
    k, r = adapter.k, adapter.r
    rho, m, n = r // k, adapter.out_features, adapter.in_features
    delta = torch.zeros(m, n, dtype=torch.float64)
    A, B = adapter.gralora_A.double(), adapter.gralora_B.double()
    for i in range(k):
        for j in range(k):
            a_ij = A[j, :, i * rho:(i + 1) * rho].T  # (ρ, n/k)
            b_ij = B[i, j * rho:(j + 1) * rho, :].T  # (m/k, ρ)
            delta[i * m // k:(i + 1) * m // k, j * n // k:(j + 1) * n // k] = b_ij @ a_ij
    if adapter.hybrid_r:
        delta += adapter.gralora_B_general.double() @ adapter.gralora_A_general.double()
    return adapter.scaling * delta


@pytest.mark.parametrize("k,r,hybrid_r", [(2, 4, 0), (4, 8, 3), (3, 6, 1)])
def test_delta_weight_and_forward_match_the_block_formula_for_any_leading_dims(k, r, hybrid_r):
    torch.manual_seed(0)
    base = nn.Linear(48, 36).double()
    adapter = GraLoRAAdapter(base, rankwise.config("gralora", r=r, gralora_k=k, hybrid_r=hybrid_r,
                                                   init_weights=False), "layer").double()
    reference = block_reference(adapter)
    torch.testing.assert_close(adapter.delta_weight(), reference, atol=1e-12, rtol=1e-12)
    if not hybrid_r:
        assert torch.linalg.matrix_rank(reference) == min(k * r, 36)  # rank k·r, not LoRA's r
    for shape in [(48,), (7, 48), (2, 3, 48), (2, 3, 4, 48)]:  # PEFT fails on the 4-D case
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(adapter(x, base(x)), base(x) + x @ reference.T, atol=1e-10, rtol=1e-10)


def test_non_contiguous_input():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    adapter = GraLoRAAdapter(base, rankwise.config("gralora", r=4, init_weights=False), "layer")
    x = torch.randn(5, 16, 3).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, base(x)), base(x) + x @ adapter.delta_weight().T, atol=1e-5, rtol=1e-5)


def test_peft_save_pretrained_imports_and_export_loads_in_peft(tmp_path):
    _, theirs = pair(hybrid_r=2)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    imported = rankwise.import_peft(Net(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(imported(x), expected, atol=1e-6, rtol=1e-6)
    rankwise.export_peft(imported, tmp_path / "back")
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(Net(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, atol=1e-6, rtol=1e-6)


def test_bad_shapes_name_the_layer_and_oversized_rank_warns():
    with pytest.raises(ValueError, match="'proj'.*gralora_k=5"):
        rankwise.adapt(Net(), rankwise.config("gralora", r=5, gralora_k=5, targets=["proj"]))
    with pytest.raises(ValueError, match="divisible"):
        rankwise.config("gralora", r=6, gralora_k=4)
    with pytest.warns(UserWarning, match="'proj'.*exceeds min"):
        rankwise.adapt(Net(), rankwise.config("gralora", r=12, gralora_k=2, targets=["proj"]))


def test_defaults_work_on_minilm_shapes():
    """Default config on a one-layer MiniLM-shaped BERT (hidden 384, intermediate 1536)."""
    bert = minilm_shaped_bert()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = bert(ids).last_hidden_state
    model = rankwise.adapt(bert, rankwise.config("gralora"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, before, atol=0, rtol=0)
    expected = sum(GraLoRAAdapter.expected_num_params(*l.base_layer.weight.shape, rankwise.config("gralora"))
                   for _, l in rankwise.adapted_layers(model))
    shapes = [l.base_layer.weight.shape for _, l in rankwise.adapted_layers(model)]
    assert rankwise.trainable_parameters(model) == expected == 32 * sum(m + n for m, n in shapes)
    assert (1536, 384) in shapes and (384, 1536) in shapes
