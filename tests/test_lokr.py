"""LoKr oracle tests: PEFT 0.21.2's ``lokr`` tuner with the same tensors, PEFT's factorization, and torch.kron."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoKrConfig, PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization
from test_gralora import assert_uniform
from test_loha import TARGETS, assert_dropouts_equal_peft, assert_equal_to_peft, base_net, pair, peft_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise
from rankwise.adapters.lokr import LoKrAdapter, factorization

# (rankwise = PEFT options, the tensors that hold W1 and W2 on the 16 -> 24 and 24 -> 24 layers)
LAYOUTS = {
    "w2 low-rank": ({"r": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "both low-rank": ({"r": 1, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    "full (r >= dims)": ({"r": 8}, {"lokr_w1", "lokr_w2"}),
    "full at r = max(b, d)/2": ({"r": 3}, {"lokr_w1", "lokr_w2"}),
    "factor 4": ({"r": 1, "decompose_factor": 4}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "factor 2, both": ({"r": 2, "decompose_factor": 2, "decompose_both": True}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_gradients_and_merge_equal_peft(layout, dtype):
    kwargs, tensors = LAYOUTS[layout]
    ours, theirs = pair("lokr", LoKrConfig, dtype, **kwargs)
    for _, layer in rankwise.adapted_layers(ours):
        assert {name for name, _ in layer.adapter.named_parameters()} == tensors
    assert_equal_to_peft(ours, theirs, dtype)


def test_factorization_is_peft_on_every_width():
    for dimension in range(1, 513):
        for factor in (-1, *range(1, 34)):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)
    assert factorization(768) == (24, 32) and factorization(11008) == (86, 128) and factorization(127) == (1, 127)


@pytest.mark.parametrize(("out_features", "in_features"), [(24, 16), (16, 24), (36, 36), (7, 35), (96, 64)])
def test_both_kronecker_orders_equal_torch_kron(out_features, in_features):
    """W1 X W2ᵀ in either multiplication order equals x (s·W1 ⊗ W2)ᵀ; ΔW is s·torch.kron(W1, W2)."""
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    adapter = LoKrAdapter(layer, rankwise.config("lokr", r=2, alpha=5.0, init_weights=False), "layer")
    w1, w2 = adapter.kron_factors()
    a, b, c, d = adapter.shape
    assert w1.shape == (a, c) and w2.shape == (b, d) and a * b == out_features and c * d == in_features
    delta = 2.5 * torch.kron(w1, w2)
    x = torch.randn(2, 3, in_features)
    for right_first in (True, False):
        adapter.right_first = right_first
        torch.testing.assert_close(adapter(x, layer(x)), layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.delta_weight(), delta, atol=0, rtol=0)


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
@pytest.mark.parametrize("layout", ["w2 low-rank", "both low-rank", "full (r >= dims)", "full at r = max(b, d)/2"])
def test_seeded_init_equals_peft(init_weights, layout):
    kwargs = LAYOUTS[layout][0]
    base = base_net()
    torch.manual_seed(4)
    theirs = get_peft_model(copy.deepcopy(base), LoKrConfig(target_modules=TARGETS, init_weights=init_weights, **kwargs))
    torch.manual_seed(4)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config("lokr", targets=TARGETS, init_weights=init_weights,
                                                               **kwargs))
    for name, layer in rankwise.adapted_layers(ours):
        for tensor, parameter in layer.adapter.named_parameters():
            torch.testing.assert_close(parameter, getattr(peft_layer(theirs, name), tensor)["default"], atol=0, rtol=0)


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
def test_init_bounds_pin_each_fan_in(init_weights):
    """2048 -> 2048 with factor 2: W1 (2 × 2), W2 = w2_a (1024 × 8) w2_b (8 × 1024): U(±1/√8), U(±1/√1024);
    True zeroes W1, "lycoris" zeroes w2_b, False zeroes nothing."""
    torch.manual_seed(0)
    adapter = LoKrAdapter(nn.Linear(2048, 2048), rankwise.config(
        "lokr", r=8, decompose_factor=2, init_weights=init_weights), "layer")
    assert adapter.shape == (2, 1024, 2, 1024)
    with torch.no_grad():
        assert_uniform(adapter.lokr_w2_a, 1 / 8**0.5)
        if init_weights == "lycoris":
            assert not adapter.lokr_w2_b.any()
        else:
            assert_uniform(adapter.lokr_w2_b, 1 / 1024**0.5)
        if init_weights is True:
            assert not adapter.lokr_w1.any()
        else:
            assert adapter.lokr_w1.abs().max() <= 1 / 2**0.5 and adapter.lokr_w1.all()


@pytest.mark.parametrize("rank_dropout_scale", [False, True])
def test_rank_dropout_equals_peft_under_the_same_seed(rank_dropout_scale):
    ours, theirs = pair("lokr", LoKrConfig, r=1, rank_dropout=0.5, rank_dropout_scale=rank_dropout_scale)
    assert_dropouts_equal_peft(ours, theirs, range(3))


def test_rank_dropout_mask_is_not_rescaled_by_default():
    """Without rank_dropout_scale the kept rows keep weight 1 (PEFT's LoKr; LoHa always rescales)."""
    ours, _ = pair("lokr", LoKrConfig, r=1, rank_dropout=0.5)
    layer = dict(rankwise.adapted_layers(ours))["proj"]
    x = torch.randn(4, 16)
    with torch.no_grad():
        full = layer.eval()(x) - layer.base_layer(x)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x) - layer.base_layer(x)
    torch.manual_seed(3)
    torch.rand(1)  # the module-dropout draw comes first
    keep = torch.rand(24) > 0.5
    assert 0 < keep.sum() < 24
    torch.testing.assert_close(dropped, full * keep, atol=1e-6, rtol=0)


def test_a_factor_that_does_not_divide_is_refused_unless_allowed(tmp_path):
    """PEFT silently falls back to its search for a decompose_factor that does not divide a width; a fresh
    rankwise adapter refuses it (naming the layer, the split PEFT would use and the fix), a PEFT file imports."""
    with pytest.raises(ValueError, match=r"layer 'proj' \(out_features=24, in_features=16\): decompose_factor=5 "
                                         r"does not divide.*\(4, 6\) x \(4, 4\).*gcd\(24, 16\) = 8.*allow_factor_fall"):
        rankwise.adapt(base_net(), rankwise.config("lokr", decompose_factor=5, targets=TARGETS))
    base = base_net()
    theirs = get_peft_model(copy.deepcopy(base), LoKrConfig(target_modules=TARGETS, r=1, decompose_factor=5,
                                                            init_weights=False))
    theirs.save_pretrained(tmp_path)
    imported = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(imported(x), theirs.eval()(x), atol=1e-6, rtol=1e-6)
    assert rankwise.adapter_config(imported).allow_factor_fallback


def test_peft_files_both_ways(tmp_path):
    ours, theirs = pair("lokr", LoKrConfig, r=1, decompose_both=True, decompose_factor=4, rank_dropout=0.1,
                        rank_dropout_scale=True, init_weights="lycoris")
    with torch.no_grad():  # lycoris zeroes W2; make the update non-trivial in both
        for name, layer in rankwise.adapted_layers(ours):
            layer.adapter.lokr_w2_b.add_(0.3)
            peft_layer(theirs, name).lokr_w2_b["default"].add_(0.3)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = theirs.eval()(x)
        rankwise.export_peft(ours, tmp_path / "ours")
        written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert written["peft_type"] == "LOKR" and written["init_weights"] == "lycoris" and "bias" not in written
        assert (written["decompose_both"], written["decompose_factor"], written["rank_dropout_scale"]) == (True, 4, True)
        reloaded = PeftModel.from_pretrained(base_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(reloaded(x), expected, atol=1e-6, rtol=1e-6)
        theirs.save_pretrained(tmp_path / "theirs")
        imported = rankwise.import_peft(base_net(), tmp_path / "theirs").eval()
        torch.testing.assert_close(imported(x), expected, atol=1e-6, rtol=1e-6)


def test_conv1d_adapter_is_refused_by_export_peft(tmp_path):
    model = rankwise.adapt(nn.Sequential(Conv1D(8, 16)), rankwise.config("lokr", r=2, targets=["0"]))
    with pytest.raises(ValueError, match="fan_in_fan_out=True: PEFT's LoKr does not adapt transformers Conv1D"):
        rankwise.export_peft(model, tmp_path)
