"""rankwise under transformers.Trainer: adapter checkpoints, exact resume, SingLoRA's clock, the checks."""

from __future__ import annotations

import os

import pytest
import torch
from method_cases import CASES
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import rankwise
from rankwise.adapters.singlora import SingLoRAAdapter
from rankwise.core.io import adapter_state
from rankwise.integrations import RankwiseCallback, load_checkpoint_adapter

# one thread: on a busy 2-core machine, waking a second thread costs more than these tiny matmuls
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["query", "value"]


def tiny_bert() -> BertForSequenceClassification:
    """The same random 'pretrained' base every call (seed 0)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    """24 random sequences with random labels: 6 batches of 4 per epoch."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (24, 8), generator=g)
        self.labels = torch.randint(0, 2, (24,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class StopAt(TrainerCallback):
    """Interrupt a run after ``step`` optimizer steps (the schedule still spans max_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def train(model, out, *, max_steps=4, stop_at=None, resume=None, callback=None, **overrides) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=100,
        dataloader_num_workers=0, **overrides,
    )
    callbacks = [callback or RankwiseCallback()] + ([StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logits(model, seed: int = 3) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(seed))).logits


def clocks(model) -> list[int]:
    return [int(m.singlora_step) for m in model.modules() if isinstance(m, SingLoRAAdapter)]


def test_checkpoints_and_final_adapter_reload_exactly(tmp_path):
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS))
    train(model, tmp_path)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}" / "adapter"
        saved = load_file(str(folder / "adapter.safetensors"))
        assert set(saved) == set(adapter_state(model))  # adapter only, no base weight
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    want, trained = logits(model), adapter_state(model)
    for source in (tmp_path / "checkpoint-4" / "adapter", tmp_path / "adapter", tmp_path / "checkpoint-4"):
        loaded = load_checkpoint_adapter(tiny_bert(), source)
        assert all(torch.equal(value, trained[key]) for key, value in adapter_state(loaded).items())
        torch.testing.assert_close(logits(loaded), want, atol=1e-6, rtol=0)
    earlier = load_file(str(tmp_path / "checkpoint-2" / "adapter" / "adapter.safetensors"))
    moved = [key for key in earlier if "lora_B" in key and not torch.equal(earlier[key], trained[key])]
    assert len(moved) == 4 and all(trained[key].abs().max() > 0 for key in moved)  # checkpoint-2 is not the end
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="RankwiseCallback"):
        load_checkpoint_adapter(tiny_bert(), tmp_path / "empty")


def test_merge_at_end_leaves_a_plain_model_with_the_trained_outputs(tmp_path):
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS))
    train(model, tmp_path, max_steps=2, callback=RankwiseCallback(merge_at_end=True))
    assert not list(rankwise.adapted_layers(model))
    want = logits(rankwise.load(tiny_bert(), tmp_path / "adapter"))
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_merge_at_end_refuses_a_tied_weight_before_training(tmp_path):
    """A LoRA on a tied embedding cannot be merged exactly: refused when training begins, not after it."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets=["lm_head"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot merge layer 'lm_head'.*tied weights"):
        train(model, tmp_path, max_steps=2, callback=RankwiseCallback(merge_at_end=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no step was taken
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("checks", [True, False])
def test_a_merged_adapter_is_refused_when_training_begins(checks, tmp_path):
    """Merged, the forward skips the adapter: no gradient ever reaches it (the first-step check blamed gradient
    checkpointing, or torch raised from backward, or with checks off only the head trained)."""
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS, init_weights=False))
    rankwise.merge(model)
    with pytest.raises(ValueError, match=r"merged into the base weights of 4 layer\(s\).*rankwise.unmerge\(model\)"):
        train(model, tmp_path, max_steps=2, callback=RankwiseCallback(checks=checks))


def singlora_model(adapter_seed: int):
    base = tiny_bert()
    torch.manual_seed(adapter_seed)  # a different fresh adapter: resume must overwrite it
    return rankwise.adapt(base, rankwise.config("singlora", r=4, alpha=4, ramp_up_steps=10, targets=TARGETS))


def test_resume_matches_an_uninterrupted_run_and_the_clock_counts_optimizer_steps(tmp_path):
    # gradient accumulation 2: 8 forwards for 4 optimizer steps; checkpoint-2 lies mid-epoch (3 steps/epoch)
    straight = singlora_model(adapter_seed=10)
    trainer = train(straight, tmp_path / "straight", gradient_accumulation_steps=2)
    assert trainer.state.global_step == 4
    assert clocks(straight) == [4] * 4  # counted per optimizer.step, not per forward, and not twice

    first = singlora_model(adapter_seed=10)
    train(first, tmp_path / "split", stop_at=2, gradient_accumulation_steps=2)
    assert clocks(first) == [2] * 4
    resumed = singlora_model(adapter_seed=11)
    train(resumed, tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"), gradient_accumulation_steps=2)

    assert clocks(resumed) == [4] * 4
    want, got = adapter_state(straight), adapter_state(resumed)
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(logits(resumed), logits(straight), atol=1e-6, rtol=0)


def test_every_method_survives_the_trainer_checkpoint_format(tmp_path):
    """Trainer writes save_pretrained's model.safetensors and resumes with load_state_dict(strict=False)."""
    for method in rankwise.methods():
        kwargs = CASES[method].kwargs  # fits 32-wide layers
        model = rankwise.adapt(tiny_bert(), rankwise.config(method, targets=TARGETS, **kwargs))
        with torch.no_grad():
            for value in adapter_state(model).values():
                if value.is_floating_point():
                    value.add_(0.1 * torch.randn_like(value))
        model.save_pretrained(tmp_path / method)
        fresh = rankwise.adapt(tiny_bert(), rankwise.config(method, targets=TARGETS, **kwargs))
        result = fresh.load_state_dict(load_file(os.path.join(tmp_path, method, "model.safetensors")), False)
        assert not result.missing_keys and not result.unexpected_keys, method
        torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0, msg=method)


def test_resuming_with_a_differently_adapted_model_raises(tmp_path):
    model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS))
    train(model, tmp_path, max_steps=2)
    # same tensor shapes and count, so Trainer's strict=False load and its optimizer load both pass silently
    other = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=["query", "key"]))
    with pytest.raises(ValueError, match="resuming from"):
        train(other, tmp_path, resume=str(tmp_path / "checkpoint-2"))


def test_setup_errors(tmp_path):
    with pytest.raises(ValueError, match="carries no rankwise adapter"):
        train(tiny_bert(), tmp_path / "plain")
    unfrozen = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS))
    unfrozen.classifier.requires_grad_(True)
    with pytest.raises(ValueError, match=r"classifier\.weight.*modules_to_save"):
        train(unfrozen, tmp_path / "unfrozen")
    # the same head listed in modules_to_save is fine, and is saved with the adapter
    head = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS,
                                                           modules_to_save=["classifier"]))
    train(head, tmp_path / "head", max_steps=1)
    assert "classifier.weight" in load_file(str(tmp_path / "head" / "adapter" / "adapter.safetensors"))


def test_activation_checkpointing_trains_the_adapters_as_without_it(tmp_path):
    """The classic silent failure (frozen embeddings + reentrant checkpointing) does not happen here."""
    name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
        else "gradient_checkpointing"
    results = []
    for on in (False, True):
        model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS))
        train(model, tmp_path / str(on), max_steps=2, **{name: on, f"{name}_kwargs": {"use_reentrant": True}})
        results.append(adapter_state(model))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, atol=1e-6, rtol=0, msg=key)
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in results[1].items())


def test_no_adapter_gradient_raises_at_the_first_step(tmp_path):
    """What reentrant gradient checkpointing with frozen embeddings does: the adapters' outputs are cut
    off the graph while a trainable head keeps the loss differentiable, so training would only move the head."""
    config = rankwise.LoRAConfig(r=4, alpha=8, targets=TARGETS, modules_to_save=["classifier"])
    model = rankwise.adapt(tiny_bert(), config)

    def cut(module, inputs, output):
        return tuple(o.detach() if torch.is_tensor(o) else o for o in output) if isinstance(output, tuple) \
            else output.detach()

    for layer in model.bert.encoder.layer:
        layer.attention.register_forward_hook(cut)
    with pytest.raises(ValueError, match="no adapter parameter has a gradient"):
        train(model, tmp_path, max_steps=1)
