"""The comparison outputs (rankwise.experiment.plots): rows, ties, JSON / CSV / PNG / report.md agree."""

from __future__ import annotations

import csv
import json
import re

import pytest

from rankwise.experiment import claims, plots


def fake_records() -> list[dict]:
    records = [{"method": "majority class", "seed": s, "kind": "baseline", "trainable": 0, "accuracy": 0.5,
                "macro_f1": 0.333} for s in (0, 1, 2)]
    records += [{"method": "full fine-tuning", "seed": s, "kind": "baseline", "trainable": 22_000_000,
                 "accuracy": 0.9 + 0.01 * s, "macro_f1": 0.9} for s in (0, 1, 2)]  # better, but not ranked
    accuracy = {"lora": (0.80, 0.82, 0.84), "dora": (0.81, 0.80, 0.84), "loldu": (0.60, 0.62, 0.61)}
    cost = {"lora": (0.10, 100 * 2**20), "dora": (0.15, 150 * 2**20), "loldu": (0.05, 90 * 2**20)}
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            records.append({
                "method": method, "seed": seed, "trainable": {"lora": 1000, "dora": 1040, "loldu": 40}[method],
                "accuracy": value, "macro_f1": value - 0.01, "lr": 1e-3 if seed or method != "dora" else 3e-3,
                "budget_ratio": {"lora": 1.0, "dora": 1.04, "loldu": 0.04}[method],
                "budget_note": "r tops out at min(out, in)" if method == "loldu" else None,
                "train_loss": [1.0 - 0.01 * i * (seed + 1) for i in range(40)],
                "validation": [{"step": 20, "accuracy": value - 0.05, "macro_f1": 0.5},
                               {"step": 40, "accuracy": value, "macro_f1": 0.6}],
                "step_seconds": cost[method][0], "peak_memory_bytes": cost[method][1], "unknown_extra": 1})
    records.append({"method": "miss", "seed": 0, "error": "ValueError: r does not fit", "trainable": 512})
    return records


def test_rows_marks_and_ratios():
    rows, notes = plots.comparison_rows([plots.RunRecord.from_dict(r) for r in fake_records()])
    by = {row["method"]: row for row in rows}
    assert list(by) == ["majority class", "full fine-tuning", "lora", "dora", "loldu", "miss"]
    assert by["full fine-tuning"]["accuracy_mark"] == by["full fine-tuning"]["macro_f1_mark"] == ""
    assert all(list(row) == list(plots.COLUMNS) for row in rows)
    assert by["lora"]["accuracy_mark"] == "best" and by["dora"]["accuracy_mark"] == "tie"
    assert by["loldu"]["accuracy_mark"] == "" and by["majority class"]["accuracy_mark"] == ""
    assert by["lora"]["accuracy_mean"] == pytest.approx(0.82, abs=1e-12)
    assert by["lora"]["accuracy_std"] == pytest.approx(0.02, abs=1e-12)
    assert by["dora"]["lr"] == "0.001,0.003" and by["lora"]["lr"] == "0.001"
    assert by["dora"]["step_time_vs_lora"] == pytest.approx(1.5) and by["dora"]["peak_memory_vs_lora"] == pytest.approx(1.5)
    assert by["lora"]["peak_memory_mb"] == pytest.approx(100.0)
    assert by["miss"]["seeds"] == 0 and by["miss"]["failed_runs"] == 1 and by["miss"]["accuracy_mean"] is None
    assert notes == []
    with pytest.raises(ValueError, match="several runs for one seed"):
        plots.comparison_rows([plots.RunRecord("lora", 0), plots.RunRecord("lora", 0)])
    with pytest.raises(ValueError, match="kind must be"):
        plots.RunRecord("lora", 0, kind="other")


def test_one_seed_says_there_is_no_tie_information():
    rows, notes = plots.comparison_rows([plots.RunRecord("lora", 0, accuracy=0.8, macro_f1=0.8),
                                         plots.RunRecord("dora", 0, accuracy=0.79, macro_f1=0.79)])
    assert [row["accuracy_mark"] for row in rows] == ["best", ""]
    assert len(notes) == 1 and "no tie information" in notes[0]
    assert rows[0]["step_time_vs_lora"] is None  # nothing measured


def test_a_non_finite_score_is_a_failed_run_not_the_best():
    """A NaN accuracy would average to NaN and sort first (audit): the record counts as failed, so the best is
    the real best and the claim verdicts never see it."""
    records = [plots.RunRecord("adalora", 0, accuracy=float("nan"), macro_f1=0.5)]
    records += [plots.RunRecord("adalora", s, accuracy=a, macro_f1=a) for s, a in ((1, 0.70), (2, 0.71))]
    records += [plots.RunRecord("lora", s, accuracy=a, macro_f1=a) for s, a in ((0, 0.80), (1, 0.81), (2, 0.82))]
    assert records[0].error == "non-finite test metric(s) {'accuracy': nan}"
    by = {row["method"]: row for row in plots.comparison_rows(records)[0]}
    assert by["lora"]["accuracy_mark"] == "best" and by["adalora"]["accuracy_mark"] == ""
    assert by["adalora"]["seeds"] == 2 and by["adalora"]["failed_runs"] == 1
    assert by["adalora"]["accuracy_mean"] == pytest.approx(0.705)
    verdict = {v.claim.method: v for v in claims.verdicts(records)}["adalora"]
    assert verdict.seeds == 2 and verdict.outcome == claims.DOES_NOT_HOLD
    assert plots.RunRecord("lora", 0, accuracy=0.8, macro_f1=float("inf")).error is not None


def test_a_row_counts_its_successful_runs_and_says_when_their_size_differs():
    """trainable and × budget come from the runs that finished (a failed first seed left them blank), as means
    when they differ across seeds (GoRA's allocation), with a note."""
    records = [plots.RunRecord("lora", 0, error="RuntimeError: out of memory")]
    records += [plots.RunRecord("lora", s, trainable=1000, budget_ratio=1.0, accuracy=0.8, macro_f1=0.8) for s in (1, 2)]
    records += [plots.RunRecord("gora", s, trainable=t, budget_ratio=t / 1000, accuracy=0.8, macro_f1=0.8)
                for s, t in ((1, 900), (2, 940))]
    rows, notes = plots.comparison_rows(records)
    by = {row["method"]: row for row in rows}
    assert by["lora"]["trainable"] == 1000 and by["lora"]["budget_ratio"] == 1.0
    assert by["gora"]["trainable"] == 920 and by["gora"]["budget_ratio"] == pytest.approx(0.92)
    assert any(note.startswith("gora: the trained size differs across seeds (900–940") for note in notes)


def test_write_comparison_files_agree(tmp_path):
    context = {"task": "movie-reviews", "budget": "like lora:r=8 on all-linear", "command": "rankwise compare"}
    paths = plots.write_comparison(fake_records(), tmp_path, title="fake comparison", context=context)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(paths) == sorted([
        "comparison.json", "comparison.csv", "report.md", "accuracy_vs_parameters.png", "validation_curves.png",
        "training_loss.png", "cost.png"])
    payload = json.loads((tmp_path / "comparison.json").read_text())
    assert payload["columns"] == list(plots.COLUMNS) and payload["context"] == context
    assert len(payload["runs"]) == len(fake_records())
    with open(tmp_path / "comparison.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == plots.COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(payload["rows"])
    for json_row, csv_row in zip(payload["rows"], csv_rows):
        for column in plots.COLUMNS:
            value = json_row[column]
            if value is None:
                assert csv_row[column] == ""
            elif isinstance(value, float):
                assert float(csv_row[column]) == value
            else:
                assert csv_row[column] == str(value)
    for name in ("accuracy_vs_parameters.png", "validation_curves.png", "training_loss.png", "cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    linked = re.findall(r"\]\(([^)]+)\)", report)
    assert sorted(linked) == sorted(paths.keys() - {"report.md"})
    assert "**0.8200 ± 0.0200**" in report and "0.8167 ± 0.0208 (tie)" in report
    assert "- loldu †: r tops out at min(out, in)" in report and "- miss: 1 run(s) failed: ValueError" in report
    assert "- task: movie-reviews" in report
    assert plots.table(payload["rows"]) in report
