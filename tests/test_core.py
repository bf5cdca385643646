"""Targeting, freezing, summary, adapter files and the errors users see."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import rankwise
from rankwise.core.layer import AdaptedLayer


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).eval()


def adapted_names(model: nn.Module) -> list[str]:
    return [name for name, _ in rankwise.adapted_layers(model)]


# -- targeting ------------------------------------------------------------------------------------


def test_suffix_targets_match_whole_name_parts():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=["query", "value"]))
    assert adapted_names(model) == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]


def test_regex_targets_fullmatch():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=r".*layer\.1\..*(query|key)"))
    assert adapted_names(model) == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]


def test_all_linear_skips_the_classification_head_and_excluded_layers():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets="all-linear", exclude=["pooler.dense"]))
    names = adapted_names(model)
    assert len(names) == 2 * 6
    assert not any("classifier" in n or "pooler" in n for n in names)


def test_all_linear_skips_the_lm_head_of_gpt2():
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    model = rankwise.adapt(gpt, rankwise.LoRAConfig(r=2, targets="all-linear"))
    assert adapted_names(model) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                    "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    ids = torch.randint(0, 40, (2, 5))
    assert torch.isfinite(model(ids).logits).all()


def test_adapt_freezes_base_and_keeps_modules_to_save_trainable():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"bert.encoder.layer.{i}.attention.self.query.adapter.lora_{ab}.weight" for i in range(2) for ab in "AB"),
        "classifier.trained_module.weight", "classifier.trained_module.bias",
    }
    assert not any(p.requires_grad for p in model.classifier.original_module.parameters())
    head = 16 * 3 + 3
    assert rankwise.trainable_parameters(model) == 2 * 2 * (16 + 16) + head


def test_model_classes_are_untouched_and_hf_api_keeps_working():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=["query"]))
    assert type(model) is BertForSequenceClassification
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, AdaptedLayer)
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (16, 16)
    out = model(input_ids=torch.randint(0, 50, (2, 6)), labels=torch.tensor([0, 2]))
    out.loss.backward()


def test_summary_lists_layers_and_peft_style_total():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    text = rankwise.summary(model)
    assert "bert.encoder.layer.0.attention.self.query" in text and "16 x 16" in text and "classifier" in text
    total = sum(p.numel() for p in model.parameters())
    trainable = rankwise.trainable_parameters(model)
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}" in text


def test_disable_adapters_runs_the_base_model():
    base = tiny_bert()
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.LoRAConfig(r=2, targets=["query", "value"], init_weights=False))
    ids = torch.randint(0, 50, (2, 6))
    adapted = model(input_ids=ids).logits
    rankwise.merge(model)
    with rankwise.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_registry_names_and_config_by_name():
    assert {"lora", "dora"} <= set(rankwise.methods())
    assert rankwise.config("dora", r=4) == rankwise.DoRAConfig(r=4)
    with pytest.raises(ValueError, match="unknown method 'nope'.*lora"):
        rankwise.config("nope")
    with pytest.raises(ValueError, match="already registered"):
        rankwise.register("lora", rankwise.LoRAConfig, object)
    with pytest.raises(ValueError, match=r"gralora: unknown option\(s\) \['k'\].*'gralora_k'"):
        rankwise.config("gralora", k=2)
    with pytest.raises(TypeError):  # still a TypeError, like any unexpected keyword
        rankwise.config("lora", rank=4)


# -- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.5}, r"dropout must be in \[0, 1\)"),
        ({"targets": []}, "targets must be"),
        ({"init_weights": "corda"}, "init_weights must be one of"),
    ],
)
def test_invalid_configs_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rankwise.LoRAConfig(**kwargs)


def test_rank_above_min_dimension_names_layer_shape_and_fix():
    model = tiny_bert()
    with pytest.raises(ValueError) as error:
        rankwise.adapt(model, rankwise.LoRAConfig(r=17, targets=["query"]))
    message = str(error.value)
    assert "bert.encoder.layer.0.attention.self.query" in message and "out_features=16" in message and "r <= 16" in message
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_targets_matching_nothing_list_candidates():
    with pytest.raises(ValueError, match=r"match no Linear/Conv1D layer.*query"):
        rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no Linear"):
        rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(targets=["query", "q_proj"]))


def test_target_on_unsupported_module_type_says_which_children_to_name():
    with pytest.raises(ValueError, match=r"BertSelfOutput.*attention.output.dense"):
        rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(targets=["attention.output"]))


def test_adapting_twice_raises():
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=["query"]))
    with pytest.raises(ValueError, match="already carries a rankwise adapter"):
        rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets=["value"]))


def test_unknown_modules_to_save_raises():
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(targets=["query"], modules_to_save=["head"]))


# -- adapter files --------------------------------------------------------------------------------


def saved_adapter(tmp_path, **kwargs):
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, targets=["query", "value"], init_weights=False,
                                                            modules_to_save=["classifier"], **kwargs))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    directory = rankwise.save(model, tmp_path / "adapter")
    return model, directory


def test_save_load_round_trip_and_files(tmp_path):
    model, directory = saved_adapter(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((directory / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 2 and meta["rankwise_version"] == rankwise.__version__
    restored = rankwise.load(tiny_bert(), directory)
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_missing_directory_and_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rankwise.load(tiny_bert(), tmp_path / "nowhere")
    _, directory = saved_adapter(tmp_path)
    (directory / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        rankwise.load(tiny_bert(), directory)


def assert_untouched(model: nn.Module, reference: nn.Module) -> None:
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_weights_raise_and_leave_model_untouched(tmp_path, damage):
    _, directory = saved_adapter(tmp_path)
    path = directory / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 40, "empty": b""}[damage])
    model, reference = tiny_bert(), tiny_bert()
    with pytest.raises(ValueError, match="truncated or corrupted"):
        rankwise.load(model, directory)
    assert_untouched(model, reference)


def test_corrupted_config_raises(tmp_path):
    _, directory = saved_adapter(tmp_path)
    (directory / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        rankwise.load(tiny_bert(), directory)


def test_unknown_method_in_config_raises(tmp_path):
    _, directory = saved_adapter(tmp_path)
    meta = json.loads((directory / "adapter_config.json").read_text())
    meta["method"] = "hyperlora"
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown method 'hyperlora'"):
        rankwise.load(tiny_bert(), directory)


def test_unknown_config_field_raises(tmp_path):
    _, directory = saved_adapter(tmp_path)
    meta = json.loads((directory / "adapter_config.json").read_text())
    meta["config"]["future_knob"] = 3
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="future_knob"):
        rankwise.load(tiny_bert(), directory)


def test_wrong_base_model_raises_and_leaves_model_untouched(tmp_path):
    _, directory = saved_adapter(tmp_path)
    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    reference = copy.deepcopy(other)
    with pytest.raises(ValueError, match=r"expects layer 'bert.encoder.layer.0.attention.self.query' with \(out, in\) = \(16, 16\)"):
        rankwise.load(other, directory)
    assert_untouched(other, reference)
    shallow = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="does not have"):
        rankwise.load(shallow, directory)


def test_tensor_shape_mismatch_in_file_raises_and_restores(tmp_path):
    from safetensors.torch import load_file, save_file

    _, directory = saved_adapter(tmp_path)
    tensors = load_file(str(directory / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(3, 16)
    save_file(tensors, str(directory / "adapter.safetensors"))
    model, reference = tiny_bert(), tiny_bert()
    with pytest.raises(ValueError, match=r"has shape \(3, 16\), the model expects \(2, 16\)"):
        rankwise.load(model, directory)
    assert_untouched(model, reference)


def test_save_is_atomic_no_temporary_files_left(tmp_path):
    model, directory = saved_adapter(tmp_path)
    rankwise.save(model, directory)  # overwrite in place
    assert sorted(p.name for p in directory.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_import_peft_refuses_pickles_and_unknown_types(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        rankwise.import_peft(tiny_bert(), tmp_path / "p")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        rankwise.import_peft(tiny_bert(), tmp_path / "q")


def test_export_requires_an_adapted_model(tmp_path):
    with pytest.raises(ValueError, match="carries no rankwise adapter"):
        rankwise.export_peft(tiny_bert(), tmp_path / "x")


@pytest.mark.parametrize(
    "option",
    [{"layer_replication": [[0, 1]]}, {"block_size_pattern": {"x": 8}}, {"layers_to_transform": [0]}, {"bias": "all"}],
)
def test_import_peft_refuses_options_without_an_equivalent(tmp_path, option):
    (tmp_path / "p").mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], **option}
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
    model, reference = tiny_bert(), tiny_bert()
    with pytest.raises(ValueError, match=f"{next(iter(option))}=.*no rankwise equivalent"):
        rankwise.import_peft(model, tmp_path / "p")
    assert_untouched(model, reference)


@pytest.mark.parametrize("method", ["c3a", "gralora"])
def test_in_place_output_add_never_touches_a_callers_tensor(method):
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    model = rankwise.adapt(nn.Sequential(base), rankwise.config(method, targets=["0"]))
    layer = model[0]
    for parameter in layer.adapter.parameters():
        torch.nn.init.normal_(parameter)
    x = torch.randn(3, 5, 64)
    base_out = base(x)
    kept = base_out.clone()
    direct = layer.adapter(x, base_out)
    assert torch.equal(base_out, kept)  # a direct caller's tensor is left alone
    assert not torch.allclose(direct, kept)
    torch.testing.assert_close(layer(x), direct)  # the wrapper's in-place path gives the same output


def test_safe_merge_checks_every_layer_before_merging_any():
    """merge(safe=True) with a non-finite update in the last layer only: it refuses naming that layer, and no
    layer is merged (the earlier layers' finite merges are not written first)."""
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)),
                           rankwise.LoRAConfig(r=2, init_weights=False, targets=["0", "1", "2"]))
    with torch.no_grad():
        model[2].adapter.lora_B.weight[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layer '2' gives non-finite weights"):
        rankwise.merge(model, safe=True)
    assert not any(layer.merged for _, layer in rankwise.adapted_layers(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        model[2].adapter.lora_B.weight[0, 0] = 0.0
    rankwise.merge(model, safe=True)
    assert all(layer.merged for _, layer in rankwise.adapted_layers(model))
    embedding = rankwise.adapt(nn.Sequential(nn.Embedding(10, 4)), rankwise.LoRAConfig(r=2, targets=["0"]))
    assert rankwise.merge(embedding, safe=True)[0].merged  # no bias to check


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(("target", "other"), [("wte", "lm_head"), ("lm_head", "transformer.wte")])
def test_merging_a_tied_weight_refuses_naming_what_shares_it(target, other):
    """GPT-2 ties lm_head.weight to the input embeddings. Unmerged, a LoRA on one of them changes that use only;
    merged, it would be written into the shared tensor and change both (PEFT merges anyway). merge and
    unload(merge=True) refuse, naming the other parameter and the fix, and change nothing; untied as the message
    says, the merge is exact."""
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=8)).eval()
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    model = rankwise.adapt(gpt, rankwise.LoRAConfig(r=2, init_weights=False, targets=[target]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    ids = torch.randint(0, 40, (2, 5))
    adapted = model(ids).logits.detach()
    before = copy.deepcopy(model.state_dict())
    untie = rf"model\.{other}\.weight = nn\.Parameter\(model\.{other}\.weight\.detach\(\)\.clone\(\)\)"
    for verb in (rankwise.merge, lambda m: rankwise.unload(m, merge=True)):
        with pytest.raises(ValueError, match=rf"layer '.*{target}'.* shares its weight tensor with \['{other}\.weight'\]"
                                             rf".*Keep the adapter unmerged, or untie.*{untie}"):
            verb(model)
        assert rankwise.core.inject.is_adapted(model) and not any(layer.merged for _, layer in rankwise.adapted_layers(model))
        assert_state_equal(model, before)
    tied = model.get_submodule(other)
    tied.weight = nn.Parameter(tied.weight.detach().clone())
    plain = rankwise.unload(model, merge=True)
    torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_merging_a_module_used_under_two_names_refuses():
    """One nn.Linear reachable as 'enc' and 'dec': the adapter wraps 'enc' only, so merging into the shared weight
    would change 'dec' too. Refused naming the other module; a copy of it makes the merge exact."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = self.enc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.tanh(self.enc(x)))

    torch.manual_seed(0)
    model = rankwise.adapt(Twice(), rankwise.LoRAConfig(r=2, init_weights=False, targets=["enc"]))
    with torch.no_grad():
        model.enc.adapter.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    adapted = model(x).detach()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer 'enc'.* is the same module as \['dec'\].*model\.dec = copy\.deepcopy"):
        rankwise.merge(model)
    assert not model.enc.merged
    assert_state_equal(model, before)
    model.dec = copy.deepcopy(model.dec)
    torch.testing.assert_close(rankwise.merge(model)(x), adapted, atol=1e-6, rtol=1e-6)
