"""Oracle tests: rankwise LoRA / rsLoRA / DoRA against Hugging Face PEFT 0.21.2, same weights in.

Outputs (eval, and train with dropout under the same RNG), merged weights, gradients with respect to
every adapter tensor and to the input, and adapter files in both directions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

import rankwise

TOL = {"atol": 1e-5, "rtol": 1e-5}


class Net(nn.Module):
    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        if conv1d:
            self.proj = Conv1D(24, 16)  # 16 -> 24, weight stored (16, 24)
            self.out = Conv1D(12, 24)
        else:
            self.proj = nn.Linear(16, 24)
            self.out = nn.Linear(24, 12, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.out(torch.relu(self.proj(x)))))


VARIANTS = {
    "lora": {"use_dora": False, "use_rslora": False},
    "rslora": {"use_dora": False, "use_rslora": True},
    "dora": {"use_dora": True, "use_rslora": False},
    "dora-rslora": {"use_dora": True, "use_rslora": True},
}


def pair(variant: str, conv1d: bool, dropout: float = 0.0, dtype=torch.float32, modules_to_save=None):
    """The same base adapted by PEFT and by rankwise, with PEFT's (random) adapter tensors copied into ours."""
    torch.manual_seed(0)
    base = Net(conv1d).to(dtype)
    flags = VARIANTS[variant]
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4, lora_alpha=6, lora_dropout=dropout, target_modules=["proj", "out"], init_lora_weights=False,
            fan_in_fan_out=conv1d, modules_to_save=modules_to_save, **flags,
        ),
    )
    peft_model.to(dtype)
    name = "dora" if flags["use_dora"] else "lora"
    ours = rankwise.adapt(
        copy.deepcopy(base),
        rankwise.config(name, r=4, alpha=6, dropout=dropout, use_rslora=flags["use_rslora"], targets=["proj", "out"],
                        modules_to_save=modules_to_save),
    )
    with torch.no_grad():
        for layer_name, layer in rankwise.adapted_layers(ours):
            theirs = peft_model.base_model.model.get_submodule(layer_name)
            layer.adapter.lora_A.weight.copy_(theirs.lora_A["default"].weight)
            layer.adapter.lora_B.weight.copy_(theirs.lora_B["default"].weight)
            if name == "dora":
                layer.adapter.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight * 1.1)
                theirs.lora_magnitude_vector["default"].weight.mul_(1.1)
    return base, peft_model, ours


def inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_gradients_match_peft(variant, conv1d):
    _, theirs, ours = pair(variant, conv1d)
    x1 = inputs().requires_grad_(True)
    x2 = inputs().requires_grad_(True)
    theirs.eval(), ours.eval()
    y_theirs, y_ours = theirs(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    for layer_name, layer in rankwise.adapted_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(layer_name)
        torch.testing.assert_close(layer.adapter.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, **TOL)
        torch.testing.assert_close(layer.adapter.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, **TOL)
        if variant.startswith("dora"):
            torch.testing.assert_close(
                layer.adapter.lora_magnitude_vector.grad,
                peft_layer.lora_magnitude_vector["default"].weight.grad, **TOL,
            )


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_forward_with_dropout_matches_peft(variant):
    """Same dropout masks (same RNG draws) give the same outputs, including DoRA's x̃ semantics."""
    _, theirs, ours = pair(variant, conv1d=False, dropout=0.3)
    theirs.train(), ours.train()
    torch.manual_seed(5)
    y_theirs = theirs(inputs())
    torch.manual_seed(5)
    y_ours = ours(inputs())
    torch.testing.assert_close(y_ours, y_theirs, **TOL)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_weights_match_peft(variant, conv1d):
    _, theirs, ours = pair(variant, conv1d)
    merged_theirs = theirs.merge_and_unload()
    rankwise.merge(ours)
    for layer_name, layer in rankwise.adapted_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_theirs.get_submodule(layer_name).weight, **TOL)


def test_float64_matches_peft_tightly():
    _, theirs, ours = pair("dora", conv1d=False, dtype=torch.float64)
    theirs.eval(), ours.eval()
    x = inputs(torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_default_init_matches_peft_distribution():
    """Kaiming-uniform A bounded by 1/sqrt(n), zero B: the model starts unchanged, like PEFT."""
    model = rankwise.adapt(Net(False), rankwise.LoRAConfig(r=4, targets=["proj"]))
    adapter = dict(rankwise.adapted_layers(model))["proj"].adapter
    assert adapter.lora_A.weight.abs().max() <= 1 / 16**0.5
    assert adapter.lora_A.weight.abs().max() > 0.5 / 16**0.5
    assert torch.count_nonzero(adapter.lora_B.weight) == 0
    assert adapter.scaling == 8 / 4
    rs = rankwise.adapt(Net(False), rankwise.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=["proj"]))
    assert dict(rankwise.adapted_layers(rs))["proj"].adapter.scaling == 4.0


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_import_peft_adapter(variant, conv1d, tmp_path):
    base, theirs, _ = pair(variant, conv1d, modules_to_save=["head"])
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    theirs.eval()
    torch.testing.assert_close(ours(inputs()), theirs(inputs()), **TOL)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_export_peft_adapter_loads_in_peft(variant, conv1d, tmp_path):
    base, _, ours = pair(variant, conv1d, modules_to_save=["head"])
    with torch.no_grad():
        ours.head.weight.add_(0.5)
    rankwise.export_peft(ours, tmp_path / "export")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    ours.eval()
    torch.testing.assert_close(theirs(inputs()), ours(inputs()), **TOL)


def test_dora_zero_row_is_finite_where_peft_is_nan():
    """An all-zero output row (a pruned unit) makes PEFT's DoRA divide 0 by 0; ours keeps that row at zero."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6, bias=False))
    with torch.no_grad():
        base[0].weight[2].zero_()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["0"], use_dora=True)).eval()
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.DoRAConfig(r=2, targets=["0"])).eval()
    x = torch.randn(3, 8)
    assert torch.isnan(theirs(x)).any()
    out = ours(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base(x), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert torch.isfinite(dict(rankwise.adapted_layers(ours))["0"].adapter.lora_magnitude_vector.grad).all()
