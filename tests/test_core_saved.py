"""``modules_to_save``: a trainable copy runs, the user's original module stays as it was (PEFT's
ModulesToSaveWrapper), and disable / unload / save / load / summary treat the two accordingly."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import rankwise
from rankwise.core.layer import SavedModule

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 1, 2, 1])


def tiny_bert() -> BertForSequenceClassification:
    """The same random 'pretrained' classifier every call (seed 0), in eval mode (no dropout)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).eval()


def config() -> rankwise.LoRAConfig:
    return rankwise.LoRAConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained() -> tuple[BertForSequenceClassification, nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """(adapted model after 3 AdamW steps, the user's head object, its state before, the base logits)."""
    base = tiny_bert()
    head = base.classifier
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    base_logits = logits(base)
    model = rankwise.adapt(base, config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, head, head_before, base_logits


def assert_same_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def test_training_leaves_the_users_head_untouched_and_disable_runs_the_base_exactly():
    model, head, head_before, base_logits = trained()
    assert model.classifier.original_module is head
    assert_same_state(head, head_before)
    assert not any(p.requires_grad for p in head.parameters())
    assert not torch.equal(model.classifier.trained_module.weight, head.weight)  # the copy did train
    adapted = logits(model)
    with rankwise.disable_adapters(model):
        assert torch.equal(logits(model), base_logits)
        assert model.classifier.weight is head.weight  # attribute reads follow the module that runs
    assert torch.equal(logits(model), adapted)
    assert model.classifier.weight is model.classifier.trained_module.weight


def test_disable_adapters_with_merged_adapters_runs_the_base():
    model, _, _, base_logits = trained()
    rankwise.merge(model)
    with rankwise.disable_adapters(model):
        torch.testing.assert_close(logits(model), base_logits, atol=1e-6, rtol=0)


def test_unload_without_merge_gives_back_the_original_model():
    model, head, head_before, base_logits = trained()
    flags = {n: p.requires_grad for n, p in tiny_bert().named_parameters()}
    plain = rankwise.unload(model, merge=False)
    assert plain.classifier is head
    assert_same_state(head, head_before)
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    assert not any(isinstance(m, SavedModule) for m in plain.modules())
    assert torch.equal(logits(plain), base_logits)


def test_unload_with_merge_keeps_the_trained_head():
    model, head, _, _ = trained()
    adapted = logits(model)
    trained_head = model.classifier.trained_module
    plain = rankwise.unload(model, merge=True)
    assert plain.classifier is trained_head and plain.classifier is not head
    assert type(plain.classifier) is nn.Linear
    assert all(p.requires_grad for p in plain.parameters())  # the flags the base model had
    torch.testing.assert_close(logits(plain), adapted, atol=1e-5, rtol=1e-5)


def test_save_writes_the_trained_copy_under_the_original_keys_and_load_restores_it(tmp_path):
    model, _, _, base_logits = trained()
    rankwise.save(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert {k for k in saved if k.startswith("classifier")} == {"classifier.weight", "classifier.bias"}
    assert torch.equal(saved["classifier.weight"], model.classifier.trained_module.weight)
    fresh = tiny_bert()
    loaded = rankwise.load(fresh, tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    with rankwise.disable_adapters(loaded):
        assert torch.equal(logits(loaded), base_logits)


def test_summary_and_trainable_parameters_count_the_copy_once():
    model = rankwise.adapt(tiny_bert(), config())
    head = 16 * 3 + 3
    lora = 2 * 2 * 2 * (16 + 16)  # 2 layers x (query, value) x r (in + out)
    assert rankwise.trainable_parameters(model) == lora + head
    text = rankwise.summary(model)
    assert [line.split() for line in text.splitlines() if line.startswith("classifier")] == \
        [["classifier", "full", "Linear", "modules_to_save", f"{head}"]]


def test_nested_modules_to_save_wrap_the_outer_module_and_are_never_targets():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.dense(x))

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.ModuleDict({"dense": nn.Linear(4, 4), "cls": Head()})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body["cls"](self.body["dense"](x))

    model = rankwise.adapt(Deep(), rankwise.LoRAConfig(r=2, targets=["dense"], modules_to_save=["cls", "cls.out"]))
    assert [name for name, _ in rankwise.adapted_layers(model)] == ["body.dense"]
    assert [n for n, m in model.named_modules() if isinstance(m, SavedModule)] == ["body.cls"]


def test_a_failed_load_puts_the_original_head_back(tmp_path):
    model, _, _, _ = trained()
    rankwise.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors["classifier.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    fresh = tiny_bert()
    head = fresh.classifier
    with pytest.raises(ValueError, match=r"'classifier\.weight'.*NaN/Inf"):
        rankwise.load(fresh, tmp_path)
    assert fresh.classifier is head and head.weight.requires_grad
    assert not any(isinstance(m, SavedModule) for m in fresh.modules())


# -- against PEFT 0.21.2 -------------------------------------------------------------------------


def test_modules_to_save_matches_peft_enabled_disabled_unloaded_and_counted(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(proj=nn.Linear(16, 24), act=nn.ReLU(), head=nn.Linear(24, 3)))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                           init_lora_weights=False, modules_to_save=["head"]))
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.add_(0.5)  # a "trained" head
    theirs.save_pretrained(tmp_path)
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(ours(x), base(x), atol=1e-3)
        with rankwise.disable_adapters(ours), theirs.disable_adapter():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ours(x), base(x), atol=1e-6, rtol=1e-6)
    assert (rankwise.trainable_parameters(ours), sum(p.numel() for p in ours.parameters())) == \
        theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        merged_theirs = theirs.merge_and_unload()(x)
        torch.testing.assert_close(rankwise.unload(ours, merge=True)(x), merged_theirs, atol=1e-5, rtol=1e-5)
