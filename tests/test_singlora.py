"""SingLoRA oracle tests: peft-singlora 0.2.0 for ΔW, a dense reference of the paper's formula, the
paper's invariances, and the ramp-up clock that peft-singlora leaves to the user."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft_singlora import Linear as PeftSingLoRALinear
from peft_singlora import SingLoRAConfig as PeftSingLoRAConfig
from torch import nn
from toy_models import forward_and_dropped_input, minilm_shaped_bert

import rankwise
from rankwise.adapters.singlora import SingLoRAAdapter

SHAPES = [(10, 6), (6, 10), (8, 8)]  # (in, out): wide, tall, square


def adapter_for(in_f: int, out_f: int, dtype=torch.float32, **kwargs) -> tuple[nn.Linear, SingLoRAAdapter]:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype)
    config = rankwise.config("singlora", **{"r": 3, "alpha": 5.0, "ramp_up_steps": 10, **kwargs})
    return base, SingLoRAAdapter(base, config, "layer").to(dtype)


def paper_delta(A: torch.Tensor, out_f: int, in_f: int, alpha: float, r: int, t: int, T: int) -> torch.Tensor:
    """(α/r)·min(t/T, 1)·A*Aᵀ (paper Eq. 8 and §4.4), written in the paper's orientation: W0 is
    d_small×d_large, A is d_large×r and A* its first d_small rows; transposed back when out > in."""
    u = min(t / T, 1.0)
    small = min(out_f, in_f)
    update = A[:small] @ A.T  # (small, large)
    update = update if out_f <= in_f else update.T
    return (alpha / r) * u * update


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("step", [0, 4, 25])
def test_eval_forward_and_delta_equal_peft_singlora_and_the_paper(in_f, out_f, step):
    base, ours = adapter_for(in_f, out_f)
    theirs = PeftSingLoRALinear(copy.deepcopy(base), "default", r=3, lora_alpha=5.0)
    theirs.ramp_up_steps = 10  # its config value is ignored, so set it on the layer (spec §5)
    theirs.update_global_step(step)
    with torch.no_grad():
        theirs.lora_A["default"].copy_(ours.singlora_A)
    ours.set_step(step)
    ours.eval()
    x = torch.randn(4, 2, in_f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, base(x)), theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.delta_weight(), theirs._get_update_weight("default"), atol=1e-6, rtol=1e-6)
        reference = paper_delta(ours.singlora_A, out_f, in_f, 5.0, 3, step, 10)
        torch.testing.assert_close(ours.delta_weight(), reference, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours(x, base(x)), base(x) + x @ reference.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_float64_forward_equals_dense_paper_formula(in_f, out_f):
    base, ours = adapter_for(in_f, out_f, torch.float64, ramp_up_steps=0)
    x = torch.randn(3, in_f, dtype=torch.float64)
    reference = paper_delta(ours.singlora_A.detach(), out_f, in_f, 5.0, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, base(x)), base(x) + x @ reference.T, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_orthogonal_invariance_and_transformation_invariant_sgd_step(in_f, out_f):
    """Theorems 2 and 3: A and AQ give the same ΔW, and one SGD step keeps them equal."""
    base, first = adapter_for(in_f, out_f, torch.float64, ramp_up_steps=0)
    second = copy.deepcopy(first)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        second.singlora_A.copy_(first.singlora_A @ q)
    torch.testing.assert_close(first.delta_weight(), second.delta_weight(), atol=1e-12, rtol=1e-12)
    x = torch.randn(5, in_f, dtype=torch.float64)
    target = torch.randn(5, out_f, dtype=torch.float64)
    for adapter in (first, second):
        loss = (adapter(x, base(x)) - target).square().sum()
        loss.backward()
        with torch.no_grad():
            adapter.singlora_A -= 0.01 * adapter.singlora_A.grad
    torch.testing.assert_close(first.delta_weight(), second.delta_weight(), atol=1e-12, rtol=1e-12)


def train(model: nn.Module, steps: int, accumulate: int = 1) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(steps):
        for _ in range(accumulate):
            model(torch.randn(4, 10, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_clock_counts_optimizer_steps_not_forwards_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(10, 6)), rankwise.config("singlora", r=2, ramp_up_steps=10))
    adapter = model[0].adapter
    A0 = adapter.singlora_A.detach().clone()
    train(model, steps=3, accumulate=2)  # 6 forwards, 3 optimizer steps
    assert int(adapter.singlora_step) == 3
    assert not torch.equal(adapter.singlora_A, A0)  # step 1 already had a gradient (u(1) = 1/10)
    for mode in (False, True):  # u(t) after 3 steps, whatever the mode; a training forward computes step 4
        model.train(mode)
        assert float(adapter.ramp()) == pytest.approx(0.3)
        assert float(adapter.ramp(ahead=True)) == pytest.approx(0.4)
    with torch.no_grad():  # an eval-only forward or an optimizer without A moves nothing
        model.eval()(torch.randn(2, 10))
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()
    assert int(adapter.singlora_step) == 3
    rankwise.save(model, tmp_path / "ckpt")
    torch.manual_seed(0)
    resumed = rankwise.load(nn.Sequential(nn.Linear(10, 6)), tmp_path / "ckpt")
    assert int(resumed[0].adapter.singlora_step) == 3
    train(resumed, steps=2)
    assert int(resumed[0].adapter.singlora_step) == 5
    copied = copy.deepcopy(resumed)  # a copy keeps its own clock
    train(copied, steps=1)
    assert (int(copied[0].adapter.singlora_step), int(resumed[0].adapter.singlora_step)) == (6, 5)


def test_peft_singlora_ramp_up_defects_that_rankwise_fixes():
    """peft-singlora 0.2.0: the configured T is dropped, and without a manual
    update_singlora_global_step u stays 0, so A gets a zero gradient and nothing trains."""
    from peft import get_peft_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(10, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.manual_seed(0)
    theirs = get_peft_model(Net(), PeftSingLoRAConfig(target_modules=["lin"], r=2, lora_alpha=2, ramp_up_steps=10))
    layer = theirs.base_model.model.lin
    assert layer.ramp_up_steps == 1000  # defect 1: ramp_up_steps=10 ignored
    A0 = layer.lora_A["default"].detach().clone()
    train(theirs, steps=3)
    assert torch.equal(layer.lora_A["default"], A0)  # defect 2: three steps, no training

    torch.manual_seed(0)
    ours = rankwise.adapt(Net(), rankwise.config("singlora", r=2, alpha=2, ramp_up_steps=10))
    A0 = ours.lin.adapter.singlora_A.detach().clone()
    train(ours, steps=3)
    assert not torch.equal(ours.lin.adapter.singlora_A, A0)
    assert int(ours.lin.adapter.singlora_step) == 3


def test_merge_is_applied_once_and_unmerge_uses_the_recorded_ramp():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    model = rankwise.adapt(nn.Sequential(copy.deepcopy(base)), rankwise.config("singlora", r=2, ramp_up_steps=10))
    model[0].adapter.set_step(5)
    model.eval()
    x = torch.randn(3, 10)
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match="u\\(t\\)=0.5"):
            rankwise.merge(model)
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)  # not added twice
        model[0].adapter.set_step(8)  # the clock moves while merged
        rankwise.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, base.weight, atol=1e-6, rtol=1e-6)

    # peft-singlora adds the update a second time after merge (defect 3)
    theirs = PeftSingLoRALinear(copy.deepcopy(base), "default", r=2, lora_alpha=2)
    theirs.ramp_up_steps, _ = 10, theirs.update_global_step(5)
    with torch.no_grad():
        unmerged = theirs(x)
        theirs.merge()
        merged = theirs(x)
        delta = x @ theirs._get_update_weight("default").T
    torch.testing.assert_close(merged, unmerged + delta)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_training_forward_with_dropout_equals_peft_singlora(in_f, out_f):
    """Dropout on the adapter branch's input only, one mask drawn as peft-singlora draws it (base
    first, then dropout(x)); a training forward uses u(t + 1), i.e. peft-singlora's counter at t + 1.
    Dropout removed, or applied to the base path, fails here."""
    base, ours = adapter_for(in_f, out_f, dropout=0.5)
    theirs = PeftSingLoRALinear(copy.deepcopy(base), "default", r=3, lora_alpha=5.0, lora_dropout=0.5)
    theirs.ramp_up_steps = 10
    theirs.update_global_step(4 + 1)
    with torch.no_grad():
        theirs.lora_A["default"].copy_(ours.singlora_A)
    ours.set_step(4)
    ours.train()
    theirs.train()
    x = torch.randn(64, in_f, generator=torch.Generator().manual_seed(1))
    expected, dropped = forward_and_dropped_input(lambda: theirs(x), x, 0.5)
    with torch.no_grad():
        torch.manual_seed(5)
        torch.testing.assert_close(ours(x, base(x)), expected, atol=1e-6, rtol=1e-6)
        reference = paper_delta(ours.singlora_A, out_f, in_f, 5.0, 3, 5, 10)
        torch.testing.assert_close(expected, base(x) + dropped @ reference.T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_merge_in_training_mode_mid_ramp_equals_the_unmerged_eval_forward(in_f, out_f):
    """delta_weight and merge use u(t) in either mode, so the merged model computes exactly what the
    unmerged model computes in eval mode at that moment (and what peft-singlora merges at step t)."""
    base, ours = adapter_for(in_f, out_f)
    model = rankwise.adapt(nn.Sequential(copy.deepcopy(base)),
                           rankwise.config("singlora", r=3, alpha=5.0, ramp_up_steps=10))
    adapter = model[0].adapter
    with torch.no_grad():
        adapter.singlora_A.copy_(ours.singlora_A)
    adapter.set_step(4)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged_eval = model.eval()(x)
        model.train()
        assert not torch.allclose(model(x), unmerged_eval)  # training forward: u(5) = 0.5, not u(4)
        reference = paper_delta(adapter.singlora_A, out_f, in_f, 5.0, 3, 4, 10)
        torch.testing.assert_close(adapter.delta_weight(), reference, atol=1e-6, rtol=1e-6)
        with pytest.warns(UserWarning, match="u\\(t\\)=0.4"):
            rankwise.merge(model)
        torch.testing.assert_close(model(x), unmerged_eval, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model[0].base_layer.weight, base.weight + reference, atol=1e-6, rtol=1e-6)
        rankwise.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, base.weight, atol=1e-6, rtol=1e-6)


def test_init_scale_and_defaults_on_minilm_shapes():
    bert = minilm_shaped_bert()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = bert(ids).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rankwise.adapt(bert, rankwise.config("singlora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, before, atol=0, rtol=0)  # u(0) = 0
    for _, layer in rankwise.adapted_layers(model):
        A = layer.adapter.singlora_A
        bound = 1 / max(A.shape[0], 1) ** 0.5
        assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound  # U(±1/√d), d = max(m, n)
    config = rankwise.config("singlora")
    shapes = [layer.base_layer.weight.shape for _, layer in rankwise.adapted_layers(model)]
    assert rankwise.trainable_parameters(model) == sum(SingLoRAAdapter.expected_num_params(m, n, config)
                                                       for m, n in shapes) == 8 * sum(max(s) for s in shapes)
    assert (1536, 384) in shapes and (384, 1536) in shapes
