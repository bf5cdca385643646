"""AdaLoRA under transformers.Trainer: RankwiseCallback steps the allocator, adds the regulariser,
checkpoints and restores the allocator's state, and refuses a run whose schedule never ran."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TARGETS, logits, tiny_bert, train
from transformers import TrainerControl, TrainerState, TrainingArguments

import rankwise
from rankwise.core.io import adapter_state
from rankwise.integrations import RankwiseCallback

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8}


def adalora_bert(**overrides) -> torch.nn.Module:
    base = tiny_bert()
    torch.manual_seed(1)
    return rankwise.adapt(base, rankwise.config("adalora", targets=TARGETS, **{**SCHEDULE, **overrides}))


def test_the_callback_allocates_to_the_target_budget(tmp_path):
    model = adalora_bert()
    train(model, tmp_path, max_steps=8)
    allocator = rankwise.allocator(model)
    assert allocator.last_step == 7 and allocator.final is not None
    ranks = rankwise.ranks(model)
    assert sum(ranks.values()) == 2 * len(ranks) and len(ranks) == 4
    for name, layer in rankwise.adapted_layers(model):
        assert torch.count_nonzero(layer.adapter.lora_E[~allocator.final[name]]) == 0
    saved = rankwise.load(tiny_bert(), tmp_path / "adapter")
    assert rankwise.ranks(saved) == ranks
    torch.testing.assert_close(logits(saved), logits(model), atol=1e-6, rtol=0)


def test_the_regulariser_is_added_to_the_training_loss(tmp_path):
    model = adalora_bert()
    inputs = {"input_ids": torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0)),
              "labels": torch.tensor([0, 1, 1, 0])}
    with torch.no_grad():
        plain_eval = model.eval()(**inputs).loss
    torch.manual_seed(0)  # the same dropout masks in both training-mode forwards
    plain = model.train()(**inputs).loss
    term = rankwise.allocator(model).regularizer()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    RankwiseCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    torch.manual_seed(0)
    torch.testing.assert_close(model.train()(**inputs).loss, plain + term, atol=1e-6, rtol=0)
    assert term.item() > 0.1  # large enough for the comparisons to see it
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).loss, plain_eval)  # evaluation: the task loss alone


def test_resume_restores_the_allocator_and_matches_the_uninterrupted_run(tmp_path):
    straight = adalora_bert()
    train(straight, tmp_path / "straight", max_steps=8)
    first = adalora_bert()
    train(first, tmp_path / "split", max_steps=8, stop_at=4)
    resumed = adalora_bert()
    train(resumed, tmp_path / "split", max_steps=8, resume=str(tmp_path / "split" / "checkpoint-4"))
    assert rankwise.ranks(resumed) == rankwise.ranks(straight)
    # the allocator's own state came back from checkpoint-4 (allocations at steps 2 and 3 included)
    assert rankwise.allocator(resumed).allocations == rankwise.allocator(straight).allocations == 5
    want = adapter_state(straight)
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0, msg=key)


def test_a_run_whose_schedule_never_ran_is_an_error(tmp_path):
    model = adalora_bert(tinit=5, total_step=10)
    with pytest.raises(ValueError, match="never allocated.*total_step to max_steps"):
        train(model, tmp_path, max_steps=4)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()  # the adapter is written first


def test_side_by_side_runs_give_adalora_the_run_length():
    """rankwise finetune / compare / bench build every method's config; AdaLoRA gets total_step from the run."""
    from rankwise.experiment.pipeline import with_run_length

    assert with_run_length("adalora", {"init_r": 4}, 120) == {"init_r": 4, "total_step": 120}
    assert with_run_length("adalora", {"total_step": 50}, 120) == {"total_step": 50}
    assert with_run_length("lora", {"r": 4}, 120) == {"r": 4}
