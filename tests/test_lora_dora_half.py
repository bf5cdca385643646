"""DoRA on float16 / bfloat16 bases: the norms c are taken in float32 (at init, in the forward, in merge),
so g/c = 1 exactly at init and the outputs agree with PEFT's DoRA (which takes c in float32 in its forward)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

import rankwise

HALF = [torch.bfloat16, torch.float16]


def base_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48)).to(dtype)


def inputs(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_magnitude_equals_norm_at_init(dtype):
    base = base_model(dtype)
    model = rankwise.adapt(copy.deepcopy(base), rankwise.DoRAConfig(r=4, targets=["0"])).eval()
    adapter = model[0].adapter
    c = adapter.weight_norm(adapter.base_weight())
    assert c.dtype == torch.float32
    torch.testing.assert_close(adapter.lora_magnitude_vector / c, torch.ones_like(c), atol=1e-6, rtol=0)
    torch.testing.assert_close(c, torch.linalg.vector_norm(base[0].weight.float(), dim=1), atol=1e-6, rtol=1e-6)
    assert torch.equal(model(inputs(dtype)), base(inputs(dtype)))  # g/c = 1: the model starts at the base


def pair(dtype: torch.dtype):
    """PEFT's DoRA and ours on the same half base, with PEFT's (random) A, B and g copied into ours."""
    base = base_model(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                use_dora=True, init_lora_weights=False)).eval()
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.DoRAConfig(r=4, alpha=8, targets=["0"])).eval()
    peft_layer, adapter = theirs.base_model.model[0], ours[0].adapter
    with torch.no_grad():
        adapter.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        adapter.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        adapter.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    return base, theirs, ours


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_norm_matches_peft_forward_norm(dtype):
    _, theirs, ours = pair(dtype)
    peft_layer, adapter = theirs.base_model.model[0], ours[0].adapter
    dora = peft_layer.lora_magnitude_vector["default"]
    lora_weight = dora.get_lora_weight(peft_layer.lora_A["default"], peft_layer.lora_B["default"])
    expected = dora.get_weight_norm(peft_layer.base_layer.weight.float(), lora_weight, peft_layer.scaling["default"])
    torch.testing.assert_close(adapter.weight_norm(adapter.base_weight()), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_outputs_match_peft_on_a_half_base(dtype):
    """Both compute in float32 and round once to the half dtype: equal but for rare last-bit ties, and no
    further from the float64 formula than PEFT itself."""
    base, theirs, ours = pair(dtype)
    x = inputs(dtype)
    y_theirs, y_ours = theirs(x), ours(x)
    assert (y_theirs != y_ours).float().mean() < 0.01
    adapter = ours[0].adapter
    W, A, B = (t.double() for t in (base[0].weight, adapter.lora_A.weight, adapter.lora_B.weight))
    V = W + adapter.scaling * B @ A
    g = adapter.lora_magnitude_vector.double()
    reference = x.double() @ ((g / torch.linalg.vector_norm(V, dim=1))[:, None] * V).T + base[0].bias.double()
    assert (y_ours.double() - reference).abs().max() <= (y_theirs.double() - reference).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merge_matches_peft_on_a_half_base(dtype):
    _, theirs, ours = pair(dtype)
    merged = theirs.merge_and_unload()
    rankwise.merge(ours)
    diff = ours[0].base_layer.weight.float() - merged[0].weight.float()
    assert (diff != 0).float().mean() < 0.01
    assert diff.abs().max() <= torch.finfo(dtype).eps * merged[0].weight.float().abs().max()
