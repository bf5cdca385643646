"""GoRA under transformers.Trainer: RankwiseCallback runs the gradient init (``allocator.before_training``) once,
at the start, on the first batches of the Trainer's train dataloader with the model's own loss, hands the new
adapters to the Trainer's optimizer, and does not run it again on resume or after the user's own initialize."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TARGETS, StopAt, Tokens, tiny_bert
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import rankwise
from rankwise.allocation.gora import GoRAAllocator, initialize
from rankwise.core.io import adapter_state
from rankwise.integrations import RankwiseCallback

pytestmark = pytest.mark.usefixtures("one_thread")

GORA = {"r": 4, "r_min": 2, "r_max": 8, "gradient_batches": 3, "gamma": 0.5, "targets": TARGETS}


def gora_bert() -> torch.nn.Module:
    base = tiny_bert()
    torch.manual_seed(1)
    return rankwise.adapt(base, rankwise.config("gora", **GORA))


def model_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


class Start(TrainerCallback):
    """The adapter right after RankwiseCallback's on_train_begin (it runs first), and every forward's inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inputs: list[dict] = []
        self.adapter: dict[str, torch.Tensor] = {}
        model.register_forward_pre_hook(lambda module, args, kwargs: self.inputs.append(dict(kwargs)), with_kwargs=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.adapter = {key: value.clone() for key, value in adapter_state(model).items()}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every call of GoRA's before_training: its batches, the random state and the model's mode at the call."""
    seen: list[dict] = []
    real = GoRAAllocator.before_training

    def spy(self, batches, loss_fn):
        batches = list(batches)
        seen.append({"batches": batches, "rng": torch.get_rng_state(), "training": self.model.training})
        real(self, batches, loss_fn)

    monkeypatch.setattr(GoRAAllocator, "before_training", spy)
    return seen


def run(model: torch.nn.Module, out, *, stop_at: int | None = None, resume: str | None = None,
        seedable_sampler: bool = True) -> Start:
    """4 steps of batch 4 (checkpoints at 2 and 4). Without accelerate's seedable sampler, the shuffle draws its
    seed from torch's global random state whenever the dataloader is iterated."""
    args = TrainingArguments(
        output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=100, dataloader_num_workers=0,
        accelerator_config={"use_seedable_sampler": seedable_sampler},
    )
    start = Start(model)
    callbacks = [RankwiseCallback(), start] + ([StopAt(stop_at)] if stop_at else [])
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks).train(resume_from_checkpoint=resume)
    return start


@pytest.mark.parametrize("seedable_sampler", [True, False])
def test_the_callback_initialises_once_on_the_first_training_batches_and_trains_the_new_adapters(
    tmp_path, calls, seedable_sampler
):
    model = gora_bert()
    start = run(model, tmp_path, seedable_sampler=seedable_sampler)
    assert len(calls) == 1
    used = calls[0]["batches"]
    assert len(used) == GORA["gradient_batches"] == 3
    # the init's 3 forwards come first, then training: its first 3 steps see the same batches
    init_inputs, training_inputs = start.inputs[:3], start.inputs[3:6]
    for batch, init_input, training_input in zip(used, init_inputs, training_inputs):
        assert all(torch.equal(batch[key], init_input[key]) and torch.equal(batch[key], training_input[key])
                   for key in ("input_ids", "labels"))

    reference = gora_bert().train(calls[0]["training"])
    torch.set_rng_state(calls[0]["rng"])
    initialize(reference, used, model_loss)
    assert rankwise.ranks(model) == rankwise.ranks(reference)
    assert len(set(rankwise.ranks(model).values())) > 1  # the split is not uniform
    want = adapter_state(reference)
    assert set(start.adapter) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(start.adapter[key], value, atol=1e-6, rtol=0, msg=key)
    # the Trainer's optimizer trained the new adapters, not the placeholder's tensors
    trained = adapter_state(model)
    assert all(not torch.equal(trained[key], start.adapter[key]) for key in trained if "lora_B" in key)
    assert rankwise.allocator(model).allocations == 1


def test_resume_does_not_initialise_again_and_matches_the_uninterrupted_run(tmp_path, calls):
    straight = gora_bert()
    run(straight, tmp_path / "straight")
    first = gora_bert()
    run(first, tmp_path / "split", stop_at=2)
    assert len(calls) == 2
    resumed = rankwise.load(tiny_bert(), tmp_path / "split" / "checkpoint-2" / "adapter")  # at the allocated ranks
    run(resumed, tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"))
    assert len(calls) == 2
    assert rankwise.ranks(resumed) == rankwise.ranks(straight)
    want = adapter_state(straight)
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0, msg=key)


def test_a_model_the_user_initialised_is_left_as_it_is(tmp_path, calls):
    model = gora_bert()
    generator = torch.Generator().manual_seed(7)
    batches = [{"input_ids": torch.randint(0, 64, (4, 8), generator=generator),
                "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(2)]
    initialize(model, batches, model_loss)
    assert len(calls) == 0  # initialize itself, not the allocator's before_training
    initialised = {key: value.clone() for key, value in adapter_state(model).items()}
    start = run(model, tmp_path, stop_at=1)
    assert len(calls) == 0
    assert all(torch.equal(start.adapter[key], value) for key, value in initialised.items())


def test_a_multi_process_trainer_run_refuses_an_uninitialised_model(tmp_path, monkeypatch, calls):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    model = gora_bert()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="gora allocates from data before training.*DistributedDataParallel.*"
                                         "before building the Trainer"):
        RankwiseCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer,
                                          train_dataloader=[])
    assert len(calls) == 0


def test_resuming_an_uninitialised_model_is_refused(tmp_path, calls):
    """Resuming must start from the checkpoint's adapter (its ranks), not from a fresh placeholder."""
    model = gora_bert()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(global_step=2)
    with pytest.raises(ValueError, match="resuming at step 2 with a gora model.*rankwise.load"):
        RankwiseCallback(checks=False).on_train_begin(args, state, TrainerControl(), model=model,
                                                      optimizer=optimizer, train_dataloader=[])
    assert len(calls) == 0
