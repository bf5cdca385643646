"""PiSSA and OLoRA inits (they change the base weight) against PEFT 0.21.2: the init itself, adapters PEFT
saved without conversion imported to PEFT's own reload, rankwise adapters exported to a file PEFT reloads,
unload semantics, and the inits import_peft refuses.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

import rankwise
from rankwise.adapters.lora import LoRAAdapter

TOL = {"atol": 1e-5, "rtol": 1e-5}


class Net(nn.Module):
    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        self.proj = Conv1D(24, 16) if conv1d else nn.Linear(16, 24)
        self.out = Conv1D(12, 24) if conv1d else nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.out(torch.relu(self.proj(x)))))


def base_net(conv1d: bool = False, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net(conv1d).to(dtype)


def inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)


def peft_model(base: nn.Module, init: str, conv1d: bool = False, targets=("proj", "out"), **kwargs) -> nn.Module:
    config = LoraConfig(r=4, lora_alpha=6, target_modules=list(targets), init_lora_weights=init,
                        fan_in_fan_out=conv1d, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), config)


def perturb(model: nn.Module) -> None:
    """Stand-in for training: move every adapter tensor away from its init."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def layer(model: nn.Module, name: str):
    return dict(rankwise.adapted_layers(model))[name]


def peft_reload(base: nn.Module, directory) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


# OLoRA on Conv1D is left out: PEFT's is wrong there (test_olora_on_conv1d_is_right_where_peft_is_not).
INIT_LAYERS = pytest.mark.parametrize(
    ("init", "conv1d"), [("pissa", False), ("pissa", True), ("olora", False)], ids=["pissa", "pissa-conv1d", "olora"]
)


@INIT_LAYERS
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_init_matches_peft(init, use_dora, conv1d):
    """Same factors, same residual base weight, same magnitude, and the model still computes the base."""
    base = base_net(conv1d)
    theirs = peft_model(base, init, conv1d, use_dora=use_dora).eval()
    config = rankwise.config("dora" if use_dora else "lora", r=4, alpha=6, init_weights=init, targets=["proj", "out"])
    ours = rankwise.adapt(copy.deepcopy(base), config).eval()
    for name in ("proj", "out"):
        mine, peft_layer = layer(ours, name), theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.adapter.lora_A.weight, peft_layer.lora_A["default"].weight, **TOL)
        torch.testing.assert_close(mine.adapter.lora_B.weight, peft_layer.lora_B["default"].weight, **TOL)
        torch.testing.assert_close(mine.base_layer.weight, peft_layer.base_layer.weight, **TOL)
        assert not torch.allclose(mine.base_layer.weight, base.get_submodule(name).weight, atol=1e-3)
        if use_dora:
            torch.testing.assert_close(
                mine.adapter.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight, **TOL
            )
    torch.testing.assert_close(ours(inputs()), base(inputs()), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_factors_are_the_papers(init):
    """PiSSA: s·B₀A₀ is the best rank-r approximation of W; OLoRA: B₀ orthonormal and A₀ = B₀ᵀW."""
    base = nn.Linear(16, 24)
    ours = rankwise.adapt(nn.Sequential(copy.deepcopy(base)), rankwise.LoRAConfig(r=4, alpha=6, init_weights=init,
                                                                                  targets=["0"]))
    adapter = ours[0].adapter
    A, B, s, W = adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling, base.weight
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(s * B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], **TOL)
    else:
        torch.testing.assert_close(B.T @ B, torch.eye(4), **TOL)
        torch.testing.assert_close(A, B.T @ W, **TOL)
    torch.testing.assert_close(ours[0].base_layer.weight, W - s * B @ A, **TOL)


@INIT_LAYERS
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_import_matches_peft_reload(init, use_dora, conv1d, tmp_path):
    """An adapter PEFT saved with these inits (no conversion) imports to what PEFT's own reload computes."""
    base = base_net(conv1d)
    theirs = peft_model(base, init, conv1d, use_dora=use_dora, use_rslora=True)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    reloaded = peft_reload(base, tmp_path)
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours(inputs()), reloaded(inputs()), **TOL)
    torch.testing.assert_close(ours(inputs()), theirs.eval()(inputs()), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_import_on_a_half_base_matches_peft_reload(init, dtype, tmp_path):
    """The residual is computed in float32 and rounded once to the base dtype, as PEFT does."""
    base = base_net(dtype=dtype)
    theirs = peft_model(base, init)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    reloaded = peft_reload(base, tmp_path)
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    for name in ("proj", "out"):
        assert torch.equal(layer(ours, name).base_layer.weight, reloaded.base_model.model.get_submodule(name).weight)
    torch.testing.assert_close(ours(inputs(dtype)), reloaded(inputs(dtype)), atol=1e-2, rtol=1e-2)


def test_init_names_are_read_like_peft(tmp_path):
    """PEFT compares 'olora' (and 'gaussian') case-insensitively."""
    base = base_net()
    theirs = peft_model(base, "olora")
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "OLoRA"}))
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours(inputs()), peft_reload(base, tmp_path)(inputs()), **TOL)
    torch.testing.assert_close(ours(inputs()), theirs.eval()(inputs()), **TOL)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_export_reloads_in_peft(init, method, tmp_path):
    base = base_net()
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(method, r=4, alpha=6, init_weights=init,
                                                               targets=["proj", "out"]))
    perturb(ours)
    rankwise.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    torch.testing.assert_close(peft_reload(base, tmp_path)(inputs()), ours.eval()(inputs()), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rankwise_save_load_round_trip(init, tmp_path):
    base = base_net()
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=4, init_weights=init, targets=["proj", "out"]))
    perturb(ours)
    rankwise.save(ours, tmp_path)
    loaded = rankwise.load(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(loaded(inputs()), ours.eval()(inputs()), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unload_gives_peft_residual_or_merged_base(init):
    base = base_net()
    theirs = peft_model(base, init)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=4, alpha=6, init_weights=init,
                                                                   targets=["proj", "out"]))
    perturb(theirs)
    for name in ("proj", "out"):
        peft_layer = theirs.base_model.model.get_submodule(name)
        layer(ours, name).adapter.lora_A.weight.data.copy_(peft_layer.lora_A["default"].weight)
        layer(ours, name).adapter.lora_B.weight.data.copy_(peft_layer.lora_B["default"].weight)
    residual = rankwise.unload(copy.deepcopy(ours), merge=False)
    merged = rankwise.unload(ours, merge=True)
    peft_residual = copy.deepcopy(theirs).unload()
    peft_merged = theirs.merge_and_unload()
    for name in ("proj", "out"):
        torch.testing.assert_close(residual.get_submodule(name).weight, peft_residual.get_submodule(name).weight, **TOL)
        torch.testing.assert_close(merged.get_submodule(name).weight, peft_merged.get_submodule(name).weight, **TOL)


def test_adapt_changes_no_base_when_a_later_layer_does_not_fit():
    """The base change waits until every layer is validated (Adapter.attach)."""
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 2))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="exceeds min"):
        rankwise.adapt(model, rankwise.LoRAConfig(r=4, init_weights="pissa", targets=["0", "1"]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_olora_on_conv1d_is_right_where_peft_is_not(tmp_path):
    """PEFT's OLoRA factorises Conv1D's stored (in, out) matrix: the model changes at init on a square
    layer. rankwise factorises the (out, in) matrix, and refuses to import or export such files."""
    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(8, 8))
    x = torch.randn(3, 8)
    theirs = peft_model(base, "olora", conv1d=True, targets=["0"])
    assert (theirs(x) - base(x)).abs().max() > 0.1  # PEFT's bug
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=2, init_weights="olora", targets=["0"]))
    torch.testing.assert_close(ours(x), base(x), **TOL)
    theirs.save_pretrained(tmp_path / "peft")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="init_lora_weights='olora' with fan_in_fan_out=True"):
        rankwise.import_peft(fresh, tmp_path / "peft")
    assert torch.equal(fresh[0].weight, base[0].weight)
    with pytest.raises(ValueError, match="olora"):
        rankwise.export_peft(ours, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_import_with_rank_above_min_shape(init, tmp_path):
    """PEFT accepts r > min(m, n) with PiSSA / OLoRA and builds min(m, n)-wide factors (s still uses r)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=4, target_modules=["0"],
                                                                init_lora_weights=init))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    assert ours[0].adapter.lora_A.weight.shape == (4, 6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), peft_reload(base, tmp_path)(x), **TOL)
    config = rankwise.LoRAConfig(r=8, init_weights=init, allow_excess_rank=True)
    assert rankwise.trainable_parameters(ours) == LoRAAdapter.expected_num_params(4, 6, config) == 4 * (4 + 6)


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga", "unknown"])
def test_inits_not_reproduced_are_refused(init, tmp_path):
    base = base_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["proj", "out"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init}))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        rankwise.import_peft(model, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    assert not list(rankwise.adapted_layers(model))


@pytest.mark.parametrize(("init", "use_dora"), [("eva", False), ("eva", True), ("orthogonal", False),
                                              ("orthogonal", True), ("mica", False)])
def test_inits_that_leave_the_base_import_as_their_trained_tensors(init, use_dora, tmp_path):
    """EVA, orthogonal and MiCA shape only the starting tensors and leave the base alone; PEFT's reload overwrites
    every tensor from the file, so the import is exact (EVA's rank pattern and eva_config included). PEFT refuses
    MiCA with DoRA ("unsupported variant combination"), so no such file exists."""
    base = base_net()
    extra = {"eva_config": peft.EvaConfig(rho=2.0), "rank_pattern": {"out": 2}} if init == "eva" else {}
    theirs = peft_model(base, init, use_dora=use_dora, **extra)
    perturb(theirs)  # training, and for EVA the data-driven init PEFT would compute from activations
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init and (init != "eva" or saved["eva_config"]["rho"] == 2.0)
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(ours.head.parameters(), base.head.parameters()))
    for name in ("proj", "out"):
        assert torch.equal(layer(ours, name).base_layer.weight, getattr(base, name).weight)  # base untouched
    if init == "eva":
        assert layer(ours, "out").adapter.lora_A.weight.shape[0] == 2
    torch.testing.assert_close(ours(inputs()), peft_reload(base, tmp_path)(inputs()), **TOL)
    torch.testing.assert_close(ours(inputs()), theirs.eval()(inputs()), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_failed_import_leaves_the_base_bit_identical(dtype, tmp_path):
    """The import fails after PiSSA changed the base (a tensor is missing): the original weights come back."""
    from safetensors.torch import load_file, save_file

    base = base_net(dtype=dtype)
    theirs = peft_model(base, "pissa")
    theirs.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors[next(key for key in tensors if key.endswith("out.lora_B.weight"))]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="missing"):
        rankwise.import_peft(model, tmp_path)
    assert not list(rankwise.adapted_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_failed_rankwise_load_leaves_the_base_bit_identical(init, tmp_path):
    """rankwise.load shares the restore: a NaN in the file is refused after the init rewrote the base."""
    from safetensors.torch import load_file, save_file

    base = base_net()
    rankwise.save(rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=4, init_weights=init,
                                                                          targets=["proj", "out"])), tmp_path)
    tensors = load_file(tmp_path / "adapter.safetensors")
    key = next(key for key in tensors if key.endswith("out.adapter.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "adapter.safetensors")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="NaN"):
        rankwise.load(model, tmp_path)
    assert not list(rankwise.adapted_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
