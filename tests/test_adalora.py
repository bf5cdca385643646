"""AdaLoRA against Hugging Face PEFT 0.21.2 (the oracle), and the rank interface it runs on.

The training test runs PEFT's ``update_and_allocate`` and rankwise's ``allocator.step`` side by side on
the same base, initial weights and batches, in PEFT's order, and checks the masks after every step,
the final ranks and the outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, PeftModel, get_peft_model

import rankwise
from rankwise.allocation import AdaLoRAAllocator

TOL = {"atol": 1e-5, "rtol": 1e-5}
SCHEDULE = {"init_r": 6, "target_r": 3, "tinit": 3, "tfinal": 4, "deltaT": 2, "total_step": 24}
PEFT_SCHEDULE = {**SCHEDULE, "lora_alpha": 12, "orth_reg_weight": 0.3}
OURS = {**SCHEDULE, "alpha": 12.0, "orth_reg_weight": 0.3}


@dataclass
class Output(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Net(nn.Module):
    """Three adapted layers of different shapes (one Conv1D) and a head; returns a loss like a HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.mid = Conv1D(20, 24)  # 24 -> 20, weight stored (24, 20)
        self.out = nn.Linear(20, 12, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.head(torch.tanh(self.out(torch.tanh(self.mid(torch.tanh(self.proj(x)))))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(loss=loss, logits=logits)


TARGETS = ["proj", "mid", "out"]


def base() -> Net:
    torch.manual_seed(0)
    return Net()


def peft_model(net: Net, **overrides) -> nn.Module:
    config = AdaLoraConfig(target_modules=TARGETS, **{**PEFT_SCHEDULE, **overrides})
    return get_peft_model(copy.deepcopy(net), config)


def copy_from_peft(model: nn.Module, peft_net: nn.Module) -> None:
    state = peft_net.state_dict()
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(model):
            for tensor in ("lora_A", "lora_E", "lora_B"):
                getattr(layer.adapter, tensor).copy_(state[f"base_model.model.{name}.{tensor}.default"])


def pair(dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """PEFT's AdaLoRA and rankwise's on the same base, rankwise holding PEFT's initial tensors."""
    net = base()
    torch.manual_seed(1)
    theirs = peft_model(net, lora_dropout=dropout)
    ours = rankwise.adapt(copy.deepcopy(net), rankwise.config("adalora", targets=TARGETS, dropout=dropout, **OURS))
    copy_from_peft(ours, theirs)
    return theirs, ours


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def peft_masks(theirs: nn.Module) -> dict[str, list[bool]] | None:
    pattern = theirs.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    return {k.replace(".lora_E", "").replace(".default", ""): list(v) for k, v in pattern.items()}


def our_masks(ours: nn.Module) -> dict[str, list[bool]] | None:
    masks = rankwise.allocator(ours).masks
    return {name: mask.tolist() for name, mask in masks.items()} or None


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)


def train_ours(model: nn.Module, steps: range, optimizer: torch.optim.Optimizer) -> None:
    allocator = rankwise.allocator(model)
    for step in steps:
        x, y = batch(step)
        loss = model(x, labels=y).loss + allocator.regularizer()
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{t}": getattr(layer.adapter, t).detach().clone()
            for name, layer in rankwise.adapted_layers(model) for t in ("lora_A", "lora_E", "lora_B")}


def peft_tensors(theirs: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{t}": theirs.get_submodule(f"base_model.model.{name}").__getattr__(t)["default"].detach().clone()
            for name in TARGETS for t in ("lora_A", "lora_E", "lora_B")}


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


# peft_forward_note: a PeftModel without task_type calls the wrapped model directly, skipping
# AdaLoraModel.forward and so the regulariser; task models (SEQ_CLS, CAUSAL_LM, ...) go through it.
# The tests call AdaLoraModel.forward (theirs.base_model) to compare with the regulariser included.


def perturb_peft(theirs: nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_loss_gradients_and_merge_match_peft(dropout):
    theirs, ours = pair(dropout)
    perturb_peft(theirs)
    copy_from_peft(ours, theirs)
    x, y = batch(0)
    for training in (False, True):
        theirs.train(training)
        ours.train(training)
        torch.manual_seed(7)
        expected = theirs.base_model(x, labels=y).loss  # AdaLoraModel.forward adds the orthogonal regulariser
        torch.manual_seed(7)
        actual = ours(x, labels=y).loss + rankwise.allocator(ours).regularizer()
        torch.testing.assert_close(actual, expected, **TOL)
    expected.backward()
    actual.backward()
    for name, layer in rankwise.adapted_layers(ours):
        for tensor in ("lora_A", "lora_E", "lora_B"):
            reference = theirs.get_submodule(f"base_model.model.{name}").__getattr__(tensor)["default"].grad
            torch.testing.assert_close(getattr(layer.adapter, tensor).grad, reference, **TOL)
    theirs.eval()
    ours.eval()
    merged_theirs = copy.deepcopy(theirs).merge_and_unload()
    merged_ours = rankwise.unload(copy.deepcopy(ours), merge=True)
    for name in TARGETS:
        torch.testing.assert_close(merged_ours.get_submodule(name).weight, merged_theirs.get_submodule(name).weight,
                                   **TOL)


def test_same_seed_gives_peft_initial_weights():
    net = base()
    torch.manual_seed(3)
    theirs = peft_model(net)
    torch.manual_seed(3)
    ours = rankwise.adapt(copy.deepcopy(net), rankwise.config("adalora", targets=TARGETS, **OURS))
    expected = peft_tensors(theirs)
    for key, value in lora_tensors(ours).items():
        assert torch.equal(value, expected[key]), key


def test_init_statistics():
    torch.manual_seed(0)
    layer = nn.Linear(2000, 1500)
    model = rankwise.adapt(nn.Sequential(layer), rankwise.config("adalora", init_r=64, target_r=8, total_step=10))
    adapter = model[0].adapter
    assert torch.count_nonzero(adapter.lora_E) == 0
    for tensor in (adapter.lora_A, adapter.lora_B):  # N(0, 0.02²): ~1e5 samples pin the std to ~0.3 %
        assert abs(tensor.std().item() - 0.02) < 0.02 * 0.01
        assert abs(tensor.mean().item()) < 0.02 * 0.01
    assert rankwise.trainable_parameters(model) == 64 * (2000 + 1500 + 1)


# ----------------------------------------------------------------------------------------------
# Allocation: the same masks, ranks and outputs as PEFT's update_and_allocate
# ----------------------------------------------------------------------------------------------


def test_training_allocates_exactly_as_peft():
    theirs, ours = pair()
    theirs.train()
    ours.train()
    opt_theirs, opt_ours = adam(theirs), adam(ours)
    allocator = rankwise.allocator(ours)
    changes = 0
    for step in range(SCHEDULE["total_step"]):
        x, y = batch(step)
        theirs.base_model(x, labels=y).loss.backward()  # with the regulariser (see peft_forward_note)
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        before = our_masks(ours)
        train_ours(ours, range(step, step + 1), opt_ours)
        assert our_masks(ours) == peft_masks(theirs), f"step {step}"
        changes += our_masks(ours) != before
        expected = peft_tensors(theirs)
        for key, value in lora_tensors(ours).items():
            torch.testing.assert_close(value, expected[key], **TOL, msg=f"{key} at step {step}")
    assert changes >= 3, "the schedule should change the masks several times"
    assert allocator.allocations == 9  # steps 4, 6, ..., 18 of the budget phase and 20 = total_step - tfinal
    final = {name: sum(mask) for name, mask in peft_masks(theirs).items()}
    assert rankwise.ranks(ours) == final
    assert sum(final.values()) == SCHEDULE["target_r"] * len(TARGETS)
    assert len(set(final.values())) > 1, "the budget should be spread unevenly over the layers"
    theirs.eval()
    ours.eval()
    x, _ = batch(999)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, **TOL)
