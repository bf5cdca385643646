"""QLoRA: rankwise adapters on quantised bitsandbytes bases (rankwise.core.quantised, rankwise.core.kbit).

Oracle: PEFT 0.21.2's bitsandbytes LoRA / DoRA layers (``peft.tuners.lora.bnb``) on copies of the same quantised
base with the same adapter weights. Both call the same quantised layer for the base output, so LoRA is compared
bit for bit. DoRA to 1e-5: rankwise computes the row norms ‖W + sBA‖ without building W + sBA
(rankwise.adapters.lora), which rounds differently at ~1e-7. Every other method that supports a quantised base is
compared with the same method on a float model holding the dequantised weights (exact: a 4-bit layer's float32
forward is x·deq(W)ᵀ + b).

bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a 4-bit weight for a bf16 kernel at the first eval forward
without gradients (after which its train-mode forward is wrong); the models here turn that off
(``support_avx512bf16_for_cpu = False``) so every mode computes the same base output, except
``test_dora_reads_a_repacked_weight``, which tests the repacked case itself.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from method_cases import CASES
from torch import nn
from toy_models import seeded_train_outputs

import rankwise
from rankwise.core.io import adapter_state
from rankwise.core.layer import AdaptedLayer
from rankwise.core.quantised import QuantisedMergeWarning, dequantised_weight, quantise_like, relative_error
from rankwise.core.registry import registered

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),  # bitsandbytes' int8 cast notice
    pytest.mark.filterwarnings("ignore:.*invalid shape.*lora_B.bias"),  # PEFT takes a B bias for a ZeRO-3 shard
]

QUANT = {
    "nf4": {"quant_type": "nf4"},  # double quantisation (compress_statistics) is bitsandbytes' default
    "fp4-single": {"quant_type": "fp4", "compress_statistics": False},
    "nf4-bf16": {"quant_type": "nf4", "compute_dtype": torch.bfloat16},
    "int8": None,
}
FOUR_BIT = [kind for kind, settings in QUANT.items() if settings is not None]
NAMES = ["up", "mid", "down"]


def quantised_layer(kind: str, in_features: int, out_features: int) -> nn.Module:
    settings = QUANT[kind]
    if settings is None:
        return bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False)
    return bnb.nn.Linear4bit(in_features, out_features, **settings)


class Net(nn.Module):
    """Three quantised linears (widths multiples of bitsandbytes' 4-bit block size 64)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.up, self.mid, self.down = (quantised_layer(kind, i, o) for i, o in ((64, 128), (128, 64), (64, 64)))
        # what transformers sets on a model loaded with load_in_4bit / load_in_8bit; PEFT dispatches on it
        setattr(self, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def quantised_net(kind: str, repack: bool = False, dtype: torch.dtype = torch.float32) -> Net:
    """``Net(kind)`` quantised from ``dtype`` weights (a 4-bit layer dequantises to that dtype)."""
    torch.manual_seed(0)
    model = Net(kind).to(dtype).to("cpu")  # bitsandbytes quantises on the move to a device
    for layer in (model.up, model.mid, model.down):
        layer.support_avx512bf16_for_cpu = repack
    return model


def peft_model(base: nn.Module, dora: bool = False, **options) -> nn.Module:
    """PEFT's bnb LoRA / DoRA on a copy of ``base``, with random B (init_lora_weights=False) and, with
    ``lora_bias``, a random bias on B."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=NAMES, init_lora_weights=False, use_dora=dora,
                             **options)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    assert all(type(model.base_model.model.get_submodule(n)).__module__ == "peft.tuners.lora.bnb" for n in NAMES)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


def imported(theirs: nn.Module, base: nn.Module, directory: Path) -> nn.Module:
    """rankwise's copy of PEFT's adapter, through PEFT's own files (import_peft)."""
    theirs.save_pretrained(directory)
    return rankwise.import_peft(copy.deepcopy(base), directory)


def lora_grads(ours: nn.Module, theirs: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rankwise grad, PEFT grad) of every LoRA factor and DoRA magnitude."""
    pairs = []
    peft_params = dict(theirs.named_parameters())
    for name, layer in rankwise.adapted_layers(ours):
        for local, parameter in layer.adapter.named_parameters():
            head, _, tail = local.rpartition(".") if "." in local else (local, "", "")
            key = (f"base_model.model.{name}.{head}.default.{tail}" if tail
                   else f"base_model.model.{name}.{local}.default.weight")
            pairs.append((parameter.grad, peft_params[key].grad))
    return pairs


# ----------------------------------------------------------------------------------------------
# Oracle: PEFT's bitsandbytes LoRA and DoRA layers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(QUANT))
@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"lora_bias": True}], ids=["lora", "rslora", "bias"])
def test_lora_equals_peft_bit_for_bit(kind, options, tmp_path):
    base = quantised_net(kind)
    theirs = peft_model(base, **options)
    ours = imported(theirs, base, tmp_path)
    assert all(isinstance(ours.get_submodule(n), AdaptedLayer) for n in NAMES)
    # with lora_bias rankwise adds s·b_B after s·B·A·x, PEFT scales (B·A·x + b_B) by s: rounding apart, to 1e-5
    same = torch.equal if not options.get("lora_bias") else close
    x = torch.randn(6, 64)
    for model in (ours, theirs):
        model.train()
        model(x).square().sum().backward()
    assert same(ours(x), theirs(x))
    for mine, peft_grad in lora_grads(ours, theirs):
        close(mine, peft_grad)
    with torch.no_grad():
        assert same(ours.eval()(x), theirs.eval()(x))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_dropout_equals_peft(kind, tmp_path):
    base = quantised_net(kind)
    theirs = peft_model(base, lora_dropout=0.3)
    ours = imported(theirs, base, tmp_path)
    mine, peft_out = seeded_train_outputs(ours, theirs, torch.randn(6, 64))
    assert torch.equal(mine, peft_out)


@pytest.mark.parametrize("kind", FOUR_BIT)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_equals_peft(kind, dropout, tmp_path):
    base = quantised_net(kind)
    theirs = peft_model(base, dora=True, lora_dropout=dropout)
    ours = imported(theirs, base, tmp_path)
    x = torch.randn(6, 64)
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(3)
        model(x).square().sum().backward()
    for mine, peft_grad in lora_grads(ours, theirs):
        close(mine, peft_grad)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


def test_dora_on_8bit_equals_peft_and_stays_right(tmp_path):
    """PEFT 0.21.2's 8-bit DoRA on CPU fails at its second forward (its dequantize_module_weight re-creates the
    Int8Params through .to(device), losing the int8 state bitsandbytes' matmul needs), so one forward is compared;
    rankwise's dequantisation leaves the layer alone, so its next forwards give the same output."""
    base = quantised_net("int8")
    theirs = peft_model(base, dora=True)
    ours = imported(theirs, base, tmp_path)
    x = torch.randn(6, 64)
    with torch.no_grad():
        expected = theirs.eval()(x)
        first = ours.eval()(x)
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours(x), first)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs")
def test_dora_reads_a_repacked_weight():
    """After bitsandbytes repacked a 4-bit weight for its CPU kernel, the DoRA norms still read W: the packed
    data is unpacked on a copy (PEFT 0.21.2 dequantises the packed bytes as if unpacked: W off by ~30%)."""
    model = quantised_net("nf4", repack=True)
    before = {n: dequantised_weight(model.get_submodule(n)) for n in NAMES}
    model = rankwise.adapt(model.eval(), rankwise.DoRAConfig(r=4, targets=NAMES))
    with torch.no_grad():
        model(torch.randn(6, 64))
    for name in NAMES:
        layer = model.get_submodule(name).base_layer
        assert layer.weight.quant_state.packing_format_for_cpu  # the forward repacked it
        assert relative_error(dequantised_weight(layer), before[name]) < 2e-3  # the bf16 statistics of the packing
        raw = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert relative_error(raw, before[name]) > 0.1  # what reading the packed bytes directly gives
        assert layer.weight.quant_state.packing_format_for_cpu  # the layer itself stays packed


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adalora_equals_peft_bnb_adalora(kind, tmp_path):
    """PEFT's AdaLoRA has bitsandbytes layers too (SVDLinear4bit / SVDLinear8bitLt): its adapter, with every
    tensor perturbed (λ starts at zero), imports and computes the same outputs. To 1e-5: AdaLoRA sums
    s·B(A⊙λ)x in its own order (tests/test_adalora.py)."""
    base = quantised_net(kind)
    torch.manual_seed(1)
    config = peft.AdaLoraConfig(target_modules=NAMES, init_r=4, target_r=2, total_step=10, lora_alpha=8)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert type(theirs.base_model.model.up).__module__ == "peft.tuners.adalora.bnb"
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
    ours = imported(theirs, base, tmp_path)
    x = torch.randn(6, 64)
    with torch.no_grad():
        close(ours.eval()(x), theirs.eval()(x))


# ----------------------------------------------------------------------------------------------
# Every method that supports a quantised base, against itself on the dequantised float model
# ----------------------------------------------------------------------------------------------

QUANTISED_METHODS = sorted(m.name for m in registered() if m.config_cls.quantised_base)


def test_the_supported_methods_are_the_ones_documented():
    assert QUANTISED_METHODS == ["adalora", "ardlora", "bora", "c3a", "dora", "elalora", "gralora", "kradapter",
                                 "loha", "lokr", "loldu", "lora", "miss", "singlora", "surm"]


def float_twin(model: Net) -> nn.Module:
    """The float model that computes what ``model`` computes: nn.Linear layers with the dequantised weights."""
    twin = nn.Module()
    for name in NAMES:
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            linear.weight.copy_(dequantised_weight(layer))
            linear.bias.copy_(layer.bias)
        twin.add_module(name, linear)
    twin.forward = Net.forward.__get__(twin)
    return twin


def adapted_pair(method: str, kind: str = "nf4") -> tuple[nn.Module, nn.Module]:
    """The method on the quantised model and on its float twin, with the same perturbed adapter tensors."""
    case = CASES[method]
    options = {k: v for k, v in {**case.kwargs, **case.random_init}.items() if k != "dropout"}
    config = rankwise.config(method, targets=NAMES, **options)
    quantised = quantised_net(kind)
    twin = float_twin(quantised)
    torch.manual_seed(1)
    rankwise.adapt(quantised, config)
    torch.manual_seed(1)
    rankwise.adapt(twin, config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ours, reference = adapter_state(quantised, keep_vars=True), adapter_state(twin, keep_vars=True)
        for key, tensor in ours.items():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
                reference[key].copy_(tensor)
    return quantised.eval(), twin.eval()


@pytest.mark.parametrize("method", QUANTISED_METHODS)
def test_method_on_a_4bit_base_equals_the_float_model_and_merges_exactly(method):
    quantised, twin = adapted_pair(method)
    x = torch.randn(6, 64)
    with torch.no_grad():
        before = quantised(x)
        torch.testing.assert_close(before, twin(x), rtol=1e-5, atol=1e-5)
    originals = {n: (quantised.get_submodule(n).base_layer.weight.data.clone(),
                     quantised.get_submodule(n).base_layer.weight.quant_state.absmax.clone()) for n in NAMES}
    with pytest.warns(QuantisedMergeWarning):
        rankwise.merge(quantised)
    rankwise.merge(twin)
    for name in NAMES:
        layer, exact = quantised.get_submodule(name).base_layer, twin.get_submodule(name).base_layer.weight
        # merged = quantise(the float merge), bit for bit
        assert torch.equal(dequantised_weight(layer), dequantised_weight_of(quantise_like(layer, exact), layer))
    rankwise.unmerge(quantised)
    for name in NAMES:
        weight = quantised.get_submodule(name).base_layer.weight
        assert torch.equal(weight.data, originals[name][0]) and torch.equal(weight.quant_state.absmax, originals[name][1])
    with torch.no_grad():
        assert torch.equal(quantised(x), before)


@pytest.mark.parametrize("method", QUANTISED_METHODS)
def test_method_on_an_8bit_base_merges_and_unmerges(method):
    """LLM.int8 also quantises the activations, so an 8-bit forward is not the float twin's; what is exact: the
    merge is quantise(the float merge) and unmerge puts the original int8 weight and its output back."""
    quantised, twin = adapted_pair(method, "int8")
    x = torch.randn(6, 64)
    with torch.no_grad():
        before = quantised(x)
        originals = {n: quantised.get_submodule(n).base_layer.weight for n in NAMES}
        assert len(merge_warnings(quantised)) == 3
        rankwise.merge(twin)
        for name in NAMES:
            exact = twin.get_submodule(name).base_layer.weight
            expected = bnb.nn.Int8Params(exact.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
            assert torch.equal(quantised.get_submodule(name).base_layer.weight.data, expected.data)
        quantised(x)  # moves the merged weight's int8 state into the layers
        rankwise.unmerge(quantised)
        assert all(quantised.get_submodule(n).base_layer.weight is originals[n] for n in NAMES)
        assert torch.equal(quantised(x), before)


def dequantised_weight_of(weight: nn.Parameter, layer: nn.Module) -> torch.Tensor:
    """The dequantised value of a 4-bit parameter not (yet) installed in a layer."""
    probe = copy.copy(layer)
    probe._parameters = dict(layer._parameters, weight=weight)
    return dequantised_weight(probe)


# ----------------------------------------------------------------------------------------------
# Merging into a quantised base
# ----------------------------------------------------------------------------------------------


def merge_warnings(model: nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rankwise.merge(model)
    return [str(w.message) for w in caught if issubclass(w.category, QuantisedMergeWarning)]


@pytest.mark.parametrize("kind", list(QUANT))
def test_merge_states_the_rounding_error_and_equals_peft_merge(kind, tmp_path):
    base = quantised_net(kind)
    theirs = peft_model(base)
    ours = imported(theirs, base, tmp_path)
    exact = {}
    for name, layer in rankwise.adapted_layers(ours):
        a, b = layer.adapter.lora_A.weight, layer.adapter.lora_B.weight
        exact[name] = dequantised_weight(layer.base_layer) + 2.0 * (b @ a)  # s = alpha / r = 8 / 4
    messages = merge_warnings(ours)
    assert len(messages) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
    for message, name in zip(messages, NAMES):
        layer = ours.get_submodule(name).base_layer
        error = relative_error(dequantised_weight(layer), exact[name])
        assert 0 < error < (0.2 if kind != "int8" else 0.02)
        stated = re.search(r"relative rounding error .* = (\S+), so", message)
        assert f"layer '{name}'" in message and stated.group(1) == f"{error:.3e}"
        peft_layer = theirs.base_model.model.get_submodule(name).base_layer
        assert torch.equal(dequantised_weight(layer), dequantised_weight(peft_layer))
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unmerge_and_unload_without_merge_restore_the_original_quantised_weight(kind):
    model = rankwise.adapt(quantised_net(kind), rankwise.LoRAConfig(r=4, targets=NAMES, init_weights=False))
    x = torch.randn(6, 64)
    original = {n: model.get_submodule(n).base_layer.weight for n in NAMES}
    with torch.no_grad():
        plain = model.get_submodule("up").base_layer(x)
        adapted = model(x)
        merge_warnings(model)
        merged = model(x)  # an 8-bit forward moves the merged weight's int8 state into the layer
        assert not torch.equal(merged, adapted)
        rankwise.unmerge(model)
        assert all(model.get_submodule(n).base_layer.weight is original[n] for n in NAMES)
        assert torch.equal(model(x), adapted)
        with rankwise.disable_adapters(model):
            assert torch.equal(model.up(x), plain)
        merge_warnings(model)
        unloaded = rankwise.unload(model, merge=False)
    assert all(unloaded.get_submodule(n).weight is original[n] for n in NAMES)
    with torch.no_grad():
        assert torch.equal(unloaded.up(x), plain)


@pytest.mark.parametrize(("kind", "dtype"), [("nf4-bf16", torch.float32), ("fp4-single", torch.float32),
                                           ("nf4", torch.bfloat16), ("int8", torch.float32)])
def test_unload_with_merge_gives_a_quantised_layer_with_the_same_settings(kind, dtype):
    model = rankwise.adapt(quantised_net(kind, dtype=dtype),
                           rankwise.DoRAConfig(r=4, targets=NAMES, init_weights=False))
    x = torch.randn(6, 64, dtype=dtype)
    with torch.no_grad():
        merge_warnings(model)
        merged = model(x)
        rankwise.unmerge(model)
        with pytest.warns(QuantisedMergeWarning):
            plain = rankwise.unload(model, merge=True)
        reference = quantised_net(kind, dtype=dtype)
        reference(x)  # bitsandbytes sets a 4-bit layer's compute dtype from its first input
        for name in NAMES:
            layer, fresh = plain.get_submodule(name), reference.get_submodule(name)
            assert type(layer) is type(fresh) and type(layer.weight) is type(fresh.weight)
            if kind != "int8":
                for attr in ("quant_type", "blocksize", "compress_statistics", "quant_storage"):
                    assert getattr(layer.weight, attr) == getattr(fresh.weight, attr)
                assert layer.weight.quant_state.dtype == fresh.weight.quant_state.dtype
                assert layer.compute_dtype == fresh.compute_dtype
            else:
                assert layer.weight.dtype == torch.int8 and not layer.state.has_fp16_weights
        assert torch.equal(plain(x), merged)


def test_safe_merge_refuses_a_non_finite_update_and_leaves_the_quantised_weight():
    model = rankwise.adapt(quantised_net("nf4"), rankwise.LoRAConfig(r=4, targets=NAMES))
    weight = model.up.base_layer.weight
    with torch.no_grad():
        model.up.adapter.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights"):
        rankwise.merge(model, safe=True)
    assert model.up.base_layer.weight is weight and not model.up.merged


# ----------------------------------------------------------------------------------------------
# Targeting, save / load, PEFT interop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_all_linear_adapts_the_quantised_layers(kind):
    model = rankwise.adapt(quantised_net(kind), rankwise.LoRAConfig(r=4, targets="all-linear"))
    assert [name for name, _ in rankwise.adapted_layers(model)] == NAMES
    assert rankwise.trainable_parameters(model) == 4 * ((64 + 128) + (128 + 64) + (64 + 64))
    assert "64 x 128" in rankwise.summary(model)  # (out, in) of 'mid', not the packed (4096, 1)


@pytest.mark.parametrize("config", [
    rankwise.config("gora", r=4, targets=NAMES),
    rankwise.LoRAConfig(r=4, targets=NAMES, init_weights="pissa"),
    rankwise.LoRAConfig(r=4, targets=NAMES, init_weights="olora"),
], ids=["gora", "pissa", "olora"])
def test_methods_that_cannot_run_on_a_quantised_base_are_refused_before_any_change(config):
    model = quantised_net("nf4")
    weight = model.up.weight
    why = "gora has no quantised-base path" if config.method == "gora" else r"its init rewrites the base weight"
    with pytest.raises(ValueError, match=rf"method '{config.method}' cannot adapt layer 'up', a bitsandbytes 4-bit nf4.*"
                                         rf"{why}.*Methods that adapt quantised bitsandbytes layers: \[.*'lora'"):
        rankwise.adapt(model, config)
    assert not rankwise.core.inject.is_adapted(model) and model.up.weight is weight


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_save_and_load_onto_a_quantised_base(kind, method, tmp_path):
    model = rankwise.adapt(quantised_net(kind), rankwise.config(method, r=4, targets=NAMES))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(6, 64)
    model(x).square().mean().backward()
    optimizer.step()
    rankwise.save(model, tmp_path)
    saved = rankwise.core.io.read_tensors(tmp_path / "adapter.safetensors", "test")
    assert saved and all(".adapter." in key for key in saved)  # the quantised base is not saved
    loaded = rankwise.load(quantised_net(kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_export_peft_loads_in_peft_on_the_quantised_base(dora, tmp_path):
    config = rankwise.DoRAConfig if dora else rankwise.LoRAConfig
    ours = rankwise.adapt(quantised_net("nf4"), config(r=4, alpha=8, targets=NAMES, init_weights=False))
    rankwise.export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(quantised_net("nf4"), tmp_path)
    assert type(theirs.base_model.model.up).__module__ == "peft.tuners.lora.bnb"
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert (close if dora else torch.equal)(theirs.eval()(x), ours.eval()(x))


# ----------------------------------------------------------------------------------------------
# prepare_for_kbit_training, against PEFT's prepare_model_for_kbit_training
# ----------------------------------------------------------------------------------------------


def kbit_bert() -> nn.Module:
    """A two-layer bfloat16 BERT whose query / value projections are NF4 Linear4bit layers (as load_in_4bit)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=40, max_position_embeddings=32)
    model = BertModel(config).to(torch.bfloat16)
    for layer in model.encoder.layer:
        for name in ("query", "value"):
            dense = getattr(layer.attention.self, name)
            quantised = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.bfloat16)
            quantised.weight.data = dense.weight.data.clone()  # quantised from bfloat16 on the move below
            quantised.bias = nn.Parameter(dense.bias.data.clone())
            setattr(layer.attention.self, name, quantised)
    model.is_loaded_in_4bit = True
    return model.to("cpu")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # PEFT calls it
def test_prepare_for_kbit_training_does_what_peft_does():
    ours, theirs = kbit_bert(), kbit_bert()
    quantised_before = {n: p for n, p in ours.named_parameters() if type(p) is not nn.Parameter}
    assert rankwise.prepare_for_kbit_training(ours) is ours
    peft.prepare_model_for_kbit_training(theirs)
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert {n: (p.dtype, p.requires_grad) for n, p in mine.items()} == {
        n: (p.dtype, p.requires_grad) for n, p in peft_params.items()}
    assert all(p is mine[n] and p.dtype == torch.uint8 for n, p in quantised_before.items())  # untouched
    assert all(p.dtype == torch.float32 for p in mine.values() if type(p) is nn.Parameter)  # norms, embeddings, biases
    assert ours.is_activation_checkpointing and theirs.is_activation_checkpointing
    ids = torch.randint(0, 40, (2, 8))
    assert ours.get_input_embeddings()(ids).requires_grad  # the hook re-entrant checkpointing needs


@pytest.mark.parametrize("reentrant", [True, False])
def test_adapters_train_under_checkpointing_after_prepare(reentrant):
    model = rankwise.prepare_for_kbit_training(kbit_bert(), gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    rankwise.adapt(model, rankwise.LoRAConfig(r=4, targets=["query", "value"], init_weights=False)).train()
    model(torch.randint(0, 40, (2, 8))).last_hidden_state.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 * 2 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("reentrant", [True, False])
def test_prepare_turns_on_input_gradients_then_checkpointing_as_peft_does(reentrant):
    """transformers 5 turns on input gradients inside its own checkpointing switch, so the call is recorded here:
    re-entrant checkpointing needs it with any transformers version (PEFT makes it too), non-re-entrant does not."""
    model, calls = kbit_bert(), []
    model.enable_input_require_grads = lambda: calls.append("input gradients")
    model.activation_checkpointing_enable = lambda activation_checkpointing_kwargs: calls.append(
        activation_checkpointing_kwargs)
    rankwise.prepare_for_kbit_training(model, gradient_checkpointing_kwargs=None if reentrant else {
        "use_reentrant": False})
    assert calls == (["input gradients", {"use_reentrant": True}] if reentrant else [{"use_reentrant": False}])


def test_prepare_for_kbit_training_refuses_bad_input_before_any_change():
    adapted = rankwise.adapt(quantised_net("nf4"), rankwise.LoRAConfig(r=4, targets=NAMES))
    with pytest.raises(ValueError, match="already carries a rankwise adapter.*prepare_for_kbit_training\\(model\\) first"):
        rankwise.prepare_for_kbit_training(adapted)
    assert rankwise.trainable_parameters(adapted) > 0
    plain = quantised_net("nf4").to(torch.bfloat16)  # not a transformers model: no gradient_checkpointing_enable
    flags = {n: (p.dtype, p.requires_grad) for n, p in plain.named_parameters()}
    with pytest.raises(ValueError, match="Net has no activation_checkpointing_enable.*use_gradient_checkpointing=False"):
        rankwise.prepare_for_kbit_training(plain)
    assert {n: (p.dtype, p.requires_grad) for n, p in plain.named_parameters()} == flags
    rankwise.prepare_for_kbit_training(plain, use_gradient_checkpointing=False)
    assert all(not p.requires_grad for p in plain.parameters())
    assert all(p.dtype == torch.float32 for p in plain.parameters() if type(p) is nn.Parameter)


def test_named_adapters_on_a_quantised_base():
    """Several adapters over one quantised layer: switching, per-example batches and merging the active one."""
    model = rankwise.adapt(quantised_net("nf4"), rankwise.LoRAConfig(r=4, targets=NAMES, init_weights=False))
    torch.manual_seed(5)
    rankwise.add_adapter(model, "b", rankwise.DoRAConfig(r=2, targets=NAMES, init_weights=False))
    x = torch.randn(4, 64)
    with torch.no_grad():
        first = model.eval()(x)
        rankwise.set_adapter(model, "b")
        second = model(x)
        with rankwise.adapter_per_example(model, ["default", "b", "b", "default"]):
            mixed = model(x)
        torch.testing.assert_close(mixed, torch.stack([first[0], second[1], second[2], first[3]]), rtol=1e-5, atol=1e-6)
        original = model.up.base_layer.weight
        assert len(merge_warnings(model)) == 3
        rankwise.unmerge(model)
        assert model.up.base_layer.weight is original and torch.equal(model(x), second)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_lora_on_a_base_quantised_from_half_precision_keeps_a_small_update_exactly(dtype):
    """A 4-bit layer dequantises to the dtype it was quantised from; W' − W taken there rounds a small ΔW away
    (0.65 relative error at |B| ≈ 1e-3 from bf16, while the report said 0). ΔW is computed in float64."""
    model = rankwise.adapt(quantised_net("nf4", dtype=dtype), rankwise.LoRAConfig(r=4, alpha=4, targets=NAMES))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in rankwise.adapted_layers(model):
            layer.adapter.lora_B.weight.normal_(0, 1e-3)
    lora = rankwise.to_lora(model, rank=64)
    for name, layer in rankwise.adapted_layers(model):
        exact = layer.adapter.delta_weight().double()
        got = lora.get_submodule(name).adapter.delta_weight().double()
        assert ((got - exact).norm() / exact.norm()).item() < 1e-6, name


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_module_to_save_is_refused_before_any_change(kind):
    """A module to save trains as a full copy, which an integer weight cannot (torch raised a RuntimeError)."""
    model = quantised_net(kind)
    before = {key: value.clone() for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="modules_to_save entry 'down' holds the quantised layer 'down'"):
        rankwise.adapt(model, rankwise.LoRAConfig(r=4, targets=["up", "mid"], modules_to_save=["down"]))
    after = model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags and not list(rankwise.adapted_layers(model))


def test_to_lora_of_dora_on_a_quantised_base_is_exact_at_full_rank():
    """to_lora reads W' − W through the dequantised weight, so a QDoRA becomes a QLoRA that PEFT can serve."""
    model = rankwise.adapt(quantised_net("nf4"), rankwise.DoRAConfig(r=4, targets=NAMES, init_weights=False))
    x = torch.randn(6, 64)
    with torch.no_grad():
        expected = model.eval()(x)
        lora = rankwise.to_lora(model, rank=64)
        assert rankwise.adapter_config(lora).method == "lora"
        assert all(layer.relative_error < 1e-6 for layer in rankwise.to_lora_report(lora).layers.values())
        close(lora.eval()(x), expected)
