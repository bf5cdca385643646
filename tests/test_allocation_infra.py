"""The infrastructure around rank allocators, on AdaLoRA: distributed agreement (2 gloo processes),
the ranks and heat map that ``rankwise finetune`` / ``compare`` write, and the loud error of a run
whose schedule never ran in rankwise's own loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
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


def _distributed_worker(rank: int, directory: str) -> None:
    """One of two gloo processes: a DDP run, an unsynchronised run and a bare all-reduce, saved to a file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2)
    try:
        synced = adalora_net()
        train(synced, range(SCHEDULE["total_step"]), part=rank,
              wrapper=nn.parallel.DistributedDataParallel(synced))
        alone = adalora_net()  # no DDP: every process trains on its own half only
        train(alone, range(LAST_MASKING + 1), part=rank)
        reduced = all_reduce_mean([torch.full((2, 3), float(rank + 1)), torch.arange(4, dtype=torch.float64) * rank])
        torch.save({
            "ddp_state": adapter_state(synced),
            "ddp_ranks": rankwise.ranks(synced),
            "ddp_final": rankwise.allocator(synced).final,
            "alone_masks": rankwise.allocator(alone).masks,
            "alone_scores": rankwise.allocator(alone).scores(),
            "world_size": world_size(),
            "reduced": reduced,
        }, Path(directory) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_distributed_worker, args=(str(directory),), nprocs=2, join=True)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


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
