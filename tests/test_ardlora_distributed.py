"""ARD-LoRA in a distributed run: two gloo processes under DDP read the same ranks and end with the same weights.

α is a parameter like A and B, so DDP all-reduces its gradient and both processes round the same α
(``rankwise.allocation.ardlora``); no change to the allocator is needed. The regulariser R(α) is added
outside the DDP forward, but it is the same on both processes (same α), so the averaged gradient of
α is R's gradient plus the mean of the task gradients, as on the concatenated batch. One spawn serves
every test; each process also runs without DDP on its own data, which must disagree (the test can fail).
(Lean imports: the spawned processes import this module.)
"""

from __future__ import annotations

import pytest
import torch
from gloo import on_gloo_processes
from torch import nn

import rankwise
from rankwise.core.io import adapter_state

STEPS = 12
WIDTH = 32
# r0 = 4, so a unit leaves rank 4 once α crosses 0.875 or 1.125; α's own lr (scale_lr) moves it there in a few steps.
OPTIONS = {"r": 4, "r_max": 6, "alpha": 8.0, "heads": {"q": 4}, "input_heads": {"o": 4}, "targets": ["q", "o", "f"],
           "l1_weight": 1e-3, "tv_weight": 1e-3, "scale_lr": 0.1}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, WIDTH)  # 4 heads of 8 output rows
        self.o = nn.Linear(WIDTH, WIDTH)  # 4 heads of 8 input columns
        self.f = nn.Linear(WIDTH, WIDTH)  # one unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.o(torch.tanh(self.q(x)))) + torch.tanh(self.f(x))


class Net(nn.Module):
    """Two blocks (so the TV term has depth pairs) and a head; returns the cross-entropy loss."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x), labels)


def ardlora_net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(1)
    return rankwise.adapt(net, rankwise.config("ardlora", **OPTIONS))


def batch(step: int, part: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of 16 examples; ``part`` 0 or 1 is its first or second half (one process's share).

    The halves come from different distributions (half 1 is shifted and scaled, its labels follow
    another rule), so processes that do not synchronise move α differently."""
    generator = torch.Generator().manual_seed(200 + step)
    x = torch.randn(16, WIDTH, generator=generator)
    y = (x[:, :3].argmax(dim=1) + torch.arange(16).ge(8).long()) % 3
    x[8:] = 3 * x[8:] + 1
    return (x, y) if part is None else (x[8 * part: 8 * part + 8], y[8 * part: 8 * part + 8])


def train(model: nn.Module, part: int | None, wrapper: nn.Module | None = None) -> list[dict[str, list[int]]]:
    """loss + R(α), backward, optimizer step, allocator step, zero_grad; then finalize. Returns the unit ranks per step."""
    allocator = rankwise.allocator(model)
    optimizer = torch.optim.AdamW(allocator.param_groups(lr=2e-2))
    history = []
    for step in range(STEPS):
        loss = (wrapper or model)(*batch(step, part)) + allocator.regularizer()
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
        history.append(allocator.unit_ranks())
    allocator.finalize()
    return history


def _work(rank: int) -> dict:
    """One of two gloo processes: a DDP run and an unsynchronised run on its own half."""
    synced = ardlora_net()
    history = train(synced, part=rank, wrapper=nn.parallel.DistributedDataParallel(synced))
    alone = ardlora_net()  # no DDP: every process trains on its own half only
    alone_history = train(alone, part=rank)
    return {
        "ddp_state": adapter_state(synced), "ddp_ranks": rankwise.ranks(synced), "ddp_history": history,
        "alone_state": adapter_state(alone), "alone_ranks": rankwise.ranks(alone), "alone_history": alone_history,
    }


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return on_gloo_processes(_work, tmp_path_factory.mktemp("ardddp"))


def test_ddp_processes_read_the_same_ranks_and_end_with_the_same_weights(distributed):
    first, second = distributed
    assert first["ddp_history"] == second["ddp_history"]  # every step, every unit
    assert first["ddp_ranks"] == second["ddp_ranks"]
    assert first["ddp_history"][-1] != first["ddp_history"][0]  # the ranks moved: the agreement is not trivial
    assert any(len(set(units)) > 1 for units in first["ddp_history"][-1].values())  # heads of one layer differ
    assert first["ddp_state"].keys() == second["ddp_state"].keys()
    assert any(key.endswith("head_ranks") for key in first["ddp_state"])  # finalized
    for key, value in first["ddp_state"].items():
        assert torch.equal(value, second["ddp_state"][key]), key  # exact: DDP hands both the same gradients


def test_ddp_run_equals_one_process_on_the_concatenated_batch(distributed):
    """Two halves of equal size: the mean of the processes' gradients is the full batch's gradient up to the
    order of float32 sums; so the same ranks at every step, and the weights to 1e-5 (5.1e-7 seen)."""
    single = ardlora_net()
    history = train(single, part=None)
    assert history == distributed[0]["ddp_history"]
    assert rankwise.ranks(single) == distributed[0]["ddp_ranks"]
    state = adapter_state(single)
    assert state.keys() == distributed[0]["ddp_state"].keys()
    for key, value in state.items():
        torch.testing.assert_close(distributed[0]["ddp_state"][key], value, atol=1e-5, rtol=0, msg=key)


def test_without_ddp_the_processes_disagree(distributed):
    """The check above can fail: processes that train on their own data without DDP read different ranks."""
    first, second = distributed
    assert first["alone_history"] != second["alone_history"]
    assert any(not torch.equal(value, second["alone_state"][key])
               for key, value in first["alone_state"].items() if key in second["alone_state"])
