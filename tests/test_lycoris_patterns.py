"""LoHa and LoKr with per-layer rank and alpha (``rank_pattern`` / ``alpha_pattern``) against PEFT 0.21.2.

PEFT's LyCORIS ``_create_and_replace`` gives each layer the value of the first key of each pattern that matches its
name (``get_pattern_key``), else ``r`` / ``alpha``. The patterns below give every layer of a model with Linear and
Conv2d layers its own (r, alpha), through a literal name, a suffix matching two layers (the first key wins), a regex
and the global values; each test checks one consequence against PEFT: seeded init, outputs, gradients, ΔW and merged
weights, parameter counts, adapter files both ways, and the refusal of malformed patterns.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model

import rankwise
from rankwise import cli
from rankwise.adapters.loha import LoHaAdapter, LoHaConvAdapter
from rankwise.adapters.lokr import LoKrAdapter, LoKrConvAdapter
from rankwise.core.config import LayerPatterns, pattern_key
from rankwise.experiment.budget import count_parameters

TOL = {"atol": 1e-5, "rtol": 1e-5}
PEFT_CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig}
TARGETS = ["enc.0.proj", "enc.1.proj", "dec.out", "dec.head", "conv"]
# "enc.1.proj" precedes "proj", which matches both proj layers: enc.1.proj takes 6 (first key wins, as PEFT), and
# "proj" precedes the regex "enc\.1\..*" in the alphas, so enc.1.proj takes alpha 5, not 9. "dec\.o\w+" is a regex
# for dec.out only; dec.head keeps r, dec.out keeps alpha.
RANK_PATTERN = {"enc.1.proj": 6, "proj": 1, r"dec\.o\w+": 3, "conv": 4}
ALPHA_PATTERN = {"proj": 5.0, r"enc\.1\..*": 9.0, "head": 0.5, "conv": 2}
R, ALPHA = 2, 3.0
EXPECTED = {"enc.0.proj": (1, 5.0), "enc.1.proj": (6, 5.0), "dec.out": (3, ALPHA), "dec.head": (R, 0.5),
            "conv": (4, 2.0)}
# Method options that change which tensors a layer's r gives (LoHa's Tucker cores on the conv, LoKr's low-rank W1).
CASES = {
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_effective_conv2d": True}),
    "lokr": ("lokr", {}),
    "lokr-decompose-both": ("lokr", {"decompose_both": True}),
}


class Net(nn.Module):
    """Four Linear layers under nested names and a 3x3 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(n, 24)}) for n in (16, 24))
        self.dec = nn.ModuleDict({"out": nn.Linear(24, 32), "head": nn.Linear(32, 8)})
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc[1]["proj"](torch.tanh(self.enc[0]["proj"](x))))
        y = self.dec["head"](torch.tanh(self.dec["out"](h)))
        return torch.cat([y.flatten(1), torch.tanh(self.conv(image)).flatten(1)], dim=1)


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)


def options(case: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    method, extra = CASES[case]
    return method, {"r": R, "alpha": ALPHA, "rank_pattern": dict(RANK_PATTERN), "alpha_pattern": dict(ALPHA_PATTERN),
                    **extra, **kwargs}


def peft_layer(theirs: nn.Module, name: str) -> nn.Module:
    return theirs.base_model.model.get_submodule(name)


def build(case: str, seed: int = 7, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """PEFT's adapter and ours on copies of one base, each built right after ``torch.manual_seed(seed)``."""
    method, values = options(case, **kwargs)
    base = base_net()
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method](target_modules=TARGETS, **values))
    torch.manual_seed(seed)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(method, targets=TARGETS, **values))
    return ours, theirs


def pair(case: str) -> tuple[nn.Module, nn.Module]:
    """As :func:`build` with random (non-zero) tensors, ours holding PEFT's."""
    ours, theirs = build(case, init_weights=False)
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            for tensor, parameter in layer.adapter.named_parameters():
                parameter.copy_(getattr(peft_layer(theirs, name), tensor)["default"])
    return ours, theirs


def tucker_gradient_is_wrong_in_peft(layer: nn.Module, tensor: str) -> bool:
    """PEFT's LoHa Tucker backward returns wrong gradients for hada_w1_a / hada_w2_a (loha.py docstring)."""
    return isinstance(layer.adapter, LoHaConvAdapter) and layer.adapter.tucker and tensor in ("hada_w1_a", "hada_w2_a")


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_gets_peft_s_rank_and_alpha(case):
    """The pattern values land where PEFT puts them (first key wins, regex keys, global fallback)."""
    ours, theirs = build(case)
    for name, layer in rankwise.adapted_layers(ours):
        r, alpha = EXPECTED[name]
        peft_layer_ = peft_layer(theirs, name)
        assert (peft_layer_.r["default"], peft_layer_.alpha["default"]) == (r, alpha), name  # the table is PEFT's
        assert layer.adapter.r == r, name
        assert layer.adapter.scaling == pytest.approx(alpha / r, rel=1e-12), name
        assert layer.adapter.scaling == pytest.approx(peft_layer_.scaling["default"], rel=1e-12), name
        assert f"r={r}, s={alpha / r:g}" in layer.adapter.describe()
    table = rankwise.summary(ours)
    for name, (r, alpha) in EXPECTED.items():
        assert any(line.startswith(name + " ") and f"r={r}, s={alpha / r:g}" in line for line in table.splitlines())


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("alone", ["rank_pattern", "alpha_pattern"])
def test_one_pattern_alone_equals_peft(method, alone):
    """Either pattern works without the other (the other value stays global), as in PEFT (whose "no pattern" is {};
    None raises there)."""
    ours, theirs = build(method, init_weights=False, **{"rank_pattern": {}, "alpha_pattern": {},
                                                        alone: {"rank_pattern": RANK_PATTERN,
                                                                "alpha_pattern": ALPHA_PATTERN}[alone]})
    for name, layer in rankwise.adapted_layers(ours):
        r, alpha = EXPECTED[name]
        r, alpha = (r, ALPHA) if alone == "rank_pattern" else (R, alpha)
        assert (layer.adapter.r, layer.adapter.scaling) == (r, pytest.approx(alpha / r, rel=1e-12)), name
        assert layer.adapter.scaling == pytest.approx(peft_layer(theirs, name).scaling["default"], rel=1e-12), name
        for tensor, parameter in layer.adapter.named_parameters():
            assert parameter.shape == getattr(peft_layer(theirs, name), tensor)["default"].shape, f"{name}.{tensor}"


@pytest.mark.parametrize("case", list(CASES))
def test_seeded_init_equals_peft(case):
    """Same seed, same tensors: every layer's factors are drawn at its own rank, in PEFT's order."""
    ours, theirs = build(case, seed=4)
    for name, layer in rankwise.adapted_layers(ours):
        for tensor, parameter in layer.adapter.named_parameters():
            torch.testing.assert_close(parameter, getattr(peft_layer(theirs, name), tensor)["default"], atol=0, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_merge_equal_peft(case):
    ours, theirs = pair(case)
    x = inputs()
    out_ours, out_theirs = ours(*x), theirs(*x)
    with torch.no_grad(), theirs.disable_adapter():
        assert not torch.allclose(theirs(*x), out_theirs, atol=1e-3)  # the adapter is non-trivial
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for name, layer in rankwise.adapted_layers(ours):
        for tensor, parameter in layer.adapter.named_parameters():
            if not tucker_gradient_is_wrong_in_peft(layer, tensor):
                expected = getattr(peft_layer(theirs, name), tensor)["default"].grad
                torch.testing.assert_close(parameter.grad, expected, **TOL, msg=f"{name}.{tensor}")
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.adapter.delta_weight().reshape(layer.base_layer.weight.shape),
                                       peft_layer(theirs, name).get_delta_weight("default"), **TOL)
        rankwise.merge(ours)
        theirs.merge_adapter()
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.base_layer.weight, peft_layer(theirs, name).base_layer.weight, **TOL)
        torch.testing.assert_close(ours(*x), theirs(*x), **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_counts_equal_peft(case, tmp_path, capsys):
    """trainable_parameters = PEFT's get_nb_trainable_parameters = the per-layer closed forms = the budget count
    = ``rankwise inspect``'s count of the saved adapter."""
    ours, theirs = build(case)
    live = rankwise.trainable_parameters(ours)
    assert live == theirs.get_nb_trainable_parameters()[0]
    config = rankwise.adapter_config(ours)
    closed = 0
    for name, layer in rankwise.adapted_layers(ours):
        own = config.for_layer(name)
        base = layer.base_layer
        if isinstance(base, nn.Conv2d):
            conv_cls = LoHaConvAdapter if config.method == "loha" else LoKrConvAdapter
            closed += conv_cls.expected_conv_params(base, own)
        else:
            linear_cls = LoHaAdapter if config.method == "loha" else LoKrAdapter
            closed += linear_cls.expected_num_params(base.out_features, base.in_features, own)
    assert closed == live
    assert count_parameters(base_net(), config) == live
    directory = rankwise.save(ours, tmp_path / "adapter")
    assert cli.main(["inspect", str(directory), "--json"]) == 0
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert totals["adapter_trainable"] == totals["adapter_stored"] == live
    # Without the patterns every layer would have r = 2: a different count (the patterns matter here).
    method, values = options(case)
    plain = rankwise.config(method, targets=TARGETS, **{**values, "rank_pattern": None, "alpha_pattern": None})
    assert count_parameters(base_net(), plain) != live


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_both_ways(case, tmp_path):
    """A PEFT file with patterns imports as PEFT reloads it (its ranks and scales); an export writes both patterns in
    their order and PEFT reloads it to the same model."""
    ours, theirs = pair(case)
    x = inputs()
    with torch.no_grad():
        expected = theirs.eval()(*x)
        theirs.save_pretrained(tmp_path / "theirs")
        written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
        peft_reload = PeftModel.from_pretrained(base_net(), tmp_path / "theirs").eval()
        imported = rankwise.import_peft(base_net(), tmp_path / "theirs").eval()
        torch.testing.assert_close(imported(*x), peft_reload(*x), **TOL)
        config = rankwise.adapter_config(imported)
        assert (config.rank_pattern, config.alpha_pattern) == (RANK_PATTERN, ALPHA_PATTERN)
        assert list(config.alpha_pattern) == list(written["alpha_pattern"])  # the file's order, as PEFT reads it
        for name, layer in rankwise.adapted_layers(imported):
            reloaded_layer = peft_layer(peft_reload, name)
            assert layer.adapter.r == reloaded_layer.r["default"]
            assert layer.adapter.scaling == pytest.approx(reloaded_layer.scaling["default"], rel=1e-12)

        rankwise.export_peft(ours, tmp_path / "ours")
        written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert written["rank_pattern"] == RANK_PATTERN and written["alpha_pattern"] == ALPHA_PATTERN
        assert list(written["rank_pattern"]) == list(RANK_PATTERN)
        assert list(written["alpha_pattern"]) == list(ALPHA_PATTERN)  # first key wins: the order is the meaning
        reloaded = PeftModel.from_pretrained(base_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(reloaded(*x), expected, **TOL)


def test_peft_save_pretrained_sorts_pattern_keys_so_its_reload_can_differ(tmp_path):
    """Why the import is compared with PEFT's *reload*: PEFT 0.21.2 writes adapter_config.json with sort_keys=True,
    so "enc\\.1\\..*" comes before "proj" in the saved alpha_pattern and the reloaded enc.1.proj takes alpha 9 where the
    model that was saved had 5 (rankwise's export and save keep the order: the tests above and below)."""
    _, theirs = pair("loha")
    theirs.save_pretrained(tmp_path)
    assert list(json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"]) == sorted(ALPHA_PATTERN)
    reloaded = PeftModel.from_pretrained(base_net(), tmp_path)
    assert peft_layer(theirs, "enc.1.proj").scaling["default"] == pytest.approx(5.0 / 6)
    assert peft_layer(reloaded, "enc.1.proj").scaling["default"] == pytest.approx(9.0 / 6)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_rankwise_save_and_load_keep_each_layer_s_values(method, tmp_path):
    """rankwise's own files keep the patterns in their order (a sorted alpha_pattern would give enc.1.proj alpha 9)."""
    targets = TARGETS[:4] if method == "lora" else TARGETS
    config = rankwise.config(method, targets=targets, r=R, alpha=ALPHA, rank_pattern=RANK_PATTERN,
                             alpha_pattern=ALPHA_PATTERN, init_weights=False)
    torch.manual_seed(3)
    model = rankwise.adapt(base_net(), config).eval()
    loaded = rankwise.load(base_net(), rankwise.save(model, tmp_path / "rw")).eval()
    assert list(rankwise.adapter_config(loaded).alpha_pattern) == list(ALPHA_PATTERN)
    scales = {name: (layer.adapter.r, layer.adapter.scaling) for name, layer in rankwise.adapted_layers(loaded)}
    assert scales == {name: (r, alpha / r) for name, (r, alpha) in EXPECTED.items() if name in targets}
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), model(*x), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_export_without_patterns_writes_empty_dicts_as_peft(method, tmp_path):
    model = rankwise.adapt(base_net(), rankwise.config(method, targets=["dec.out"], r=2))
    rankwise.export_peft(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {} and written["alpha_pattern"] == {}
    assert rankwise.adapter_config(rankwise.import_peft(base_net(), tmp_path)).rank_pattern is None


BAD = [
    ({"rank_pattern": ["proj"]}, r"rank_pattern must be a dict \{layer name or regex: value\}, got \['proj'\]"),
    ({"alpha_pattern": "proj"}, r"alpha_pattern must be a dict"),
    ({"rank_pattern": {"(": 2}}, r"rank_pattern key '\(' is not a valid regular expression"),
    ({"alpha_pattern": {"proj[": 2.0}}, r"alpha_pattern key 'proj\[' is not a valid regular expression"),
    ({"rank_pattern": {3: 2}}, r"rank_pattern key 3 is not a valid regular expression"),
    ({"rank_pattern": {"proj": 0}}, r"rank_pattern\['proj'\] must be a positive integer, got 0"),
    ({"rank_pattern": {"proj": -2}}, r"rank_pattern\['proj'\] must be a positive integer, got -2"),
    ({"rank_pattern": {"proj": 2.5}}, r"rank_pattern\['proj'\] must be a positive integer, got 2.5"),
    ({"rank_pattern": {"proj": True}}, r"rank_pattern\['proj'\] must be a positive integer, got True"),
    ({"alpha_pattern": {"proj": 0}}, r"alpha_pattern\['proj'\] must be a finite number > 0, got 0"),
    ({"alpha_pattern": {"proj": -1.0}}, r"alpha_pattern\['proj'\] must be a finite number > 0, got -1.0"),
    ({"alpha_pattern": {"proj": math.nan}}, r"alpha_pattern\['proj'\] must be a finite number > 0, got nan"),
    ({"alpha_pattern": {"proj": "2"}}, r"alpha_pattern\['proj'\] must be a finite number > 0, got '2'"),
]


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("kwargs, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_patterns_are_refused(method, kwargs, message):
    name = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}[method]
    with pytest.raises(ValueError, match=rf"^{name}: {message}"):
        rankwise.config(method, **kwargs)


def test_bad_pattern_in_a_peft_file_is_refused_before_the_model_changes(tmp_path):
    theirs = get_peft_model(base_net(), LoHaConfig(target_modules=["dec.out"], r=2))
    theirs.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**payload, "rank_pattern": {"out": 0}}))
    model = base_net()
    with pytest.raises(ValueError, match=r"rank_pattern\['out'\] must be a positive integer"):
        rankwise.import_peft(model, tmp_path)
    assert not list(rankwise.adapted_layers(model))


def test_a_pattern_rank_above_the_layer_s_limit_is_refused_naming_the_layer():
    """The rank limit of a fresh LoHa adapter applies to each layer's own r (PEFT accepts any, import_peft too)."""
    with pytest.raises(ValueError, match=r"layer 'dec.head'.*rank r=9 exceeds min\(out, in\)=8.*rank_pattern"):
        rankwise.adapt(base_net(), rankwise.config("loha", targets=TARGETS, r=2, rank_pattern={"head": 9}))


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_lora_and_lycoris_share_one_pattern_implementation(method):
    """One rule, one validation: LoRA's and LyCORIS's configs take them from LayerPatterns."""
    config = rankwise.config(method, r=R, alpha=ALPHA, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    assert isinstance(config, LayerPatterns)
    for attribute in ("check_patterns", "rank_of", "alpha_of", "for_layer"):
        assert getattr(type(config), attribute) is getattr(LayerPatterns, attribute)
    for name, (r, alpha) in EXPECTED.items():
        layer = config.for_layer(name)
        assert (layer.r, layer.alpha, layer.rank_pattern, layer.alpha_pattern) == (r, alpha, None, None)
    from rankwise.adapters.lora import pattern_key as lora_pattern_key

    assert lora_pattern_key is pattern_key
