"""The resumable sweep (rankwise.experiment.sweep): result files, resume after a real SIGKILL, workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankwise.experiment import sweep

FAKE = "sweep_fake:tiny_run"
SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


def specs(log: Path | None = None, **extra) -> list[dict]:
    runs = [{"method": method, "seed": seed, "lr": 0.05, "steps": steps} for method, steps in (("lora", 5), ("dora", 7))
            for seed in (0, 1)]
    return [{**run, **({"log": str(log)} if log else {}), **extra} for run in runs]


def calls(log: Path) -> list[str]:
    return [line.split(",")[0] for line in log.read_text(encoding="utf-8").splitlines()]


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_sweep_file_runs_resume_and_results(tmp_path):
    log = tmp_path / "log.txt"
    loaded = sweep.write_sweep(tmp_path / "sweep.json", FAKE, specs(log))
    assert [run for run, _ in loaded.runs][:2] == [f"log={sweep.run_id({'log': str(log)})[4:]},lr=0.05,method=lora,seed=0,steps=5",
                                                   f"log={sweep.run_id({'log': str(log)})[4:]},lr=0.05,method=lora,seed=1,steps=5"]
    assert sweep.pending(loaded) == [0, 1, 2, 3]
    first = sweep.run_one(tmp_path / "sweep.json", 2, threads=1)
    assert first["spec"] == specs(log)[2] and first["index"] == 2 and first["threads"] == 1
    assert sweep.pending(loaded) == [0, 1, 3]
    assert sweep.run_one(loaded, 2) == first and calls(log) == ["dora-0"]  # finished: read back, not run again
    seen = []
    results = sweep.run_sweep(loaded, threads=1, on_result=lambda result, done, total: seen.append((done, total)))
    assert calls(log) == ["dora-0", "lora-0", "lora-1", "dora-1"]
    assert seen == [(2, 4), (3, 4), (4, 4)]
    assert [r["spec"] for r in results] == specs(log) and results[2] == first
    assert json.loads(loaded.result_path(0).read_text()) == results[0]
    assert (loaded.workdir(0) / "weights.txt").is_file()
    sweep.run_sweep(loaded)
    assert len(calls(log)) == 4  # a finished sweep executes nothing


def test_killed_sweep_resumes_without_repeating_a_finished_run(tmp_path):
    log, gate = tmp_path / "log.txt", tmp_path / "gate"
    runs = specs(log)[:3]
    runs[1]["wait_for"] = str(gate)  # the second run stays in progress until the gate exists
    loaded = sweep.write_sweep(tmp_path / "sweep.json", FAKE, runs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rankwise.experiment.sweep", str(loaded.path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # only against a hang; nothing is asserted about time
        while not (log.is_file() and calls(log) == ["lora-0", "lora-1"]):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the sweep subprocess did not reach its second run"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL, in the middle of run 1
        process.wait()
    assert process.returncode == -9
    first = loaded.result_path(0).read_bytes()
    assert sweep.pending(loaded) == [1, 2]
    assert [f for f in files_under(loaded.results_dir) if not f.endswith("weights.txt")] == [loaded.result_path(0).name]
    gate.touch()
    results = sweep.run_sweep(loaded, threads=1)
    assert calls(log) == ["lora-0", "lora-1", "lora-1", "dora-0"]  # run 0 once; run 1 again from its start
    assert loaded.result_path(0).read_bytes() == first
    assert [r["spec"] for r in results] == runs
    assert not [f for f in files_under(tmp_path) if f.endswith(".tmp")]


def test_two_workers_give_the_same_numbers_as_one(tmp_path):
    one = sweep.write_sweep(tmp_path / "one" / "sweep.json", FAKE, specs())
    log = tmp_path / "two.log"
    two = sweep.write_sweep(tmp_path / "two" / "sweep.json", FAKE, specs(log))
    expected = [r["result"] for r in sweep.run_sweep(one, workers=1, threads=1)]
    got = sweep.run_sweep(two, workers=2, threads=1)
    assert [r["result"] for r in got] == expected
    assert all(r["result"]["threads"] == 1 for r in got)
    pids = {line.split(",")[1] for line in log.read_text().splitlines()}
    assert str(os.getpid()) not in pids  # the runs executed in the worker processes
    assert len({r["result"]["loss"] for r in got}) == 4


def test_a_result_that_cannot_be_written_leaves_no_file(tmp_path):
    loaded = sweep.write_sweep(tmp_path / "sweep.json", "sweep_fake:returns_unserialisable", specs()[:1])
    with pytest.raises(TypeError, match="not JSON serializable"):
        sweep.run_one(loaded, 0)
    assert files_under(loaded.results_dir) == [] and sweep.pending(loaded) == [0]
    bad = sweep.write_sweep(tmp_path / "list.json", "sweep_fake:returns_a_list", specs()[:1])
    with pytest.raises(TypeError, match="must return a JSON object"):
        sweep.run_one(bad, 0)


def test_a_changed_spec_under_the_same_id_is_an_error(tmp_path):
    loaded = sweep.write_sweep(tmp_path / "sweep.json", FAKE, specs()[:1], ids=["a"])
    sweep.run_one(loaded, 0)
    changed = sweep.write_sweep(tmp_path / "sweep.json", FAKE, [{**specs()[0], "lr": 0.1}], ids=["a"])
    with pytest.raises(ValueError, match="the sweep file changed under the same id"):
        sweep.run_sweep(changed)


def test_bad_sweep_files_are_refused(tmp_path):
    path = tmp_path / "sweep.json"
    with pytest.raises(ValueError, match="appears twice"):
        sweep.write_sweep(path, FAKE, specs()[:2], ids=["a", "a"])
    with pytest.raises(ValueError, match="is a file name"):
        sweep.write_sweep(path, FAKE, specs()[:1], ids=["../a"])
    with pytest.raises(ValueError, match="one id per run"):
        sweep.write_sweep(path, FAKE, specs()[:2], ids=["a"])
    with pytest.raises(ValueError, match="no callable"):
        sweep.write_sweep(path, "sweep_fake:nothing", specs()[:1])
    with pytest.raises(ValueError, match="import path"):
        sweep.write_sweep(path, "nothing", specs()[:1])
    assert not path.exists()
    path.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a rankwise sweep file"):
        sweep.load_sweep(path)
    loaded = sweep.write_sweep(path, "sweep_fake.tiny_run", specs()[:1])
    with pytest.raises(ValueError, match="not 5"):
        sweep.run_one(loaded, 5)
    with pytest.raises(ValueError, match="workers must be"):
        sweep.run_sweep(loaded, workers=0)
    assert sweep.run_id({"b": 1, "a": "x/y z"}) == "a=x_y_z,b=1"


def test_command_line_takes_its_share_from_slurm_or_torchrun(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.txt"
    loaded = sweep.write_sweep(tmp_path / "sweep.json", FAKE, specs(log))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert sweep.main([str(loaded.path)]) == 0 and calls(log) == ["dora-1"]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sweep.main([str(loaded.path)]) == 0 and calls(log) == ["dora-1", "lora-0", "dora-0"]
    assert sweep.main([str(loaded.path), "1"]) == 0 and calls(log)[-1] == "lora-1"
    assert sweep.pending(loaded) == [] and "run 1" in capsys.readouterr().out
    assert sweep.share(5, 1, 2) == [1, 3]
    assert sweep.main([]) == 2
