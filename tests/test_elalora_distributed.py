"""ElaLoRA in a distributed run: two gloo processes that score differently make the same surgery.

The scores are averaged over the processes before each round and the new components come from the
same seeded generator. (Lean imports: the spawned processes import this module.)"""

from __future__ import annotations

import torch
from gloo import on_gloo_processes
from test_allocation_infra import Net, batch

import rankwise

SCHEDULE = {"init_r": 4, "b": 3, "k": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 20, "alpha": 8.0}


def _work(rank: int) -> dict:
    """One of two processes, each on its own half of every batch (halves from different distributions), no DDP."""
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(1)
    model = rankwise.adapt(net, rankwise.config("elalora", targets=["proj", "mid", "out"], **SCHEDULE))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    allocator = rankwise.allocator(model)
    allocator.attach_optimizer(optimizer)
    history = []
    for step in range(SCHEDULE["total_step"]):
        (model(*batch(step, rank)) + allocator.regularizer()).backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
        history.append(rankwise.ranks(model))
    grown = {name: layer.adapter.lora_A[-1].detach() for name, layer in rankwise.adapted_layers(model)}
    return {"history": history, "last_rows": grown}


def test_processes_that_score_differently_make_the_same_surgery(tmp_path):
    first, second = on_gloo_processes(_work, tmp_path)
    assert first["history"] == second["history"]
    assert any(ranks != first["history"][0] for ranks in first["history"])
    assert all(row.shape == second["last_rows"][name].shape for name, row in first["last_rows"].items())
