"""LoHa oracle tests: PEFT 0.21.2's ``loha`` tuner with the same tensors, and the Hadamard formula densely.

The helpers here (a PEFT / rankwise pair holding the same tensors, gradient comparison) serve
tests/test_lokr.py too: LoHa and LoKr share PEFT's LyCORIS layer and rankwise's option names.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from test_gralora import assert_uniform
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise
from rankwise.adapters.loha import LoHaAdapter

TARGETS = ["proj", "out"]


class Net(nn.Module):
    """A rectangular (16 -> 24) and a square (24 -> 24) layer."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.out = nn.Linear(24, 24)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


def base_net(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net(dtype)


def peft_layer(theirs: nn.Module, name: str) -> nn.Module:
    return theirs.base_model.model.get_submodule(name)


def pair(method: str, peft_cls: type, dtype: torch.dtype = torch.float32, base: nn.Module | None = None,
         **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """PEFT's adapter and ours on copies of one base, ours holding PEFT's (random unless told) tensors.

    rankwise's LoHa / LoKr options carry PEFT's names, so ``kwargs`` go to both configs unchanged.
    """
    base = base_net(dtype) if base is None else base
    kwargs = {"alpha": 3.0, "init_weights": False, **kwargs}
    theirs = get_peft_model(copy.deepcopy(base), peft_cls(target_modules=TARGETS, **kwargs))
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(method, targets=TARGETS, **kwargs))
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            for tensor, parameter in layer.adapter.named_parameters():
                parameter.copy_(getattr(peft_layer(theirs, name), tensor)["default"])
    return ours, theirs


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}


def assert_same_gradients(ours: nn.Module, theirs: nn.Module, **tol: float) -> None:
    """Every adapter tensor's gradient equals PEFT's (the names are PEFT's); None where PEFT's is None (a
    module-dropped layer)."""
    for name, layer in rankwise.adapted_layers(ours):
        for tensor, parameter in layer.adapter.named_parameters():
            expected = getattr(peft_layer(theirs, name), tensor)["default"].grad
            if expected is None:
                assert parameter.grad is None, f"{name}.{tensor}"
            else:
                torch.testing.assert_close(parameter.grad, expected, **tol, msg=f"{name}.{tensor}")


def assert_equal_to_peft(ours: nn.Module, theirs: nn.Module, dtype: torch.dtype) -> None:
    """Outputs, every gradient, ΔW, merged weights and the merged/unmerged forward equal PEFT's."""
    tol = tolerance(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out_ours, out_theirs = ours(x), theirs(x)
    with torch.no_grad(), theirs.disable_adapter():
        assert not torch.allclose(theirs(x), out_theirs, atol=1e-3)  # the adapter is non-trivial
    torch.testing.assert_close(out_ours, out_theirs, **tol)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    assert_same_gradients(ours, theirs, **tol)
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.adapter.delta_weight(), peft_layer(theirs, name).get_delta_weight("default"),
                                       **tol)
        rankwise.merge(ours)
        theirs.merge_adapter()
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.base_layer.weight, peft_layer(theirs, name).base_layer.weight, **tol)
        torch.testing.assert_close(ours(x), theirs(x), **tol)
        rankwise.unmerge(ours)
        theirs.unmerge_adapter()
        torch.testing.assert_close(ours(x), out_theirs, **tol)


def seeded_training_pair(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Both models' training-mode outputs with the global RNG seeded before each forward."""
    outputs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(seed)
        outputs.append(model(x))
    return tuple(outputs)


def assert_dropouts_equal_peft(ours: nn.Module, theirs: nn.Module, seeds: range) -> None:
    """Training forwards (and gradients) equal PEFT's seed by seed; the dropouts changed something; eval has none."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ours.eval()(x)
        torch.testing.assert_close(plain, theirs.eval()(x), atol=1e-5, rtol=1e-5)
    changed = 0
    for seed in seeds:
        out_ours, out_theirs = seeded_training_pair(ours, theirs, x, seed)
        torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
        changed += not torch.allclose(out_ours, plain, atol=1e-4)
        ours.zero_grad()
        theirs.zero_grad()
        if out_theirs.requires_grad:  # not when module dropout skipped every layer
            out_ours.square().sum().backward()
            out_theirs.square().sum().backward()
        assert_same_gradients(ours, theirs, atol=1e-5, rtol=1e-5)
    assert changed, "the dropout never changed the output"


def force_path(model: nn.Module, khatri_rao: bool) -> None:
    for _, layer in rankwise.adapted_layers(model):
        layer.adapter.khatri_rao = khatri_rao


@pytest.mark.parametrize("khatri_rao", [True, False], ids=["khatri-rao", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_gradients_and_merge_equal_peft(khatri_rao, dtype):
    ours, theirs = pair("loha", LoHaConfig, dtype, r=2)
    force_path(ours, khatri_rao)
    assert_equal_to_peft(ours, theirs, dtype)


@pytest.mark.parametrize(("out_features", "in_features", "r", "expected"), [
    (24, 16, 2, True), (24, 24, 3, True), (24, 24, 4, False), (8, 8, 2, False), (768, 768, 16, True),
    (768, 768, 24, False), (4096, 11008, 32, True)])
def test_forward_path_is_chosen_by_cost(out_features, in_features, r, expected):
    """Khatri-Rao exactly when r²(m + n) < m·n (the per-token MACs of the two paths)."""
    adapter = LoHaAdapter(nn.Linear(in_features, out_features, device="meta"), rankwise.config("loha", r=r), "layer")
    assert adapter.khatri_rao is expected


def test_both_paths_equal_the_dense_formula_with_leading_dimensions():
    torch.manual_seed(0)
    layer = nn.Linear(40, 56)
    adapter = LoHaAdapter(layer, rankwise.config("loha", r=3, alpha=5.0, init_weights=False), "layer")
    w1, w2 = adapter.hada_w1_a @ adapter.hada_w1_b, adapter.hada_w2_a @ adapter.hada_w2_b
    delta = (5.0 / 3) * w1 * w2  # the formula, from the factors
    x = torch.randn(2, 3, 40)
    expected = layer(x) + x @ delta.T
    for khatri_rao in (True, False):
        adapter.khatri_rao = khatri_rao
        torch.testing.assert_close(adapter(x, layer(x)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.delta_weight(), delta, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init_weights", [True, False])
def test_seeded_init_equals_peft(init_weights):
    base = base_net()
    torch.manual_seed(4)
    theirs = get_peft_model(copy.deepcopy(base), LoHaConfig(target_modules=TARGETS, r=3, init_weights=init_weights))
    torch.manual_seed(4)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config("loha", r=3, init_weights=init_weights, targets=TARGETS))
    for name, layer in rankwise.adapted_layers(ours):
        for tensor, parameter in layer.adapter.named_parameters():
            torch.testing.assert_close(parameter, getattr(peft_layer(theirs, name), tensor)["default"], atol=0, rtol=0)


@pytest.mark.parametrize("init_weights", [True, False])
def test_init_bounds_pin_each_fan_in(init_weights):
    """w1_a, w2_a (m × r): U(±1/√r); w1_b (r × n): U(±1/√n); w2_b: 0, or U(±1/√n) with init_weights=False."""
    m, n, r = 1024, 512, 16
    torch.manual_seed(0)
    adapter = LoHaAdapter(nn.Linear(n, m), rankwise.config("loha", r=r, init_weights=init_weights), "layer")
    with torch.no_grad():
        assert_uniform(adapter.hada_w1_a, 1 / r**0.5)
        assert_uniform(adapter.hada_w2_a, 1 / r**0.5)
        assert_uniform(adapter.hada_w1_b, 1 / n**0.5)
        if init_weights:
            assert not adapter.hada_w2_b.any()
        else:
            assert_uniform(adapter.hada_w2_b, 1 / n**0.5)


@pytest.mark.parametrize("khatri_rao", [True, False], ids=["khatri-rao", "dense"])
def test_rank_dropout_equals_peft_under_the_same_seed(khatri_rao):
    """Output rows of ΔW dropped with PEFT's mask, rescaled by its mean, in training only."""
    ours, theirs = pair("loha", LoHaConfig, r=2, rank_dropout=0.5)
    force_path(ours, khatri_rao)
    assert_dropouts_equal_peft(ours, theirs, range(3))


@pytest.mark.parametrize(("method", "peft_cls"), [("loha", LoHaConfig), ("lokr", LoKrConfig)])
def test_module_dropout_equals_peft_under_the_same_seed(method, peft_cls):
    """One torch.rand(1) per training forward decides whether the adapter runs: PEFT's draw, PEFT's skips
    (LoHa and LoKr share the rule)."""
    ours, theirs = pair(method, peft_cls, r=1, module_dropout=0.5, rank_dropout=0.25)
    assert_dropouts_equal_peft(ours, theirs, range(6))


def test_module_dropout_skips_the_whole_adapter():
    ours, _ = pair("loha", LoHaConfig, r=2, module_dropout=0.5)
    x = torch.randn(4, 16)
    with torch.no_grad():
        ours.eval()
        with rankwise.disable_adapters(ours):
            base = ours(x)
        adapted = ours(x)
        ours.train()
        outcomes = set()
        for seed in range(8):
            torch.manual_seed(seed)
            out = ours(x)
            outcomes |= {name for name, ref in (("base", base), ("adapted", adapted)) if torch.allclose(out, ref)}
    assert outcomes == {"base", "adapted"}


def test_all_rows_dropped_gives_a_zero_update_where_peft_gives_nan():
    ours, theirs = pair("loha", LoHaConfig, r=2, rank_dropout=0.99)
    x = torch.randn(4, 16)
    layer, peft = dict(rankwise.adapted_layers(ours))["proj"], peft_layer(theirs, "proj")
    seed = next(s for s in range(1000) if not (torch.manual_seed(s) and (torch.rand(24) > 0.99).any()))
    layer.train()
    peft.train()
    torch.manual_seed(seed)
    out = layer(x)
    torch.manual_seed(seed)
    assert torch.isnan(peft(x)).all()
    torch.testing.assert_close(out, layer.base_layer(x), atol=0, rtol=0)


def test_peft_files_both_ways(tmp_path):
    ours, theirs = pair("loha", LoHaConfig, r=2, rank_dropout=0.1, module_dropout=0.2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = theirs.eval()(x)
        rankwise.export_peft(ours, tmp_path / "ours")
        written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert written["peft_type"] == "LOHA" and written["rank_dropout"] == 0.1 and written["module_dropout"] == 0.2
        assert "bias" not in written  # PEFT's LoHaConfig has no such field and would warn about it
        reloaded = PeftModel.from_pretrained(base_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(reloaded(x), expected, atol=1e-6, rtol=1e-6)
        theirs.save_pretrained(tmp_path / "theirs")
        imported = rankwise.import_peft(base_net(), tmp_path / "theirs").eval()
        torch.testing.assert_close(imported(x), expected, atol=1e-6, rtol=1e-6)
        config = rankwise.adapter_config(imported)
        assert (config.r, config.alpha, config.rank_dropout, config.module_dropout) == (2, 3.0, 0.1, 0.2)


def test_peft_file_with_rank_above_min_shape_imports(tmp_path):
    """PEFT accepts r > min(out, in) (wasted rank); a file it loads imports, a fresh adapt refuses."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 4))
    theirs = get_peft_model(copy.deepcopy(base), LoHaConfig(target_modules=["0"], r=6, init_weights=False))
    theirs.save_pretrained(tmp_path)
    imported = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(imported(x), theirs.eval()(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"layer '0' \(out_features=4, in_features=16\): rank r=6 exceeds min"
                                         r".*Use r <= 4.*allow_excess_rank=True"):
        rankwise.adapt(copy.deepcopy(base), rankwise.config("loha", r=6, targets=["0"]))


def test_conv1d_adapter_is_refused_by_export_peft(tmp_path):
    """PEFT's LoHa raises TypeError on transformers Conv1D layers, so no PEFT file could hold this adapter."""
    model = rankwise.adapt(nn.Sequential(Conv1D(8, 16)), rankwise.config("loha", r=2, targets=["0"]))
    with pytest.raises(ValueError, match="fan_in_fan_out=True: PEFT's LoHa does not adapt transformers Conv1D"):
        rankwise.export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())
