"""import_peft accounts for every field of PEFT's config classes (LoraConfig, C3AConfig, GraloraConfig,
MissConfig, LoHaConfig, LoKrConfig): each is metadata, reproduced exactly, inert alone, or refused when set to a non-default value.

The test walks ``dataclasses.fields()`` of PEFT's own classes, so a field a later PEFT adds lands in the
"refused" branch (or fails here) until someone decides what it means for rankwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import (
    C3AConfig,
    GraloraConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    PeftModel,
    get_peft_model,
)

import rankwise
from rankwise.core.registry import get_method
from rankwise.integrations.peft import INERT_FIELDS, METADATA_FIELDS, reproduced_fields

SHARED = {"target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out"}
# The decisions, written out: what rankwise reproduces per PEFT config class (the oracle tests prove these).
REPRODUCED = {
    "lora": SHARED | {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "lora_bias",
                      "rank_pattern", "alpha_pattern"},
    "c3a": SHARED | {"block_size", "init_weights"},
    "gralora": SHARED | {"r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout", "init_weights"},
    "miss": SHARED | {"r", "miss_dropout", "mini_r", "init_weights"},
    # use_effective_conv2d: the Tucker cores on convolutions (tests/test_lycoris_conv.py), inert on Linear layers
    # rank_pattern / alpha_pattern: per-layer r and alpha (tests/test_lycoris_patterns.py)
    "loha": SHARED | {"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                      "rank_pattern", "alpha_pattern"},
    "lokr": SHARED | {"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                      "decompose_both", "decompose_factor", "rank_dropout_scale", "rank_pattern", "alpha_pattern"},
}
METADATA = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode"}
# Changes nothing alone: PEFT drops runtime_config on load, eva_config only describes how EVA computed its
# starting tensors (the file's tensors replace them); the others qualify a field refused when set.
INERT = {"runtime_config", "eva_config", "layers_pattern", "megatron_core", "qalora_group_size"}

PEFT_CONFIGS = {
    "lora": (LoraConfig, {"r": 2, "lora_alpha": 4}),
    "c3a": (C3AConfig, {"block_size": 4, "init_weights": "gaussian"}),
    "gralora": (GraloraConfig, {"r": 4, "alpha": 8, "gralora_k": 2, "init_weights": False}),
    "miss": (MissConfig, {"r": 4, "init_weights": False}),
    "loha": (LoHaConfig, {"r": 2, "alpha": 3, "init_weights": False}),
    "lokr": (LoKrConfig, {"r": 1, "alpha": 3, "decompose_both": True, "init_weights": False}),
}


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def saved_peft_adapter(method: str, directory) -> dict[str, Any]:
    """A real PEFT adapter directory (non-trivial tensors); returns its config JSON."""
    cls, kwargs = PEFT_CONFIGS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base_model(), cls(target_modules=["0", "2"], **kwargs))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    return json.loads((directory / "adapter_config.json").read_text())


def write_config(directory, config: dict[str, Any]) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(config))


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def non_default(field: dataclasses.Field) -> Any:
    """Some JSON value different from the field's PEFT default."""
    default = default_of(field)
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, str):
        return default + "_other"
    if isinstance(default, list):
        return ["sentinel"]
    return {"sentinel": 1}  # None, a dict or a config object


def peft_lora(base: nn.Module, **kwargs: Any) -> nn.Module:
    """PEFT LoRA on a copy of ``base`` with random (non-zero) B."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))


def imported_like_peft(base: nn.Module, theirs: nn.Module, directory, x: torch.Tensor) -> nn.Module:
    """Save ``theirs``, import it onto a copy of ``base`` and check both compute the same."""
    theirs.save_pretrained(directory)
    ours = rankwise.import_peft(copy.deepcopy(base), directory).eval()
    torch.testing.assert_close(ours(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)
    return ours


def outputs(model: nn.Module) -> torch.Tensor:
    return model.eval()(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_reproduced_list_is_what_the_code_reproduces(method):
    """The written decisions above and the code agree."""
    spec = get_method(method)
    assert reproduced_fields(spec, spec.config_cls()) == REPRODUCED[method]
    assert METADATA_FIELDS == METADATA and INERT_FIELDS == INERT
    names = {f.name for f in dataclasses.fields(PEFT_CONFIGS[method][0])}
    assert REPRODUCED[method] - SHARED <= names


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_every_peft_field_is_reproduced_inert_or_refused(method, tmp_path):
    saved = saved_peft_adapter(method, tmp_path)
    reference = outputs(PeftModel.from_pretrained(base_model(), tmp_path))
    torch.testing.assert_close(outputs(rankwise.import_peft(base_model(), tmp_path)), reference, atol=1e-5, rtol=1e-5)
    refused = []
    for field in dataclasses.fields(PEFT_CONFIGS[method][0]):
        if field.name in REPRODUCED[method] | METADATA:
            continue
        write_config(tmp_path, {**saved, field.name: non_default(field)})
        model = base_model()
        if field.name in INERT:
            torch.testing.assert_close(outputs(rankwise.import_peft(model, tmp_path)), reference, atol=1e-5, rtol=1e-5)
            continue
        refused.append(field.name)
        with pytest.raises(ValueError, match=rf"{field.name}=.*no rankwise equivalent"):
            rankwise.import_peft(model, tmp_path)
        assert not list(rankwise.adapted_layers(model))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base_model().parameters()))
    assert "layers_to_transform" in refused
    assert not {"rank_pattern", "alpha_pattern"} & set(refused)  # per-layer r and alpha are reproduced
    if method not in ("loha", "lokr"):  # PEFT's LyCORIS configs have no bias field
        assert "bias" in refused
    if method == "lora":
        assert {"use_qalora", "layer_replication", "target_parameters", "trainable_token_indices", "megatron_config",
                "lora_ga_config", "arrow_config", "alora_invocation_tokens",
                "loftq_config", "corda_config", "ensure_weight_tying"} <= set(refused)


def test_a_field_from_a_later_peft_is_refused_unless_empty(tmp_path):
    saved = saved_peft_adapter("lora", tmp_path)
    write_config(tmp_path, {**saved, "lora_new_variant": {"k": 3}})
    with pytest.raises(ValueError, match="lora_new_variant=.*no rankwise equivalent"):
        rankwise.import_peft(base_model(), tmp_path)
    write_config(tmp_path, {**saved, "lora_new_variant": None})
    rankwise.import_peft(base_model(), tmp_path)


def test_modules_to_save_follow_peft_suffix_rule(tmp_path):
    """PEFT wraps every module whose name ends with an entry, without a dot boundary ("head" -> lm_head too)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)
            self.lm_head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.proj(x))
            return self.head(h) + self.lm_head(h)

    torch.manual_seed(0)
    base = Net()
    theirs = peft_lora(base, r=2, target_modules=["proj"], modules_to_save=["head"])
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(2.0)
    imported_like_peft(base, theirs, tmp_path, torch.randn(3, 8))


def test_export_refuses_modules_to_save_that_peft_would_stretch_to_other_modules(tmp_path):
    """audit p07: modules_to_save=["head"] beside an adapted "pre_head" (DistilBERT's pre_classifier / classifier).
    PEFT's suffix rule has no dot boundary, so it would wrap the adapted pre_head too: PEFT itself raises a
    TypeError on that selection, and an exported file would load in neither PEFT nor rankwise. export_peft refuses,
    naming the module, and writes nothing; an unadapted module the rule reaches is refused as well."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 16)
            self.pre_head = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.pre_head(torch.relu(self.body(x)))))

    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):  # PEFT's own reading of this config
        peft_lora(Net(), r=2, target_modules=["body", "pre_head"], modules_to_save=["head"])
    torch.manual_seed(0)
    ours = rankwise.adapt(Net(), rankwise.LoRAConfig(r=2, targets=["body", "pre_head"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"would also wrap 'pre_head' \(an adapted layer\), which rankwise does not "
                                         r"save in full \(it saves \['head'\]\)"):
        rankwise.export_peft(ours, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    ours = rankwise.adapt(Net(), rankwise.LoRAConfig(r=2, targets=["body"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"would also wrap 'pre_head', which"):
        rankwise.export_peft(ours, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # entries PEFT reads as rankwise does export as before
    base = Net()
    config = rankwise.LoRAConfig(r=2, init_weights=False, targets=["body", "head"], modules_to_save=["pre_head"])
    ours = rankwise.adapt(copy.deepcopy(base), config)
    with torch.no_grad():
        ours.pre_head.trained_module.weight.add_(0.5)
    rankwise.export_peft(ours, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["modules_to_save"] == ["pre_head"]
    torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path / "c").eval()(torch.ones(2, 16)),
                               ours.eval()(torch.ones(2, 16)), atol=1e-5, rtol=1e-5)


class Nested(nn.Module):
    """A top-level ``up`` and a nested ``block.up``: PEFT's list ``["up"]`` selects both."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.block = nn.Module()
        self.block.up = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.up(torch.tanh(self.up(x)))


@pytest.mark.parametrize("targets, written", [("up", "up"), (r"block\.up", ["block.up"]), (r"up|block\.up", ["block.up", "up"])])
def test_export_names_exactly_the_adapted_layers_for_peft(targets, written, tmp_path):
    """A list PEFT would widen (its dot-boundary suffix rule) is written as a regex it full-matches; a list of
    full names that selects nothing else stays a list. PEFT then adapts exactly the exported layers; with
    random, non-zero B (init_weights=False) a widened reload would change the output."""
    torch.manual_seed(0)
    base = Nested()
    torch.manual_seed(1)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=2, targets=targets, init_weights=False))
    rankwise.export_peft(ours, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["target_modules"] == written
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    adapted_by_peft = sorted(
        name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    )
    assert adapted_by_peft == sorted(dict(rankwise.adapted_layers(ours)))
    x = torch.randn(3, 8)
    torch.testing.assert_close(theirs(x), ours.eval()(x), atol=1e-6, rtol=0)
    again = rankwise.import_peft(copy.deepcopy(base), tmp_path / "export").eval()
    assert sorted(dict(rankwise.adapted_layers(again))) == adapted_by_peft
    torch.testing.assert_close(again(x), ours(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("exclude", [["0"], "^0$"], ids=["list", "regex"])
def test_exclude_modules_forms_match_peft(exclude, tmp_path):
    base = base_model()
    theirs = peft_lora(base, r=2, target_modules=["0", "2"], exclude_modules=exclude)
    ours = imported_like_peft(base, theirs, tmp_path, torch.randn(3, 16))
    assert [name for name, _ in rankwise.adapted_layers(ours)] == ["2"]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_rank_above_min_shape_imports_like_peft(use_dora, tmp_path):
    """PEFT accepts r > min(out, in) (here r=12 on a 16->8 layer); a file it loads must import."""
    base = base_model()
    theirs = peft_lora(base, r=12, target_modules=["0", "2"], use_dora=use_dora)
    ours = imported_like_peft(base, theirs, tmp_path, torch.randn(3, 16))
    assert ours[2].adapter.lora_A.weight.shape == (12, 16)
    rankwise.save(ours, tmp_path / "rw")  # and it round-trips through rankwise's own format
    torch.testing.assert_close(outputs(rankwise.load(copy.deepcopy(base), tmp_path / "rw")), outputs(theirs),
                               atol=1e-5, rtol=1e-5)


def test_fresh_adapt_still_refuses_rank_above_min_shape():
    with pytest.raises(ValueError, match="r=12 exceeds min.*allow_excess_rank=True"):
        rankwise.adapt(base_model(), rankwise.LoRAConfig(r=12, targets=["0", "2"]))
    model = rankwise.adapt(base_model(), rankwise.LoRAConfig(r=12, targets=["0", "2"], allow_excess_rank=True))
    assert rankwise.trainable_parameters(model) == 12 * (16 + 16) + 12 * (16 + 8)


def test_sequence_classification_adapter_imports(tmp_path):
    """PEFT's SEQ_CLS task adds both "classifier" and "score" to modules_to_save; a BERT has only the first,
    which PEFT accepts (nothing ends with "score"), so the import must too."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    base = BertForSequenceClassification(config).eval()
    theirs = peft_lora(base, task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["0", "2", "1.0", "a.0", "encoder.layer.10.query", "encoder.layer.0.query", "query"])
def test_pattern_key_is_peft_get_pattern_key(name):
    from peft.utils.other import get_pattern_key

    from rankwise.adapters.lora import pattern_key

    for keys in (["0"], ["query", "layer.0.query"], ["layer.0.query", "query"], ["^0$", "0"], ["r.1.*"], ["a\\.0"],
                 ["encoder.layer.1.*", "ery"]):
        theirs = get_pattern_key(keys, name)
        assert pattern_key(dict.fromkeys(keys, 1), name) == (None if theirs == name and name not in keys else theirs)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["plain", "dora"])
def test_rank_and_alpha_patterns_round_trip_with_peft(rslora, use_dora, tmp_path):
    """Per-layer ranks and alphas: a PEFT file imports at PEFT's ranks and scales, and exports back to the same."""
    base = base_model()
    theirs = peft_lora(base, r=2, lora_alpha=4, target_modules=["0", "2"], use_rslora=rslora, use_dora=use_dora,
                       rank_pattern={"^2$": 5, "0": 3}, alpha_pattern={"0": 7})
    x = torch.randn(3, 16)
    ours = imported_like_peft(base, theirs, tmp_path / "peft", x)
    assert rankwise.ranks(ours) == {"0": 3, "2": 5}
    scales = {name: layer.adapter.scaling for name, layer in rankwise.adapted_layers(ours)}
    assert scales == ({"0": 7 / 3**0.5, "2": 4 / 5**0.5} if rslora else {"0": 7 / 3, "2": 4 / 5})
    rankwise.export_peft(ours, tmp_path / "back")
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"^2$": 5, "0": 3} and written["alpha_pattern"] == {"0": 7}
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    torch.testing.assert_close(again(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)
    rankwise.save(ours, tmp_path / "rw")
    torch.testing.assert_close(rankwise.load(copy.deepcopy(base), tmp_path / "rw").eval()(x), theirs(x),
                               atol=1e-5, rtol=1e-5)


def test_bad_patterns_raise():
    with pytest.raises(ValueError, match=r"rank_pattern\['0'\] must be a positive integer"):
        rankwise.LoRAConfig(rank_pattern={"0": 0})
    with pytest.raises(ValueError, match=r"alpha_pattern key '\(' is not a valid regular expression"):
        rankwise.LoRAConfig(alpha_pattern={"(": 2.0})
    with pytest.raises(ValueError, match=r"layer '2'.*r=9 exceeds min\(out, in\)=8.*rank_pattern"):
        rankwise.adapt(base_model(), rankwise.LoRAConfig(r=2, targets=["0", "2"], rank_pattern={"2": 9}))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_use_effective_conv2d_is_reproduced_on_linear_layers(method, tmp_path):
    """PEFT ignores use_effective_conv2d on Linear layers, and so does rankwise; the value is imported all the same
    (it builds the Tucker cores of any convolution the adapter also targets)."""
    saved = saved_peft_adapter(method, tmp_path)
    write_config(tmp_path, {**saved, "use_effective_conv2d": True})
    reference = outputs(PeftModel.from_pretrained(base_model(), tmp_path))
    imported = rankwise.import_peft(base_model(), tmp_path)
    torch.testing.assert_close(outputs(imported), reference, atol=1e-5, rtol=1e-5)
    assert rankwise.adapter_config(imported).use_effective_conv2d is True
