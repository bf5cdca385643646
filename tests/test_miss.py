"""MiSS / Bat oracle: PEFT 0.21.2's ``miss`` tuner with the same weights copied in.

Outputs, merged weights and gradients must agree to 1e-5 (float32); PEFT's adapter directories
must import into rankwise and rankwise's exports must load into PEFT with equal outputs. An
independent index formula (ΔW[o, c] = D[c mod r, o]) checks the default update without PEFT.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import MissConfig as PeftMissConfig
from peft import PeftModel, get_peft_model
from torch import nn
from toy_models import seeded_train_outputs

import rankwise

VARIANTS = [
    pytest.param({"r": 8, "init_weights": True}, id="default"),
    pytest.param({"r": 5, "init_weights": True}, id="default-partial-shard"),
    pytest.param({"r": 3, "init_weights": True}, id="default-odd-r"),
    pytest.param({"r": 8, "init_weights": "mini", "mini_r": 4}, id="mini"),
    pytest.param({"r": 8, "init_weights": "bat"}, id="bat"),
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 48)
        self.down = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def pair(kwargs: dict) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, rankwise model) with identical random blocks."""
    peft_kwargs = {("miss_dropout" if k == "dropout" else k): v for k, v in kwargs.items()}
    peft_model = get_peft_model(base_net(), PeftMissConfig(target_modules=["up", "down"], **peft_kwargs))
    ours = rankwise.adapt(base_net(), rankwise.config("miss", targets=["up", "down"], **kwargs))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            block = 0.1 * torch.randn(layer.adapter.miss_block.shape, generator=generator)
            layer.adapter.miss_block.copy_(block)
            peft_model.base_model.model.get_submodule(name).miss_block["default"].copy_(block)
    return peft_model, ours


def x_in() -> torch.Tensor:
    return torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kwargs", VARIANTS + [
    pytest.param({**v.values[0], "dropout": 0.5}, id=f"{v.id}-dropout") for v in VARIANTS
    if v.values[0]["init_weights"] != "bat"  # bat takes no dropout
])
def test_forward_and_gradients_match_peft(kwargs):
    """With dropout, in training mode: it acts on the zero-padded branch input only, with PEFT's mask,
    so seeding the global RNG before both forwards gives PEFT's numbers."""
    peft_model, ours = pair(kwargs)
    if kwargs.get("dropout"):
        out_ours, out_peft = seeded_train_outputs(ours, peft_model, x_in())
    else:
        out_peft, out_ours = peft_model(x_in()), ours(x_in())
    torch.testing.assert_close(out_ours, out_peft, atol=1e-5, rtol=1e-5)
    target = torch.randn(out_peft.shape, generator=torch.Generator().manual_seed(9))
    ((out_peft - target) ** 2).sum().backward()
    ((out_ours - target) ** 2).sum().backward()
    for name, layer in rankwise.adapted_layers(ours):
        peft_grad = peft_model.base_model.model.get_submodule(name).miss_block["default"].grad
        assert peft_grad is not None and peft_grad.abs().sum() > 0
        torch.testing.assert_close(layer.adapter.miss_block.grad, peft_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_merged_weights_match_peft_and_unmerge_restores(kwargs):
    peft_model, ours = pair(kwargs)
    original = {n: l.base_layer.weight.clone() for n, l in rankwise.adapted_layers(ours)}
    with torch.no_grad():
        peft_model.merge_adapter()
        rankwise.merge(ours)
        for name, layer in rankwise.adapted_layers(ours):
            peft_weight = peft_model.base_model.model.get_submodule(name).base_layer.weight
            assert not torch.allclose(peft_weight, original[name], atol=1e-3)
            torch.testing.assert_close(layer.base_layer.weight, peft_weight, atol=1e-5, rtol=1e-5)
        rankwise.unmerge(ours)
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.base_layer.weight, original[name], atol=1e-5, rtol=1e-5)


def test_random_init_is_peft_draw_with_fan_in_out_features():
    """init_weights=False: Kaiming-uniform(a=√5) on the (r, m) block, U(±1/√m); a seed gives PEFT's block."""
    theirs_base, our_base = base_net(), base_net()
    torch.manual_seed(5)
    peft_model = get_peft_model(theirs_base, PeftMissConfig(target_modules=["up", "down"], r=8, init_weights=False))
    torch.manual_seed(5)
    ours = rankwise.adapt(our_base, rankwise.config("miss", targets=["up", "down"], r=8, init_weights=False))
    for name, layer in rankwise.adapted_layers(ours):
        peft_block = peft_model.base_model.model.get_submodule(name).miss_block["default"]
        torch.testing.assert_close(layer.adapter.miss_block, peft_block, atol=0, rtol=0)
    block = rankwise.adapt(nn.Sequential(nn.Linear(128, 2048)),
                           rankwise.config("miss", r=64, init_weights=False))[0].adapter.miss_block.detach()
    bound = 1 / 2048**0.5
    assert block.shape == (64, 2048)
    assert block.abs().max() <= bound and block.abs().max() > 0.99 * bound
    assert abs(block.std().item() / (bound / 3**0.5) - 1) < 0.02


@pytest.mark.parametrize("kwargs, shape", [
    ({"r": 8, "init_weights": True}, (8, 48)),
    ({"r": 8, "init_weights": "mini", "mini_r": 4}, (8, 4)),
    ({"r": 8, "init_weights": "bat"}, (6, 8, 8)),
], ids=["default", "mini", "bat"])
def test_zero_inits_have_peft_shapes_and_leave_the_model_unchanged(kwargs, shape):
    peft_model = get_peft_model(base_net(), PeftMissConfig(target_modules=["up"], **kwargs))
    ours = rankwise.adapt(base_net(), rankwise.config("miss", targets=["up"], **kwargs))
    block = ours.up.adapter.miss_block
    assert block.shape == shape == peft_model.base_model.model.up.miss_block["default"].shape
    assert block.requires_grad and not block.any()
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base_net()(x), atol=0, rtol=0)


@pytest.mark.parametrize("singular", ["exact", "numerical"])
def test_bat_unmerge_refuses_a_singular_block_and_leaves_the_weight_merged(singular):
    """I + D_0 singular exactly (D_0 = −I) or only to working precision (rank one, where LU finds no
    zero pivot and a plain solve returns garbage): unmerge raises and changes nothing."""
    _, ours = pair({"r": 8, "init_weights": "bat"})
    generator = torch.Generator().manual_seed(2)
    u, v = torch.randn(8, 1, generator=generator), torch.randn(1, 8, generator=generator)
    with torch.no_grad():
        ours.up.adapter.miss_block[0] = -torch.eye(8) + (0 if singular == "exact" else u @ v)
        rankwise.merge(ours)
    merged = ours.up.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"'up' \(out_features=48, in_features=24, r=8\): I \+ D_0 .*singular"):
        rankwise.unmerge(ours)
    torch.testing.assert_close(ours.up.base_layer.weight, merged, atol=0, rtol=0)
    assert ours.up.merged


def test_default_update_equals_the_index_formula():
    """ΔW[o, c] = D[c mod r, o], written out with explicit loops (r = 5 does not divide n = 24)."""
    _, ours = pair({"r": 5, "init_weights": True})
    adapter = ours.up.adapter
    block = adapter.miss_block.detach()
    expected = torch.empty(48, 24)
    for o in range(48):
        for c in range(24):
            expected[o, c] = block[c % 5, o]
    torch.testing.assert_close(adapter.delta_weight(), expected, atol=0, rtol=0)


def test_float64_forward_matches_dense_formula():
    base = base_net().double()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.config("miss", targets=["up"], r=5, init_weights=False))
    x = x_in().double()
    block = model.up.adapter.miss_block.detach()
    columns = torch.arange(24) % 5
    dense = base.up.weight + block[columns, :].T
    torch.testing.assert_close(model.up(x), x @ dense.T + base.up.bias, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_peft_directory_imports(kwargs, tmp_path):
    peft_model, _ours = pair(kwargs)
    peft_model.save_pretrained(tmp_path / "peft")
    imported = rankwise.import_peft(base_net(), tmp_path / "peft")
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(imported(x), peft_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_export_loads_into_peft(kwargs, tmp_path):
    _, ours = pair(kwargs)
    rankwise.export_peft(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(base_net(), tmp_path / "ours")
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 32, "init_weights": True}, "in_features=24"),
        ({"r": 5, "init_weights": "bat"}, "divisible by r=5"),
        ({"r": 8, "init_weights": "mini", "mini_r": 5}, "mini_r=5"),
    ],
)
def test_shapes_that_do_not_fit_name_layer_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        rankwise.adapt(base_net(), rankwise.config("miss", targets=["up", "down"], **kwargs))
    assert "'up'" in str(error.value) or "'down'" in str(error.value)


def test_bat_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        rankwise.config("miss", init_weights="bat", dropout=0.1)


def test_defaults_fit_minilm_shapes():
    net = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 1536), nn.Linear(1536, 384))
    model = rankwise.adapt(net, rankwise.config("miss"))
    assert rankwise.trainable_parameters(model) == 64 * (384 + 1536 + 384)


@pytest.mark.parametrize("kwargs", [{"r": 8}, {"r": 8, "init_weights": "bat"}], ids=["default", "bat"])
def test_conv1d_layer_equals_the_same_linear_layer(kwargs):
    """GPT-2 Conv1D (weight stored in × out) sees the same (out, in) update as nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    linear = base_net().up
    conv = Conv1D(48, 24)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    lin_model = rankwise.adapt(nn.Sequential(linear), rankwise.config("miss", targets=["0"], **kwargs))
    conv_model = rankwise.adapt(nn.Sequential(conv), rankwise.config("miss", targets=["0"], **kwargs))
    with torch.no_grad():
        block = torch.randn(lin_model[0].adapter.miss_block.shape, generator=torch.Generator().manual_seed(1))
        lin_model[0].adapter.miss_block.copy_(0.1 * block)
        conv_model[0].adapter.miss_block.copy_(0.1 * block)
        x = x_in()
        torch.testing.assert_close(conv_model(x), lin_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("verb", ["unmerge", "unload", "set_adapter", "disable_adapters"])
def test_bat_unmerge_refusal_in_the_last_layer_leaves_every_layer_merged(verb):
    """A merged bat model whose *last* layer cannot be unmerged (I + D_0 = 0): unmerge, unload(merge=False),
    set_adapter (which unmerges first) and disable_adapters refuse before the first layer is unmerged or
    unwrapped, so the earlier layer stays merged with its weight bit for bit and the model stays adapted."""
    _, ours = pair({"r": 8, "init_weights": "bat"})
    rankwise.add_adapter(ours, "other", rankwise.LoRAConfig(r=2, targets=["up"]))
    with torch.no_grad():
        ours.down.adapter.miss_block[0] = -torch.eye(8)
    rankwise.merge(ours)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"'down' \(out_features=16, in_features=48, r=8\): I \+ D_0 .*singular"):
        if verb == "unmerge":
            rankwise.unmerge(ours)
        elif verb == "unload":
            rankwise.unload(ours, merge=False)
        elif verb == "set_adapter":
            rankwise.set_adapter(ours, "other")
        else:
            with rankwise.disable_adapters(ours):
                pass
    assert ours.up.merged and ours.down.merged and rankwise.active_adapter(ours) == "default"
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
