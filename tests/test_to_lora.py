"""rankwise.to_lora: every method's W' − W as a LoRA (truncated SVD), its error, and PEFT loading the export.

Oracles: the source model's own outputs (full rank is exact for every registered method), an independent
float64 SVD of W' − W computed here (Eckart–Young: the rank-k error is sqrt(Σ_{i>k} σ_i²) / ‖ΔW‖_F and the
truncation is U_k Σ_k V_kᵀ), hand-built spectra for the energy rule, and PEFT 0.21.2 loading the export.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from method_cases import CASES
from test_method_suite import METHODS, ToyGPT, ToyMLP, build, inputs, make, perturb
from torch import Tensor, nn

import rankwise
from rankwise.adapters.lora import LoRAAdapter
from rankwise.core.layer import Adapter, weight_matrix
from rankwise.core.rank import _ALLOCATOR_ATTR

peft = pytest.importorskip("peft")
from peft import PeftModel


def source(name: str, model_cls: type[nn.Module] = ToyMLP, dtype: torch.dtype = torch.float32, **extra) -> nn.Module:
    """Method ``name`` on the toy model with a non-trivial update."""
    _, model = build(name, model_cls, dtype, **{**CASES[name].random_init, **extra})
    perturb(model)
    return model


def convert(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SingLoRA warns that its ramp is below 1, as merging does
        return rankwise.to_lora(model, **kwargs)


@torch.no_grad()
def dense_update(layer) -> Tensor:
    """W' − W of one source layer in float64, from the adapter's merged weight (as ``rankwise.merge`` writes it)."""
    weight = weight_matrix(layer.base_layer).double()
    adapter = copy.deepcopy(layer.adapter).double()
    return adapter.merged_weight(weight.clone()) - weight


def state(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Full rank: exact for every method
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(("model_cls", "dtype", "tol"), [(ToyMLP, torch.float64, 1e-10), (ToyMLP, torch.float32, 1e-5),
                                                         (ToyGPT, torch.float64, 1e-10)], ids=["f64", "f32", "conv1d"])
def test_full_rank_reproduces_every_method(name, model_cls, dtype, tol):
    if model_cls is ToyGPT and not CASES[name].conv1d:
        pytest.skip("no Conv1D support")
    model = source(name, model_cls, dtype)
    x = inputs(dtype)
    before = state(model)
    with torch.no_grad():
        expected = model(x)
        lora = convert(model, rank=64)  # clamped to min(out, in) per layer
        torch.testing.assert_close(lora(x), expected, atol=tol, rtol=tol)
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert_same_state(model, before)  # the source model is left as it was
    assert rankwise.adapter_config(model).method == name
    assert rankwise.adapter_config(lora).method == "lora"
    report = rankwise.to_lora_report(lora)
    assert report.method == name
    assert list(report.layers) == [layer_name for layer_name, _ in rankwise.adapted_layers(model)]
    for layer_name, layer in rankwise.adapted_layers(lora):
        assert isinstance(layer.adapter, LoRAAdapter)
        assert layer.adapter.scaling == 1.0  # alpha = r
        assert layer.adapter.r == report.layers[layer_name].rank == report.layers[layer_name].max_rank
        assert report.layers[layer_name].relative_error == 0.0


def test_merged_source_converts_its_update_and_stays_merged():
    model = source("dora", dtype=torch.float64)
    x = inputs(torch.float64)
    with torch.no_grad():
        expected = model(x)
        rankwise.merge(model)
        before = state(model)
        lora = convert(model, rank=64)
        torch.testing.assert_close(lora(x), expected, atol=1e-10, rtol=1e-10)
    assert all(layer.merged for _, layer in rankwise.adapted_layers(model))
    assert not any(layer.merged for _, layer in rankwise.adapted_layers(lora))
    assert_same_state(model, before)
    for layer_name, layer in rankwise.adapted_layers(lora):  # the LoRA sits on the unmerged base W
        original = make(ToyMLP, torch.float64).get_submodule(layer_name)
        torch.testing.assert_close(layer.base_layer.weight, original.weight, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["dora", "bora"])
def test_small_update_of_a_float32_model_keeps_float32_precision(name):
    """W' − W is formed in float64: for an update 1e-3 of W's size, a float32 subtraction would lose two digits
    (relative error ~2e-5 measured); the float64 one leaves only the float32 rounding of the factors (~2e-7)."""
    _, model = build(name)  # default init: the update is only the small perturbation
    perturb(model, scale=1e-3)
    lora = convert(model, rank=64)
    for layer_name, layer in rankwise.adapted_layers(model):
        delta = dense_update(layer)
        error = torch.linalg.matrix_norm(delta - rankwise_delta(lora, layer_name)) / torch.linalg.matrix_norm(delta)
        assert error < 1e-6


def test_allocator_and_its_optimizer_stay_with_the_source():
    """An ElaLoRA model with its allocator and optimizer: the LoRA gets neither, the source keeps both."""
    model = source("elalora")
    allocator = rankwise.allocator(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    allocator.attach_optimizer(optimizer)
    model(inputs()).square().mean().backward()
    optimizer.step()
    optimizer.__deepcopy__ = lambda memo: pytest.fail("to_lora copied the optimizer")
    lora = convert(model, rank=64)
    assert _ALLOCATOR_ATTR not in lora.__dict__
    assert rankwise.allocator(lora) is None
    assert rankwise.allocator(model) is allocator and allocator.optimizer is optimizer
    with torch.no_grad():
        torch.testing.assert_close(lora(inputs()), model(inputs()), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Lower rank: Eckart–Young
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dora", "bora", "c3a", "surm", "loldu"])
def test_lower_rank_is_the_eckart_young_truncation(name):
    """ΔW_k = U_k Σ_k V_kᵀ of an independent SVD, and the error is sqrt(Σ_{i>k} σ_i²)/‖ΔW‖_F, measured and reported.

    Each layer's k is the first k >= 3 with σ_k > σ_{k+1}, where the truncation is unique (circulant
    updates, C3A's and SURM's, have equal pairs of σ)."""
    model = source(name, dtype=torch.float64)
    spectra = {name_: torch.linalg.svd(dense_update(layer), full_matrices=False)
               for name_, layer in rankwise.adapted_layers(model)}
    ranks = {name_: next(k for k in range(3, len(S)) if S[k - 1] > S[k] * (1 + 1e-6))
             for name_, (_, S, _) in spectra.items()}
    lora = convert(model, rank=ranks)
    report = rankwise.to_lora_report(lora)
    for layer_name, layer in rankwise.adapted_layers(model):
        k, delta = ranks[layer_name], dense_update(layer)
        U, S, Vh = spectra[layer_name]
        approx = rankwise_delta(lora, layer_name)
        torch.testing.assert_close(approx, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], atol=1e-10, rtol=1e-10)
        expected = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
        assert 0.01 < expected < 0.99
        measured = float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))
        assert measured == pytest.approx(expected, rel=1e-9)
        assert report.layers[layer_name].relative_error == pytest.approx(expected, rel=1e-9)
        assert report.layers[layer_name].rank == lora.get_submodule(layer_name).adapter.r == k


def rankwise_delta(model: nn.Module, layer_name: str) -> Tensor:
    with torch.no_grad():
        return model.get_submodule(layer_name).adapter.delta_weight().double()


def test_rank_dict_sets_each_layer_and_names_layers_exactly(tmp_path):
    """{full name: k} per layer; two layers sharing a suffix ("up", "inner.up") keep their own ranks, in PEFT too."""

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(32, 32)
            self.inner = ToyMLP()

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(torch.tanh(self.up(x)))

    torch.manual_seed(0)
    base = Nested().double().eval()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=8, alpha=8, init_weights=False))
    ranks = {"up": 2, "inner.up": 5, "inner.mid": 5, "inner.down": 7, "inner.square": 8}
    lora = convert(model, rank=ranks)
    assert {name: layer.adapter.r for name, layer in rankwise.adapted_layers(lora)} == ranks
    assert {name: layer.rank for name, layer in rankwise.to_lora_report(lora).layers.items()} == ranks
    x = inputs(torch.float64)
    with torch.no_grad():  # rank 8 is the source's own rank: that layer is exact
        torch.testing.assert_close(rankwise_delta(lora, "inner.square"),
                                   rankwise_delta(model, "inner.square"), atol=1e-12, rtol=1e-12)
        assert not torch.allclose(lora(x), model(x), atol=1e-3)
    rankwise.export_peft(lora, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert peft_ranks(theirs) == ranks
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), lora(x), atol=1e-10, rtol=1e-10)


def peft_ranks(model: PeftModel) -> dict[str, int]:
    """{layer name: r} of a PEFT LoRA model's layers."""
    return {name: module.r["default"] for name, module in model.base_model.model.named_modules()
            if hasattr(module, "lora_B") and isinstance(getattr(module, "r", None), dict)}


# ----------------------------------------------------------------------------------------------
# The energy rule
# ----------------------------------------------------------------------------------------------

SPECTRUM = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # σ²: 16, 4, 1, 0.25 of 21.25


@torch.no_grad()
def lora_with_spectrum() -> nn.Module:
    """LoRA (s = 1) on every toy layer with ΔW = U diag(SPECTRUM) Vᵀ, U and V orthonormal."""
    model = rankwise.adapt(make(ToyMLP, torch.float64), rankwise.LoRAConfig(r=4, alpha=4, init_weights=False))
    generator = torch.Generator().manual_seed(7)
    for _, layer in rankwise.adapted_layers(model):
        out_features, in_features = layer.adapter.out_features, layer.adapter.in_features
        U = torch.linalg.qr(torch.randn(out_features, 4, generator=generator, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(in_features, 4, generator=generator, dtype=torch.float64))[0]
        layer.adapter.lora_B.weight.copy_(U * SPECTRUM)
        layer.adapter.lora_A.weight.copy_(V.T)
    return model


@pytest.mark.parametrize(("energy", "k"), [(0.75, 1), (16 / 21.25, 1), (0.76, 2), (20 / 21.25, 2), (0.95, 3),
                                           (0.99, 4), (1.0, 4)])
def test_energy_keeps_the_smallest_rank_reaching_the_fraction(energy, k):
    """k = the smallest rank with Σ_{i<=k} σ_i² >= e·Σσ²: exact fractions (16/21.25, 20/21.25) reach it, and
    e = 1 stops at the true rank 4 (the float64 rounding tail of the 32-wide SVD does not count)."""
    model = lora_with_spectrum()
    lora = convert(model, energy=energy)
    report = rankwise.to_lora_report(lora)
    expected_error = float(SPECTRUM[k:].square().sum().sqrt() / SPECTRUM.square().sum().sqrt())
    for layer_name, layer in rankwise.adapted_layers(lora):
        assert layer.adapter.r == report.layers[layer_name].rank == k
        assert report.layers[layer_name].relative_error == pytest.approx(expected_error, rel=1e-9, abs=1e-12)
        singular = torch.linalg.svdvals(rankwise_delta(lora, layer_name))
        torch.testing.assert_close(singular[:k], SPECTRUM[:k], atol=1e-12, rtol=1e-12)


def test_zero_update_converts_to_a_zero_lora():
    """ΔW = 0 (LoRA at its default init): energy keeps rank 1, the error is 0 and the LoRA adds nothing."""
    model = rankwise.adapt(make(), rankwise.LoRAConfig(r=4))
    lora = convert(model, energy=0.5)
    report = rankwise.to_lora_report(lora)
    assert all(layer.rank == 1 and layer.relative_error == 0.0 for layer in report.layers.values())
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(lora(x), make()(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# What carries over: bias updates, modules_to_save
# ----------------------------------------------------------------------------------------------


def test_lora_bias_is_carried():
    model = source("lora", dtype=torch.float64, lora_bias=True)
    x = inputs(torch.float64)
    lora = convert(model, rank=64)
    assert rankwise.adapter_config(lora).lora_bias
    for layer_name, layer in rankwise.adapted_layers(model):
        assert rankwise.to_lora_report(lora).layers[layer_name].bias
        assert layer.adapter.delta_bias().abs().max() > 0
        torch.testing.assert_close(lora.get_submodule(layer_name).adapter.delta_bias(), layer.adapter.delta_bias(),
                                   atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), model(x), atol=1e-10, rtol=1e-10)


def test_modules_to_save_carry_their_trained_copy():
    model = source("bora", dtype=torch.float64, modules_to_save=["square"])
    with torch.no_grad():
        model.square.trained_module.weight.add_(0.5)
    x = inputs(torch.float64)
    lora = convert(model, rank=64)
    assert rankwise.adapter_config(lora).modules_to_save == ["square"]
    assert rankwise.to_lora_report(lora).modules_to_save == ["square"]
    torch.testing.assert_close(lora.square.trained_module.weight, model.square.trained_module.weight, atol=0, rtol=0)
    torch.testing.assert_close(lora.square.original_module.weight, make(ToyMLP, torch.float64).square.weight,
                               atol=0, rtol=0)
    assert lora.square.trained_module is not model.square.trained_module
    with torch.no_grad():
        torch.testing.assert_close(lora(x), model(x), atol=1e-10, rtol=1e-10)
    assert rankwise.trainable_parameters(lora) == sum(
        p.numel() for _, layer in rankwise.adapted_layers(lora) for p in layer.adapter.parameters()
    ) + sum(p.numel() for p in lora.square.trained_module.parameters())


# ----------------------------------------------------------------------------------------------
# PEFT loads the export
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_peft_loads_the_export(name, tmp_path):
    """Per-layer ranks from the energy rule (rank_pattern / alpha_pattern) and a modules_to_save module."""
    model = source(name, modules_to_save=["square"])
    with torch.no_grad():
        model.square.trained_module.bias.add_(0.25)
    lora = convert(model, energy=0.9)
    rankwise.export_peft(lora, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(make(), tmp_path / "peft").eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), lora(x), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer")  # "down" has no bias
def test_peft_loads_an_exported_bias_and_per_layer_ranks(tmp_path):
    model = source("lora", lora_bias=True)
    lora = convert(model, rank={"up": 2, "mid": 3, "down": 3, "square": 4})
    rankwise.export_peft(lora, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(make(), tmp_path / "peft").eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), lora(x), atol=1e-5, rtol=1e-5)
    assert peft_ranks(theirs) == {"up": 2, "mid": 3, "down": 3, "square": 4}


def test_rankwise_save_and_load_round_trip(tmp_path):
    """The LoRA model (regex targets, rank / alpha patterns, modules_to_save) saves and loads like any adapter."""
    lora = convert(source("c3a", modules_to_save=["square"]), energy=0.9)
    rankwise.save(lora, tmp_path / "lora")
    restored = rankwise.load(make(), tmp_path / "lora").eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), lora(x), atol=0, rtol=0)
    assert rankwise.adapter_config(restored) == rankwise.adapter_config(lora)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

ALL_LAYERS = {"up": 2, "mid": 2, "down": 2, "square": 2}


@pytest.mark.parametrize("kwargs", [
    {"rank": 0}, {"rank": -1}, {"rank": True}, {"rank": 2.0}, {"rank": "2"},
    {"energy": 0}, {"energy": 1.5}, {"energy": -0.1}, {"energy": True}, {"energy": float("nan")}, {"energy": "0.5"},
    {"rank": 2, "energy": 0.5}, {},
    {"rank": {"up": 2}}, {"rank": {**ALL_LAYERS, "nope": 2}}, {"rank": {**ALL_LAYERS, "up": 0}},
], ids=str)
def test_bad_rank_or_energy_raises_before_anything_changes(kwargs):
    model = source("lora")
    before = state(model)
    with pytest.raises(ValueError, match="to_lora"):
        rankwise.to_lora(model, **kwargs)
    assert_same_state(model, before)


def test_unadapted_model_raises():
    with pytest.raises(ValueError, match="carries no rankwise adapter"):
        rankwise.to_lora(make(), rank=4)
    with pytest.raises(ValueError, match="to_lora"):
        rankwise.to_lora_report(make())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_is_refused(init):
    model = rankwise.adapt(make(), rankwise.LoRAConfig(r=4, init_weights=init))
    with pytest.raises(ValueError, match=f"init_weights='{init}'.*unload"):
        rankwise.to_lora(model, rank=4)


class Opaque(Adapter):
    """An adapter with a forward but no dense form (no delta_weight / merged_weight)."""

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        return base_out + torch.tanh(x).sum(dim=-1, keepdim=True)


def test_method_that_cannot_merge_is_refused_naming_it():
    model = source("lora")
    layer = model.get_submodule("mid")
    layer.adapter = Opaque(layer.base_layer, rankwise.adapter_config(model), "mid")
    before = state(model)
    with pytest.raises(ValueError, match=r"method 'lora' cannot merge \(Opaque on layer 'mid', 48 x 64"):
        rankwise.to_lora(model, rank=4)
    assert_same_state(model, before)


def test_report_table_lists_every_layer():
    lora = convert(source("dora"), rank=3)
    table = rankwise.to_lora_report(lora).table()
    for name, shape, rank in (("up", "64 x 32", "3/32"), ("mid", "48 x 64", "3/48"), ("down", "32 x 48", "3/32"),
                              ("square", "32 x 32", "3/32")):
        assert any(line.startswith(name) and shape in line and rank in line for line in table.splitlines())
    assert table.splitlines()[-1].startswith("dora -> lora: 4 layers")
