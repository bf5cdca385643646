"""LoRA / rsLoRA / DoRA on nn.Conv1d / Conv2d / Conv3d and nn.Embedding against Hugging Face PEFT 0.21.2.

Same weights in (PEFT's random adapter tensors copied into ours, DoRA magnitudes moved off their init):
outputs in eval and in training with dropout under the same RNG, gradients of every adapter tensor and of
the input, merged weights and biases, unmerge, adapter files in both directions, save / load; then the
layer-kind rules (all-linear stays linear, other methods refuse with a message naming the method, the layer
and what is supported) and the bad inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from method_cases import CASES
from peft import LoraConfig, PeftModel, get_peft_model

import rankwise
from rankwise.adapters.lora import DoRAConvAdapter, DoRAEmbeddingAdapter, LoRAConvAdapter, LoRAEmbeddingAdapter

TOL = {"atol": 1e-5, "rtol": 1e-5}
TARGETS = ["emb", "seq", "img", "vol", "flat"]
VOCAB, PAD = 23, 0


class Net(nn.Module):
    """Tokens -> Embedding -> Conv1d; an image -> Conv2d (strided, no bias) -> Conv3d; a 1×1 Conv2d."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=PAD)
        self.seq = nn.Conv1d(6, 8, 3, padding=1)
        self.img = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False, groups=groups)
        self.vol = nn.Conv3d(8, 4, (1, 2, 2))
        self.flat = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(8 + 4 + 6, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        seq = torch.relu(self.seq(self.emb(tokens).transpose(1, 2))).mean(-1)
        img = torch.relu(self.img(image))
        vol = self.vol(img.unsqueeze(2)).flatten(2).mean(-1)
        flat = self.flat(image).flatten(2).mean(-1)
        return self.head(torch.cat([seq, vol, flat], dim=1))


VARIANTS = {
    "lora": {"use_dora": False, "use_rslora": False},
    "rslora": {"use_dora": False, "use_rslora": True},
    "dora": {"use_dora": True, "use_rslora": False},
    "dora-rslora": {"use_dora": True, "use_rslora": True},
}


def copy_peft_tensors(ours: nn.Module, theirs: nn.Module) -> None:
    """PEFT's adapter tensors into ours (DoRA magnitudes of both moved by ×1.1 off their init)."""
    with torch.no_grad():
        for layer_name, layer in rankwise.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(layer_name)
            for key, value in layer.adapter.named_parameters():
                if key == "lora_magnitude_vector":
                    peft_layer.lora_magnitude_vector["default"].weight.mul_(1.1)
                    source = peft_layer.lora_magnitude_vector["default"].weight.reshape(-1)
                elif key.startswith("lora_embedding"):
                    source = getattr(peft_layer, key)["default"]
                else:
                    module, _, tensor = key.partition(".")
                    source = getattr(getattr(peft_layer, module)["default"], tensor)
                value.copy_(source)


def peft_grad(peft_layer: nn.Module, key: str) -> torch.Tensor:
    if key == "lora_magnitude_vector":
        return peft_layer.lora_magnitude_vector["default"].weight.grad.reshape(-1)
    if key.startswith("lora_embedding"):
        return getattr(peft_layer, key)["default"].grad
    module, _, tensor = key.partition(".")
    return getattr(getattr(peft_layer, module)["default"], tensor).grad


def pair(variant: str, dropout: float = 0.0, groups: int = 1, lora_bias: bool = False, targets=TARGETS, r: int = 4):
    """The same base adapted by PEFT and by rankwise, with PEFT's (random) adapter tensors copied into ours."""
    torch.manual_seed(0)
    base = Net(groups)
    flags = VARIANTS[variant]
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r, lora_alpha=6, lora_dropout=dropout, target_modules=targets, init_lora_weights=False,
                   lora_bias=lora_bias, **flags),
    )
    name = "dora" if flags["use_dora"] else "lora"
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(
        name, r=r, alpha=6, dropout=dropout, use_rslora=flags["use_rslora"], targets=targets, lora_bias=lora_bias,
        init_weights=False))
    copy_peft_tensors(ours, theirs)
    return base, theirs, ours


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 7), generator=generator)
    tokens[:, 0] = PAD  # the padding token: its column of lora_embedding_A gets no gradient
    return tokens, torch.randn(3, 4, 8, 8, generator=generator)


def kinds(model: nn.Module) -> dict[str, type]:
    return {name: type(layer.adapter) for name, layer in rankwise.adapted_layers(model)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_gradients_match_peft(variant):
    _, theirs, ours = pair(variant)
    dora = variant.startswith("dora")
    assert kinds(ours) == dict.fromkeys(TARGETS, DoRAConvAdapter if dora else LoRAConvAdapter) | {
        "emb": DoRAEmbeddingAdapter if dora else LoRAEmbeddingAdapter}
    theirs.eval(), ours.eval()
    tokens, image = inputs()
    image_theirs, image_ours = image.clone().requires_grad_(True), image.clone().requires_grad_(True)
    y_theirs, y_ours = theirs(tokens, image_theirs), ours(tokens, image_ours)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    assert not torch.allclose(y_ours, Net()(tokens, image))  # the adapters do something
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(image_ours.grad, image_theirs.grad, **TOL)
    for layer_name, layer in rankwise.adapted_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(layer_name)
        for key, value in layer.adapter.named_parameters():
            torch.testing.assert_close(value.grad, peft_grad(peft_layer, key), **TOL, msg=f"{layer_name}.{key}")
    emb = dict(rankwise.adapted_layers(ours))["emb"].adapter
    assert torch.count_nonzero(emb.lora_embedding_A.grad[:, PAD]) == 0
    assert torch.count_nonzero(emb.lora_embedding_A.grad) > 0


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_forward_with_dropout_matches_peft(variant):
    """Same dropout masks (same RNG draws) give the same outputs, DoRA's x̃ semantics on convolutions included."""
    _, theirs, ours = pair(variant, dropout=0.3)
    theirs.train(), ours.train()
    torch.manual_seed(5)
    y_theirs = theirs(*inputs())
    torch.manual_seed(5)
    y_ours = ours(*inputs())
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    torch.manual_seed(6)
    assert not torch.allclose(ours(*inputs()), y_ours)  # dropout is live


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_matches_peft_and_unmerge_restores(variant):
    base, theirs, ours = pair(variant)
    ours.eval()
    expected = ours(*inputs())
    merged_theirs = theirs.merge_and_unload()
    rankwise.merge(ours)
    for layer_name, layer in rankwise.adapted_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_theirs.get_submodule(layer_name).weight, **TOL)
    torch.testing.assert_close(ours(*inputs()), expected, **TOL)
    rankwise.unmerge(ours)
    for name, module in base.named_modules():
        if name in TARGETS:
            torch.testing.assert_close(ours.get_submodule(name).weight, module.weight, atol=1e-6, rtol=1e-6)


def test_lora_bias_on_convolutions_matches_peft():
    """B's bias is scaled with the branch in the forward, and s·b_B is added to the layer's bias on merge."""
    targets = ["seq", "vol", "flat"]
    _, theirs, ours = pair("lora", lora_bias=True, targets=targets)
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            layer.adapter.lora_B.bias.normal_()
            theirs.base_model.model.get_submodule(name).lora_B["default"].bias.copy_(layer.adapter.lora_B.bias)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(*inputs()), theirs(*inputs()), **TOL)
    merged_theirs = theirs.merge_and_unload()
    rankwise.merge(ours)
    for name in targets:
        torch.testing.assert_close(ours.get_submodule(name).bias, merged_theirs.get_submodule(name).bias, **TOL)


def test_grouped_convolution_runs_as_peft_and_refuses_merge():
    """PEFT adapts a grouped conv (r a multiple of groups) but cannot merge it: the update is a dense conv.
    ``rankwise.merge`` refuses before any layer is merged (``seq`` comes first in the model)."""
    _, theirs, ours = pair("lora", groups=2, targets=["seq", "img"])
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(*inputs()), theirs(*inputs()), **TOL)
    weights = [ours.seq.base_layer.weight.clone(), ours.img.base_layer.weight.clone()]
    with pytest.raises(ValueError, match=r"'img'.*grouped convolution \(groups=2\).*cannot be merged"):
        rankwise.merge(ours)
    assert torch.equal(ours.seq.base_layer.weight, weights[0]) and not ours.seq.merged
    assert torch.equal(ours.img.base_layer.weight, weights[1]) and not ours.img.merged
    with pytest.raises(ValueError, match=r"'img'.*cannot be merged"):
        rankwise.unload(ours, merge=True)
    assert rankwise.core.inject.is_adapted(ours) and isinstance(ours.seq, rankwise.core.layer.AdaptedLayer)
    with pytest.raises(NotImplementedError):  # PEFT refuses too
        theirs.merge_and_unload()
    with pytest.raises(ValueError, match=r"r=3 is not a multiple of groups=2"):
        rankwise.adapt(Net(groups=2), rankwise.LoRAConfig(r=3, targets=["img"]))
    with pytest.raises(ValueError, match=r"DoRA .*cannot adapt the layer"):
        rankwise.adapt(Net(groups=2), rankwise.DoRAConfig(r=4, targets=["img"]))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_export_peft_loads_in_peft(variant, tmp_path):
    base, _, ours = pair(variant)
    rankwise.export_peft(ours, tmp_path / "export")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    ours.eval()
    torch.testing.assert_close(theirs(*inputs()), ours(*inputs()), **TOL)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_import_peft_adapter(variant, tmp_path):
    base, theirs, _ = pair(variant)
    theirs.save_pretrained(tmp_path / "peft")
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    theirs.eval()
    torch.testing.assert_close(ours(*inputs()), theirs(*inputs()), **TOL)
    if variant == "dora":  # PEFT's (1, C_out, 1, 1) on disk, a vector in rankwise
        assert ours.img.adapter.lora_magnitude_vector.shape == (8,)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_save_load_round_trip(variant, tmp_path):
    base, _, ours = pair(variant)
    ours.eval()
    rankwise.save(ours, tmp_path / "ours")
    loaded = rankwise.load(copy.deepcopy(base), tmp_path / "ours").eval()
    assert kinds(loaded) == kinds(ours)
    torch.testing.assert_close(loaded(*inputs()), ours(*inputs()), atol=0, rtol=0)


def test_default_inits_match_peft():
    """Conv: kaiming-uniform A over fan-in C_in·∏k (bound 1/√fan_in), zero B. Embedding: A = 0, B ~ N(0, 1)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": nn.Conv2d(16, 300, 3), "emb": nn.Embedding(100, 400)})
    ours = rankwise.adapt(copy.deepcopy(model), rankwise.LoRAConfig(r=64, alpha=8, targets=["conv", "emb"]))
    conv, emb = ours["conv"].adapter, ours["emb"].adapter
    bound = 1 / (16 * 9) ** 0.5
    assert bound * 0.99 < conv.lora_A.weight.abs().max() <= bound
    assert torch.count_nonzero(conv.lora_B.weight) == 0
    assert torch.count_nonzero(emb.lora_embedding_A) == 0
    assert abs(emb.lora_embedding_B.std().item() - 1) < 0.02 and abs(emb.lora_embedding_B.mean().item()) < 0.02
    gaussian = rankwise.adapt(model, rankwise.LoRAConfig(r=64, init_weights="gaussian", targets=["conv"]))
    assert abs(gaussian["conv"].adapter.lora_A.weight.std().item() * 64 - 1) < 0.02
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(ours["conv"](x), ours["conv"].base_layer(x), atol=0, rtol=0)


def test_closed_form_parameter_count():
    config = rankwise.DoRAConfig(r=4, targets=TARGETS)
    ours = rankwise.adapt(Net(), config)
    for _, layer in rankwise.adapted_layers(ours):
        out_f, in_f = rankwise.core.layer.linear_shape(layer.base_layer)
        count = sum(p.numel() for p in layer.adapter.parameters())
        assert count == type(layer.adapter).expected_num_params(out_f, in_f, config)


class ScaledEmbedding(nn.Embedding):
    """An embedding that multiplies its output by a scalar, as transformers' Gemma3TextScaledWordEmbedding."""

    def __init__(self, *args, embed_scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_scaled_embedding_matches_peft(variant):
    torch.manual_seed(0)
    base = nn.Sequential(ScaledEmbedding(VOCAB, 6, embed_scale=2.5))
    flags = VARIANTS[variant]
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["0"], init_lora_weights=False,
                                                             **flags))
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config("dora" if flags["use_dora"] else "lora", r=3,
                                                              targets=["0"]))
    copy_peft_tensors(ours, theirs)
    tokens = inputs()[0]
    torch.testing.assert_close(ours(tokens), theirs(tokens), **TOL)
    rankwise.merge(ours)
    torch.testing.assert_close(ours(tokens), theirs(tokens), **TOL)


def test_dilated_and_reflect_padded_convolutions_are_exact_but_not_exported(tmp_path):
    """rankwise's A takes dilation and padding mode, so the adapted forward equals the merged conv; PEFT 0.21.2
    drops both (peft#3697), so export and import refuse such layers."""
    torch.manual_seed(0)
    base = nn.ModuleDict({"dil": nn.Conv2d(3, 5, 3, dilation=2, padding=2), "refl": nn.Conv1d(3, 5, 3, padding=1,
                                                                                            padding_mode="reflect")})
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.DoRAConfig(r=2, init_weights=False, targets=["dil", "refl"]))
    x2, x1 = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 11)
    adapted = ours["dil"](x2), ours["refl"](x1)
    rankwise.merge(ours)
    torch.testing.assert_close((ours["dil"](x2), ours["refl"](x1)), adapted, **TOL)
    rankwise.unmerge(ours)
    with pytest.raises(ValueError, match=r"layer 'dil' is a Conv2d with dilation=\(2, 2\).*peft#3697"):
        rankwise.export_peft(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["refl"]))
    theirs.save_pretrained(tmp_path / "peft")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"layer 'refl' is a Conv1d .*padding_mode='reflect'"):
        rankwise.import_peft(fresh, tmp_path / "peft")
    assert not rankwise.core.inject.is_adapted(fresh)


def test_all_linear_stays_linear():
    ours = rankwise.adapt(Net(), rankwise.LoRAConfig(r=2, targets="all-linear"))
    assert set(kinds(ours)) == {"head"}  # the only linear layer (a plain module has no recognisable head)
    regex = rankwise.adapt(Net(), rankwise.LoRAConfig(r=2, targets=r"(emb|img)"))
    assert set(kinds(regex)) == {"emb", "img"}


def refused_layers() -> list[tuple[str, str, str]]:
    """(method, target, class) for every method other than LoRA / DoRA and layer kind it does not adapt."""
    rows = []
    for method in sorted(set(CASES) - {"lora", "dora"}):
        adapter_cls = rankwise.core.registry.get_method(method).adapter_cls
        if not adapter_cls.conv_as_patches and "conv" not in adapter_cls.layer_kinds:
            rows.append((method, "img", "torch.nn.modules.conv.Conv2d"))
        if "embedding" not in adapter_cls.layer_kinds:
            rows.append((method, "emb", "torch.nn.modules.sparse.Embedding"))
    return rows


@pytest.mark.parametrize("method, target, cls", refused_layers())
def test_other_methods_refuse_layer_kinds_they_do_not_adapt(method, target, cls):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    config = rankwise.config(method, **{**CASES[method].kwargs, "targets": [target]})
    with pytest.raises(ValueError, match=rf"method '{method}' cannot adapt layer '{target}' \({cls}\): .*adapts "
                                         r"nn.Linear / transformers Conv1D( and nn.Conv1d / nn.Conv2d / nn.Conv3d)? "
                                         "layers only"):
        rankwise.adapt(model, config)
    assert not rankwise.core.inject.is_adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, layer, match", [
    ({"init_weights": "pissa"}, "img", r"init_weights='pissa' factorises a weight matrix"),
    ({"init_weights": "olora"}, "emb", r"init_weights='olora' is not defined for embeddings"),
    ({"lora_bias": True}, "emb", r"lora_bias=True \(PEFT refuses it for embeddings too\)"),
    ({"r": 20}, "flat", r"rank r=20 exceeds min\(out, in\)=4"),
])
def test_bad_configs_are_refused_before_the_model_changes(kwargs, layer, match):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"cannot adapt layer '{layer}'.*{match}"):
        rankwise.adapt(model, rankwise.LoRAConfig(**{"r": 2, **kwargs}, targets=[layer, "head"]))
    assert not rankwise.core.inject.is_adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_max_norm_embedding_is_refused():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4, max_norm=1.0)})
    with pytest.raises(ValueError, match=r"'emb'.*max_norm=1.0 renormalises"):
        rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets=["emb"]))


def test_conv_factors_refused_for_lora_pro():
    ours = rankwise.adapt(Net(), rankwise.LoRAConfig(r=2, targets=["img"]))
    assert isinstance(ours.img.adapter, LoRAConvAdapter)
    with pytest.raises(ValueError, match=r"'img'.*kernels, not the two matrices"):
        ours.img.adapter.factors()


def test_embedding_token_ids_stay_integers_on_a_half_base():
    """A bfloat16 base gets a float32 adapter; the token ids must not be cast to float on their way in."""
    model = rankwise.adapt(nn.ModuleDict({"emb": nn.Embedding(10, 4)}).to(torch.bfloat16),
                           rankwise.DoRAConfig(r=2, targets=["emb"]))
    out = model["emb"](torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 4)


# ----------------------------------------------------------------------------------------------
# Linear methods on convolution patches
# ----------------------------------------------------------------------------------------------

PATCH_METHODS = [m for m in sorted(CASES) if rankwise.core.registry.get_method(m).adapter_cls.conv_as_patches]


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d(3, 5, 3, stride=2, dilation=2, padding=3, padding_mode="reflect"), (2, 3, 17)),
    (nn.Conv2d(3, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2), padding_mode="circular"), (2, 3, 9, 8)),
    (nn.Conv2d(3, 5, 3, padding="same", padding_mode="replicate"), (2, 3, 9, 8)),
    (nn.Conv3d(3, 5, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0), dilation=(2, 1, 1)), (2, 3, 5, 7, 4)),
], ids=["1d-reflect-dilated", "2d-circular", "2d-same", "3d"])
def test_conv_patches_times_the_kernel_matrix_is_the_convolution(conv, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    patches, spatial = rankwise.core.layer.conv_patches(conv, x)
    out = patches @ rankwise.core.layer.weight_matrix(conv).T + conv.bias
    expected = conv(x)
    assert spatial == tuple(expected.shape[2:])
    torch.testing.assert_close(out.transpose(1, 2).reshape(expected.shape), expected, **TOL)


def patch_model() -> nn.ModuleDict:
    """A 2-D convolution whose kernel matrix is 48 x 64 and a 1-D one with 32 x 32: the toy widths of method_cases."""
    torch.manual_seed(0)
    return nn.ModuleDict({"img": nn.Conv2d(16, 48, 2, padding=1, padding_mode="reflect"), "seq": nn.Conv1d(16, 32, 2)})


@pytest.mark.parametrize("method", PATCH_METHODS)
def test_linear_methods_on_convolution_patches(method):
    """The adapted forward equals the convolution with the merged kernel (W' = merge of the kernel matrix), the
    adapter's tensors get gradients, unmerge restores the kernel and an unbatched input is one batch row."""
    model = patch_model()
    before = {name: module.weight.clone() for name, module in model.items()}
    case = CASES[method]
    ours = rankwise.adapt(model, rankwise.config(method, **{**case.kwargs, **case.random_init, "targets": ["img", "seq"]}))
    with torch.no_grad():
        for parameter in ours.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    ours.eval()
    generator = torch.Generator().manual_seed(1)
    image, sequence = torch.randn(2, 16, 5, 6, generator=generator), torch.randn(2, 16, 9, generator=generator)
    adapted = ours["img"](image), ours["seq"](sequence)
    sum(y.square().sum() for y in adapted).backward()
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    torch.testing.assert_close(ours["img"](image[1]), adapted[0][1], **TOL)
    rankwise.merge(ours)
    torch.testing.assert_close((ours["img"](image), ours["seq"](sequence)), adapted, **TOL)
    assert not torch.allclose(ours["img"].base_layer.weight, before["img"])
    rankwise.unmerge(ours)
    for name, weight in before.items():
        torch.testing.assert_close(ours[name].base_layer.weight, weight, atol=1e-6, rtol=1e-6)


def test_patch_method_save_load_and_peft_refusals(tmp_path):
    ours = rankwise.adapt(patch_model(), rankwise.config("c3a", block_size=16, targets=["img"])).eval()
    image = torch.randn(2, 16, 5, 6)
    rankwise.save(ours, tmp_path / "ours")
    loaded = rankwise.load(patch_model(), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded["img"](image), ours["img"](image), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"layer 'img' is a Conv2d; PEFT's C3A adapts no convolution layers"):
        rankwise.export_peft(ours, tmp_path / "peft")
    grouped = nn.ModuleDict({"img": nn.Conv2d(16, 48, 2, groups=4)})
    with pytest.raises(ValueError, match=r"method 'c3a' cannot adapt layer 'img' \(Conv2d with groups=4\)"):
        rankwise.adapt(grouped, rankwise.config("c3a", block_size=4, targets=["img"]))


@pytest.mark.filterwarnings("ignore:ElaLoRA. b_t=")  # one layer offers fewer components than the budget moves
@pytest.mark.parametrize("method", ["adalora", "elalora", "ardlora"])
def test_rank_allocation_on_a_convolution(method):
    """The allocators work on the adapters' tensors only, so they run on a convolution as on a linear layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 48, 2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 3))
    schedule = {"total_step": 10, "tinit": 2, "tfinal": 2, "deltaT": 1}
    kwargs = {"adalora": {"init_r": 4, "target_r": 2, **schedule}, "elalora": {"init_r": 4, **schedule},
              "ardlora": {"r": 2}}[method]
    ours = rankwise.adapt(model, rankwise.config(method, **kwargs, targets=["0"]))
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    allocator = rankwise.allocator(ours)
    allocator.attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(1)
    for step in range(10):
        ours(torch.randn(4, 16, 6, 6, generator=generator)).square().mean().backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
    if method == "adalora":
        assert rankwise.ranks(ours) == {"0": 2}
    ours.eval()
    x = torch.randn(2, 16, 6, 6, generator=generator)
    expected = ours(x)
    rankwise.merge(ours)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_sparse_and_frequency_scaled_embeddings_train():
    """scale_grad_by_freq divides A's gradient by the token's count in the batch, as in the base's lookup; a
    sparse base trains with a dense gradient for A (PEFT's backward raises: sparse through a transpose)."""
    ids = torch.tensor([[1, 2, 2]])
    grads = []
    for sparse, by_freq in [(True, False), (False, True)]:
        torch.manual_seed(0)
        model = nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=sparse, scale_grad_by_freq=by_freq)})
        ours = rankwise.adapt(model, rankwise.LoRAConfig(r=2, init_weights=False, targets=["emb"]))
        ours["emb"](ids).sum().backward()
        grads.append(ours["emb"].adapter.lora_embedding_A.grad)
    torch.testing.assert_close(grads[1][:, 2], grads[0][:, 2] / 2)
    torch.testing.assert_close(grads[1][:, 1], grads[0][:, 1])


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_to_lora_and_weighted_combinations_on_convolutions_and_embeddings(variant):
    """Both build LoRAs from matrices (``set_factor_matrices`` writes them as kernels / embedding factors): to_lora at
    full rank reproduces the model, and a 'cat' combination holds Σ wᵢ ΔWᵢ exactly on every layer."""
    _, _, ours = pair(variant)
    ours.eval()
    tokens, image = inputs()
    lora = rankwise.to_lora(ours, rank=64).eval()
    torch.testing.assert_close(lora(tokens, image), ours(tokens, image), **TOL)
    assert kinds(lora) == dict.fromkeys(TARGETS, LoRAConvAdapter) | {"emb": LoRAEmbeddingAdapter}
    _, _, model = pair("lora")
    rankwise.add_adapter(model, "other", rankwise.LoRAConfig(r=2, init_weights=False, targets=TARGETS))
    rankwise.add_weighted_adapter(model, ["default", "other"], [0.7, -0.4], "mix", combination="cat")
    for name, layer in rankwise.adapted_layers(model):
        expected = 0.7 * layer.get_adapter("default").delta_weight() - 0.4 * layer.get_adapter("other").delta_weight()
        torch.testing.assert_close(layer.get_adapter("mix").delta_weight(), expected, **TOL, msg=name)


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_weighted_combination_on_a_grouped_convolution_refuses_before_adding(combination):
    """A grouped convolution's LoRA factors are no matrices to join: 'cat' / 'linear' refuse naming the layer before
    the new adapter exists (no half-built 'mix' with its fresh init left behind), and the model is unchanged."""
    torch.manual_seed(0)
    ours = rankwise.adapt(Net(groups=2), rankwise.LoRAConfig(r=2, init_weights=False, targets=["seq", "img"]))
    rankwise.add_adapter(ours, "other", rankwise.LoRAConfig(r=2, init_weights=False, targets=["seq", "img"]))
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"layer 'img'.* grouped convolution \(groups=2\)"):
        rankwise.add_weighted_adapter(ours, ["default", "other"], [0.5, 0.5], "mix", combination=combination)
    assert rankwise.adapter_names(ours) == ["default", "other"]
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_weighted_combination_matches_peft(combination):
    """PEFT's add_weighted_adapter on the same two adapters (its 'svd' fails on this model in PEFT 0.21.2)."""
    _, theirs, ours = pair("lora")
    theirs.add_adapter("other", LoraConfig(r=4, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False))
    rankwise.add_adapter(ours, "other", rankwise.LoRAConfig(r=4, alpha=3, targets=TARGETS, init_weights=False))
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            for key, value in layer.get_adapter("other").named_parameters():
                module, _, tensor = key.partition(".")
                value.copy_(getattr(peft_layer, key)["other"] if key.startswith("lora_embedding")
                            else getattr(getattr(peft_layer, module)["other"], tensor))
    theirs.add_weighted_adapter(["default", "other"], [0.7, 0.4], "mix", combination_type=combination)
    rankwise.add_weighted_adapter(ours, ["default", "other"], [0.7, 0.4], "mix", combination=combination)
    theirs.set_adapter("mix")
    rankwise.set_adapter(ours, "mix")
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(*inputs()), theirs(*inputs()), **TOL)
