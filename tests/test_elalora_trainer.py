"""ElaLoRA under transformers.Trainer: the callback gives the allocator the Trainer's optimizer, so rank
moves physically while one optimizer and one lr schedule run on; a resume from a checkpoint is exact."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TARGETS, logits, tiny_bert, train
from transformers import TrainerControl, TrainerState, TrainingArguments

import rankwise
from rankwise.core.io import adapter_state
from rankwise.integrations import RankwiseCallback

pytestmark = pytest.mark.usefixtures("one_thread")

# rounds at t = 4 and 7 (t_init = 1 < t < T - t_final = 8, ΔT = 3), two components moved each. (The second
# round undoes the first here: a new component starts with zero statistics and E ≈ 1e-13, so it is the
# weakest offer at the next round unless ΔT leaves it time to grow; the official code behaves alike.)
SCHEDULE = {"init_r": 4, "b": 2, "k": 2, "scheduler": False, "tinit": 1, "tfinal": 2, "deltaT": 3, "total_step": 10}


def elalora_bert() -> torch.nn.Module:
    base = tiny_bert()
    torch.manual_seed(1)
    return rankwise.adapt(base, rankwise.config("elalora", targets=TARGETS, **SCHEDULE))


def test_the_callback_moves_rank_with_one_optimizer_and_one_schedule(tmp_path):
    model = elalora_bert()
    trainer = train(model, tmp_path, max_steps=10)
    assert rankwise.allocator(model).allocations == 2
    moved = rankwise.ranks(rankwise.load(tiny_bert(), tmp_path / "checkpoint-6" / "adapter"))
    assert sum(moved.values()) == 4 * len(moved) and set(moved.values()) != {4}
    ranks = rankwise.ranks(model)
    assert sum(ranks.values()) == 4 * len(ranks)
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(held) == len(trainable) and all(any(p is q for q in held) for p in trainable)
    for p in trainable:
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
        assert state["step"].item() == 10  # never reset by a round
    # the linear schedule ran to its end on the optimizer that trained the adapter (official code: constant peak lr)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.0] * len(trainer.optimizer.param_groups)
    saved = rankwise.load(tiny_bert(), tmp_path / "adapter")
    assert rankwise.ranks(saved) == ranks
    torch.testing.assert_close(logits(saved), logits(model), atol=1e-6, rtol=0)


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path):
    straight = elalora_bert()
    train(straight, tmp_path / "straight", max_steps=10)
    first = elalora_bert()
    train(first, tmp_path / "split", max_steps=10, stop_at=6)
    checkpoint = tmp_path / "split" / "checkpoint-6"
    resumed = rankwise.load(tiny_bert(), checkpoint / "adapter")  # built at the ranks of step 6
    assert set(rankwise.ranks(resumed).values()) != {4}
    train(resumed, tmp_path / "split", max_steps=10, resume=str(checkpoint))
    assert rankwise.ranks(resumed) == rankwise.ranks(straight)
    assert rankwise.allocator(resumed).allocations == rankwise.allocator(straight).allocations == 2
    want = adapter_state(straight)
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0, msg=key)


def test_a_multi_process_trainer_run_is_refused(tmp_path, monkeypatch):
    """Trainer builds its DDP wrapper once, before any callback runs; ElaLoRA's rounds would leave it stale."""
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    model = elalora_bert()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="elalora resizes.*DistributedDataParallel.*2 processes.*rewrap_ddp"):
        RankwiseCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
