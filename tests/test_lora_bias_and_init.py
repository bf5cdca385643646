"""LoRA's ``lora_bias`` (forward, merge, unmerge) against PEFT 0.21.2 and the hand formula, and the init
distributions pinned tightly (seeded equality with PEFT, plus bounds and moments)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

import rankwise
from rankwise.core.layer import AdaptedLayer

TOL = {"atol": 1e-6, "rtol": 1e-6}
R, ALPHA = 4, 6.0  # s = 1.5: an unscaled bias cannot pass for a scaled one


def bias_pair():
    """PEFT with lora_bias=True and ours, same A, B and (non-zero) b_B."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"],
                                                                lora_bias=True, init_lora_weights=False)).eval()
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=R, alpha=ALPHA, lora_bias=True, targets=["0"]))
    peft_layer, adapter = theirs.base_model.model[0], ours[0].adapter
    with torch.no_grad():
        peft_layer.lora_B["default"].bias.normal_()
        adapter.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        adapter.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        adapter.lora_B.bias.copy_(peft_layer.lora_B["default"].bias)
    return base, theirs, ours.eval()


def hand_weights(base: nn.Module, ours: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W + s·B·A and b + s·b_B."""
    adapter = ours[0].adapter
    s = ALPHA / R
    weight = base[0].weight + s * adapter.lora_B.weight @ adapter.lora_A.weight
    return weight, base[0].bias + s * adapter.lora_B.bias


def test_lora_bias_forward_matches_peft_and_formula():
    base, theirs, ours = bias_pair()
    x = torch.randn(5, 16)
    weight, bias = hand_weights(base, ours)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(ours(x), x @ weight.T + bias, **TOL)


def test_lora_bias_merge_matches_peft_and_formula():
    base, theirs, ours = bias_pair()
    weight, bias = hand_weights(base, ours)
    merged = theirs.merge_and_unload()
    rankwise.merge(ours)
    torch.testing.assert_close(ours[0].base_layer.bias, merged[0].bias, **TOL)
    torch.testing.assert_close(ours[0].base_layer.bias, bias, **TOL)
    torch.testing.assert_close(ours[0].base_layer.weight, weight, **TOL)


def test_lora_bias_unmerge_restores_the_bias_like_peft():
    base, theirs, ours = bias_pair()
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    rankwise.merge(ours)
    rankwise.unmerge(ours)
    torch.testing.assert_close(ours[0].base_layer.bias, base[0].bias, **TOL)
    torch.testing.assert_close(ours[0].base_layer.bias, theirs.base_model.model[0].base_layer.bias, **TOL)
    torch.testing.assert_close(ours[0].base_layer.weight, base[0].weight, **TOL)


N_IN, RANK = 1024, 8  # 8192 draws per factor


def init_pair(init: bool | str):
    """A from PEFT and from rankwise, both drawn right after the same seed."""
    base = nn.Sequential(nn.Linear(N_IN, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, target_modules=["0"], init_lora_weights=init))
    torch.manual_seed(7)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=RANK, targets=["0"], init_weights=init))
    return theirs.base_model.model[0].lora_A["default"].weight, ours[0].adapter


def test_default_init_is_peft_kaiming_uniform_bound():
    """A ~ U(−1/√n, 1/√n) (kaiming_uniform with a=√5), B = 0."""
    theirs, adapter = init_pair(True)
    A = adapter.lora_A.weight
    assert torch.equal(A, theirs)
    bound = 1 / math.sqrt(N_IN)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.995 * bound
    assert abs(A.std().item() / (bound / math.sqrt(3)) - 1) < 0.02
    assert abs(A.mean().item()) < 0.05 * bound
    assert torch.count_nonzero(adapter.lora_B.weight) == 0


def test_gaussian_init_is_peft_normal_with_std_one_over_r():
    """A ~ N(0, 1/r²) (std 1/r, as PEFT's reset_lora_parameters), B = 0."""
    theirs, adapter = init_pair("gaussian")
    A = adapter.lora_A.weight
    assert torch.equal(A, theirs)
    assert abs(A.std().item() * RANK - 1) < 0.03
    assert abs(A.mean().item()) * RANK < 0.05
    assert A.abs().max() > 3 / RANK  # a normal, not a uniform of the same std (max √3·std)
    assert torch.count_nonzero(adapter.lora_B.weight) == 0


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_lora_bias_needs_the_default_init_like_peft(init):
    with pytest.raises(ValueError, match="lora_bias=True is only supported"):
        LoraConfig(r=2, target_modules=["0"], lora_bias=True, init_lora_weights=init)
    with pytest.raises(ValueError, match=f"lora_bias=True works with init_weights=True or False only.*{init}"):
        rankwise.LoRAConfig(r=2, lora_bias=True, init_weights=init)


@pytest.mark.parametrize("verb", ["merge", "unload"])
def test_bias_update_on_a_bias_less_layer_refuses_before_any_layer_merges(verb):
    """lora_bias=True on a model whose *last* target has no bias: merge / unload(merge=True) refuse naming that
    layer before the first layer is written or unwrapped, so the model is unchanged, still adapted, and
    unload(merge=False) afterwards gives the base model back exactly."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8, bias=False))
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=R, alpha=ALPHA, lora_bias=True, init_weights=False,
                                                                     targets=["0", "2"]))
    with torch.no_grad():
        for _, layer in rankwise.adapted_layers(ours):
            layer.adapter.lora_B.bias.normal_()
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"layer '2' \(out_features=8, in_features=24\) has a bias update.*no bias"):
        rankwise.merge(ours) if verb == "merge" else rankwise.unload(ours, merge=True)
    assert all(isinstance(ours[i], AdaptedLayer) and not ours[i].merged for i in (0, 2))
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(3, 16)
    torch.testing.assert_close(rankwise.unload(ours, merge=False)(x), base(x), atol=0, rtol=0)
