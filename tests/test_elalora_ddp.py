"""ElaLoRA under torch DistributedDataParallel: two gloo processes, several rounds that resize the adapter,
``rewrap_ddp`` after every step. (Lean imports: the spawned processes import this module.)"""

from __future__ import annotations

import pytest
import torch
from gloo import on_gloo_processes
from test_allocation_infra import Net, batch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import rankwise
from rankwise.allocation import rewrap_ddp
from rankwise.core.io import adapter_state

# rounds at t = 4, 6, ..., 16 (t_init = 2 < t < T - t_final = 17, ΔT = 2), b_t decaying from 3
SCHEDULE = {"init_r": 4, "b": 3, "k": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 20, "alpha": 8.0}


def elalora_net() -> tuple[nn.Module, torch.optim.Optimizer]:
    """In float64: a new component's E is 1e-13, so its A and B get gradients ~1e-13 that float32 rounds to noise
    of ~1e-10, which AdamW (ε = 1e-8) turns into steps of ~1e-4 that differ with the summation order (one process
    vs two halves); float64 leaves a run-to-run difference far below 1e-5."""
    torch.manual_seed(0)
    net = Net().double()
    torch.manual_seed(1)
    model = rankwise.adapt(net, rankwise.config("elalora", targets=["proj", "mid", "out"], **SCHEDULE))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    rankwise.allocator(model).attach_optimizer(optimizer)
    return model, optimizer


def train(part: int | None, rewrap: bool) -> dict:
    """The ElaLoRA loop on ``part`` of every batch; under DDP (``part`` given) through a wrapper, rebuilt by
    ``rewrap_ddp`` after every step when ``rewrap``."""
    model, optimizer = elalora_net()
    allocator = rankwise.allocator(model)
    forward: nn.Module = model
    if part is not None:
        forward = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001, gradient_as_bucket_view=True)
        forward.register_comm_hook(None, allreduce_hook)
    history, wrappers = [], [forward]
    for step in range(SCHEDULE["total_step"]):
        x, labels = batch(step, part)
        (forward(x.double(), labels) + allocator.regularizer()).backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
        if rewrap:
            forward = rewrap_ddp(forward)
            if forward is not wrappers[-1]:
                wrappers.append(forward)
        history.append(rankwise.ranks(model))
    result = {"history": history, "state": adapter_state(model), "allocations": allocator.allocations,
              "wrappers": len(wrappers)}
    if part is not None:
        last = wrappers[-1]
        result["carried"] = (last.gradient_as_bucket_view, last.bucket_bytes_cap, len(last._comm_hooks))
    return result


def _work(rank: int) -> dict:
    result = train(part=rank, rewrap=True)
    try:
        train(part=rank, rewrap=False)
    except ValueError as error:
        result["without_rewrap"] = str(error)
    return result


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What :func:`_work` returned on each of the two processes (one spawn for the whole module)."""
    return on_gloo_processes(_work, tmp_path_factory.mktemp("elalora_ddp"))


def test_ddp_processes_end_with_the_same_ranks_and_weights(processes):
    assert processes[0]["history"] == processes[1]["history"]
    assert processes[0]["allocations"] >= 5
    assert len({tuple(ranks.values()) for ranks in processes[0]["history"]}) >= 3  # the rank moved, several times
    for key, value in processes[0]["state"].items():
        assert torch.equal(value, processes[1]["state"][key]), key


def test_ddp_run_equals_one_process_on_the_global_batch(processes):
    alone = train(part=None, rewrap=False)
    assert processes[0]["history"] == alone["history"]
    assert set(processes[0]["state"]) == set(alone["state"])
    for key, value in alone["state"].items():
        torch.testing.assert_close(processes[0]["state"][key], value, atol=1e-5, rtol=0, msg=key)


def test_the_wrapper_is_rebuilt_after_resizes_only_and_keeps_its_settings(processes):
    first = processes[0]
    assert 1 < first["wrappers"] <= first["allocations"] + 1
    assert first["carried"] == (True, int(0.001 * 1024**2), 1)


def test_a_stale_wrapper_is_a_loud_error(processes):
    for result in processes:
        assert "was not rebuilt" in result["without_rewrap"]
        assert "rewrap_ddp" in result["without_rewrap"]


def test_rewrap_ddp_needs_a_ddp_wrapper():
    model, _ = elalora_net()
    with pytest.raises(ValueError, match="DistributedDataParallel, got Net"):
        rewrap_ddp(model)
