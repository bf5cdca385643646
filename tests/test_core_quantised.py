"""Quantised layers (bitsandbytes 0.50 on CPU, torchao-, GPTQ- and HQQ-style fakes) are refused by every
entry that factorises layers, and every quantised layer but a quantised bitsandbytes Linear4bit / Linear8bitLt by
every entry that wraps layers, before the model changes, instead of being treated as float Linears. What the
adapters do with bitsandbytes layers is tested in tests/test_qlora.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.compress import TRP, Cuttlefish, CuttlefishConfig, TRPConfig
from rankwise.core.layer import AdaptedLayer

bnb = pytest.importorskip("bitsandbytes")

SUPPORTED = r"nn\.Linear and transformers Conv1D layers with floating-point weights"


class Net(nn.Module):
    """``proj`` is the layer under test; ``out`` and ``head`` are plain float Linears."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(self.proj(x)))


class FakeAffineQuantizedTensor(torch.Tensor):
    """A torchao-style weight: a Tensor subclass that nn.Parameter keeps as it is (float dtype)."""


def torchao_style() -> nn.Linear:
    layer = nn.Linear(16, 16)
    layer.weight = nn.Parameter(torch.Tensor._make_subclass(FakeAffineQuantizedTensor, layer.weight.detach()),
                                requires_grad=False)
    return layer


class QuantLinear(nn.Module):
    """A GPTQ-style layer: not an nn.Linear, a packed int32 ``qweight`` buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = self.out_features = 16
        self.register_buffer("qweight", torch.zeros(2, 16, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scales


QuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda"


class HQQLinear(nn.Module):
    """An HQQ-style layer: ``W_q`` holds the quantised weight (class from no known package)."""

    def __init__(self) -> None:
        super().__init__()
        self.W_q = nn.Parameter(torch.zeros(128, 1, dtype=torch.uint8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def float8_linear() -> nn.Linear:
    layer = nn.Linear(16, 16)
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    return layer


LAYERS = {
    "bnb-int8": (lambda: bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False).to("cpu"), "Linear8bitLt",
                 "quantisation package 'bitsandbytes'"),
    "bnb-4bit": (lambda: bnb.nn.Linear4bit(16, 16).to("cpu"), "Linear4bit", "quantisation package 'bitsandbytes'"),
    "bnb-4bit-not-yet-moved": (lambda: bnb.nn.Linear4bit(16, 16), "Linear4bit", "quantisation package 'bitsandbytes'"),
    "torchao": (torchao_style, "Linear", "FakeAffineQuantizedTensor, a tensor subclass"),
    "gptq": (QuantLinear, "QuantLinear", "quantisation package 'auto_gptq'"),
    "hqq": (HQQLinear, "HQQLinear", "quantised weight 'W_q'"),
    "float8": (float8_linear, "Linear", r"dtype torch\.float8_e4m3fn"),
}


def quantised_net(kind: str) -> Net:
    torch.manual_seed(0)
    return Net(LAYERS[kind][0]())


def refusal(kind: str) -> str:
    _, cls, reason = LAYERS[kind]
    return rf"layer 'proj' is a quantised layer \([\w.]*\.{cls}: [^)]*{reason}.*{SUPPORTED}"


def assert_untouched(model: Net, flags: dict[str, bool]) -> None:
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not rankwise.core.inject.is_adapted(model)


def flags_of(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


BNB = ("bnb-int8", "bnb-4bit")  # quantised bitsandbytes layers: adapter targets (tests/test_qlora.py)
REFUSED = [kind for kind in LAYERS if kind not in BNB and kind != "bnb-4bit-not-yet-moved"]
TARGETS = pytest.mark.parametrize("targets", [["proj"], "all-linear", r"pro."], ids=["names", "all-linear", "regex"])


@pytest.mark.parametrize("kind", REFUSED)
@TARGETS
def test_adapt_refuses_a_quantised_layer(kind, targets):
    model = quantised_net(kind)
    flags = flags_of(model)
    with pytest.raises(ValueError, match=refusal(kind)):
        rankwise.adapt(model, rankwise.LoRAConfig(r=4, targets=targets))
    assert_untouched(model, flags)


@pytest.mark.parametrize("kind", BNB)
@TARGETS
@pytest.mark.parametrize("config", [rankwise.LoRAConfig, rankwise.DoRAConfig])
def test_adapt_wraps_a_quantised_bitsandbytes_layer(kind, targets, config):
    model = rankwise.adapt(quantised_net(kind), config(r=2, targets=targets))
    assert isinstance(model.proj, AdaptedLayer) and type(model.proj.base_layer).__module__.startswith("bitsandbytes")
    assert model(torch.randn(2, 16)).shape == (2, 3)


@pytest.mark.parametrize("layer", [
    lambda: bnb.nn.Linear4bit(16, 16),
    lambda: bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False),
], ids=["4bit", "int8"])
@TARGETS
def test_a_bitsandbytes_layer_not_quantised_yet_is_refused(layer, targets):
    """bitsandbytes quantises on the move to a device; before it the weight is a float placeholder."""
    torch.manual_seed(0)
    model = Net(layer())
    flags = flags_of(model)
    with pytest.raises(ValueError, match=r"layer 'proj' \((Linear4bit|Linear8bitLt)\) cannot be adapted: its weight is "
                                         r"not quantised yet .*call model\.to\(device\)"):
        rankwise.adapt(model, rankwise.LoRAConfig(r=4, targets=targets))
    assert_untouched(model, flags)


def test_an_8bit_layer_with_trainable_float16_weights_is_refused():
    torch.manual_seed(0)
    model = Net(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=True).to("cpu"))
    with pytest.raises(ValueError, match=r"layer 'proj' \(Linear8bitLt\) cannot be adapted: it keeps trainable float16 "
                                         r"weights \(has_fp16_weights=True\)"):
        rankwise.adapt(model, rankwise.LoRAConfig(r=4, targets=["proj"]))


def test_excluding_the_quantised_layer_adapts_the_rest():
    model = rankwise.adapt(quantised_net("bnb-int8"), rankwise.LoRAConfig(r=2, targets="all-linear", exclude=["proj"]))
    assert [name for name, _ in rankwise.adapted_layers(model)] == ["out", "head"]


def test_float_modules_of_quantisation_packages_are_not_taken_for_linears():
    """bitsandbytes' StableEmbedding is a float embedding: "all-linear" neither adapts nor refuses it."""
    model = nn.Sequential(bnb.nn.StableEmbedding(10, 16), nn.Linear(16, 4))
    model = rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets="all-linear"))
    assert [name for name, _ in rankwise.adapted_layers(model)] == ["1"]


@pytest.mark.parametrize("kind", ["torchao", "gptq"])
def test_load_and_import_peft_refuse_a_quantised_base(kind, tmp_path):
    torch.manual_seed(0)
    trained = rankwise.adapt(Net(nn.Linear(16, 16)), rankwise.LoRAConfig(r=4, targets=["proj", "out"]))
    rankwise.save(trained, tmp_path / "ours")
    rankwise.export_peft(trained, tmp_path / "peft")
    for entry, directory in ((rankwise.load, "ours"), (rankwise.import_peft, "peft")):
        model = quantised_net(kind)
        flags = flags_of(model)
        with pytest.raises(ValueError, match=refusal(kind)):
            entry(model, tmp_path / directory)
        assert_untouched(model, flags)


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-4bit", "torchao", "gptq"])
def test_compress_refuses_a_quantised_layer(kind):
    model = quantised_net(kind)
    proj = model.proj
    with pytest.raises(ValueError, match=refusal(kind)):
        rankwise.compress(model, ratio=0.5)
    assert model.proj is proj and isinstance(model.out, nn.Linear)


@pytest.mark.parametrize("kind", ["bnb-int8", "torchao"])
def test_trp_and_cuttlefish_refuse_a_quantised_layer(kind):
    with pytest.raises(ValueError, match=refusal(kind)):
        TRP(quantised_net(kind), TRPConfig(targets=["proj"]))
    with pytest.raises(ValueError, match=refusal(kind)):
        Cuttlefish(quantised_net(kind), CuttlefishConfig(targets=["proj"]))


def test_plain_float_layers_still_adapt_in_every_precision():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        model = copy.deepcopy(Net(nn.Linear(16, 16))).to(dtype)
        adapted = rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets="all-linear"))
        assert len(list(rankwise.adapted_layers(adapted))) == 3
