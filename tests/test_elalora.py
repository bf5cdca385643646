"""ElaLoRA: the round's decisions, the schedule, the surgery, the optimizer state, resume and bad input.

No reference package exists (the official code is not on PyPI and PEFT has no ElaLoRA), so the round's
rules are pinned on hand-computed cases, and the surgery is checked against what the method says:
pruned components are the lowest offers, new components add nothing, the total rank is kept, and the
optimizer's moments follow the components they belong to.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_adalora import Net as AdaLoRANet
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.utils import ModelOutput

import rankwise
from rankwise.allocation import ElaLoRAAllocator
from rankwise.allocation.elalora import plan
from rankwise.integrations import RankwiseCallback

TARGETS = ["proj", "mid", "out"]
# rounds at t = 4, 6, ..., 16 (t_init = 2 < t < T - t_final = 17, ΔT = 2)
SCHEDULE = {"init_r": 4, "b": 3, "k": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 20, "alpha": 8.0}


class Net(AdaLoRANet):
    """test_adalora's net (three adapted layers of different shapes, one Conv1D, a frozen head) that also
    reads token ids, for rankwise's own training loop."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)

    def forward(self, x: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        if input_ids is not None:
            mask = attention_mask.unsqueeze(-1).float()
            x = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return super().forward(x, labels)


def base() -> Net:
    torch.manual_seed(0)
    return Net()


def adapted(**overrides) -> nn.Module:
    torch.manual_seed(1)
    return rankwise.adapt(base(), rankwise.config("elalora", targets=TARGETS, **{**SCHEDULE, **overrides})).train()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def backward(model: nn.Module, step: int) -> None:
    x, y = batch(step)
    (model(x, labels=y).loss + rankwise.allocator(model).regularizer()).backward()


def run(model: nn.Module, steps: range, optimizer: torch.optim.Optimizer) -> None:
    allocator = rankwise.allocator(model)
    allocator.attach_optimizer(optimizer)
    for step in steps:
        backward(model, step)
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer.adapter for name, layer in rankwise.adapted_layers(model)}


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{t}": getattr(adapter, t).detach().clone()
            for name, adapter in adapters(model).items() for t in ("lora_A", "lora_E", "lora_B")}


# ----------------------------------------------------------------------------------------------
# One round's decisions, by hand
# ----------------------------------------------------------------------------------------------

BIG = {"a": 99, "b": 99, "c": 99}


def decide(scores: dict[str, list[float]], moved: int, k: int = 2, caps: dict[str, int] = BIG):
    return plan({n: torch.tensor(s) for n, s in scores.items()}, caps, moved, k)


def test_round_prunes_the_lowest_offers_and_grows_the_highest():
    # offers: a -> 0.1 (i1), 0.5 (i0); b -> 0.2 (i1) only (k_b = min(2, 2 - 1)); c (rank 1) -> none
    scores = {"a": [0.5, 0.1, 0.9], "b": [0.3, 0.2], "c": [0.05]}
    assert decide(scores, 1) == ({"a": [1], "b": [], "c": []}, {"a": 1, "b": 0, "c": 0})
    assert decide(scores, 2) == ({"a": [1], "b": [1], "c": []}, {"a": 1, "b": 1, "c": 0})
    # k = 1: a offers 0.1 only, so b's 0.2 is the highest offer
    assert decide(scores, 1, k=1) == ({"a": [1], "b": [], "c": []}, {"a": 0, "b": 1, "c": 0})


def test_a_layer_with_several_high_offers_gains_several():
    scores = {"a": [0.8, 0.7, 0.9], "b": [0.1, 0.2, 0.3]}
    assert decide(scores, 2) == ({"a": [], "b": [0, 1]}, {"a": 2, "b": 0})


def test_ties_prune_exactly_b_by_layer_then_index():
    scores = {"a": [0.2, 0.2, 0.2], "b": [0.2, 0.2]}
    assert decide(scores, 2) == ({"a": [0, 1], "b": []}, {"a": 2, "b": 0})


def test_a_full_layer_passes_its_slot_on_and_pruning_matches_the_slots_placed():
    scores = {"a": [0.5, 0.1, 0.9], "b": [0.3, 0.2]}
    assert decide(scores, 1, caps={"a": 3, "b": 99}) == ({"a": [1], "b": []}, {"a": 0, "b": 1})
    assert decide(scores, 1, caps={"a": 4, "b": 99}) == ({"a": [1], "b": []}, {"a": 1, "b": 0})
    assert decide(scores, 2, caps={"a": 3, "b": 2}) == ({"a": [], "b": []}, {"a": 0, "b": 0})


def test_b_beyond_the_pool_is_clipped_with_a_warning():
    with pytest.warns(UserWarning, match="b_t=5 exceeds the 3 components"):
        pruned, grown = decide({"a": [0.5, 0.1, 0.9], "b": [0.3, 0.2]}, 5)
    assert pruned == {"a": [1, 0], "b": [1]} and grown == {"a": 2, "b": 1}


def test_scores_are_sensitivity_times_uncertainty_with_means_over_the_vectors():
    model = adapted(beta1=0.8, beta2=0.9)
    optimizer = adamw(model)
    allocator = rankwise.allocator(model)
    allocator.attach_optimizer(optimizer)
    ipt: dict[str, torch.Tensor] = {}
    unc: dict[str, torch.Tensor] = {}
    for step in range(4):  # no round before t = 4
        backward(model, step)
        optimizer.step()
        for name, adapter in adapters(model).items():
            for tensor in ("lora_A", "lora_E", "lora_B"):
                p = getattr(adapter, tensor)
                key = f"{name}.{tensor}"
                now = (p * p.grad).abs().detach()
                ipt[key] = 0.8 * ipt.get(key, torch.zeros_like(now)) + 0.2 * now
                unc[key] = 0.9 * unc.get(key, torch.zeros_like(now)) + 0.1 * (now - ipt[key]).abs()
        allocator.step(step)
        optimizer.zero_grad()
    for name, score in allocator.scores().items():
        s = {t: ipt[f"{name}.{t}"] * unc[f"{name}.{t}"] for t in ("lora_A", "lora_E", "lora_B")}
        expected = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        torch.testing.assert_close(score, expected, atol=0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------


def test_scheduler_decays_b_cubically_and_rounds_fall_on_the_grid():
    allocator = rankwise.allocator(adapted())
    # b_t = round(3 (1 - ((t - 2) / 15)^3)): t=4: 2.998; 10: 2.545; 12: 2.111; 14: 1.464; 16: 0.561
    assert [allocator.moved(t) for t in (0, 2, 4, 10, 12, 14, 16, 17, 19)] == [3, 3, 3, 3, 2, 1, 1, 0, 0]
    assert [t for t in range(20) if allocator.is_round(t)] == [4, 6, 8, 10, 12, 14, 16]
    plain = rankwise.allocator(adapted(scheduler=False, b=2))
    assert [plain.moved(t) for t in (4, 16, 19)] == [2, 2, 2]
    assert [plain.is_round(t) for t in (2, 16, 17, 18)] == [False, True, False, False]
    late = rankwise.allocator(adapted(b=1))  # round(1 - p^3) = 0 once p^3 > 0.5 (t >= 14)
    assert [t for t in range(20) if late.is_round(t)] == [4, 6, 8, 10, 12]
    odd = rankwise.allocator(adapted(tinit=3, scheduler=False))  # the grid counts from t_init
    assert [t for t in range(20) if odd.is_round(t)] == [5, 7, 9, 11, 13, 15]


def test_ranks_move_only_in_the_adjustment_window_with_the_total_kept():
    model = adapted()
    allocator = rankwise.allocator(model)
    optimizer = adamw(model)
    allocator.attach_optimizer(optimizer)
    history = []
    for step in range(20):
        backward(model, step)
        optimizer.step()
        before = allocator.exp_avg_ipt.get("proj.lora_E")
        allocator.step(step)
        optimizer.zero_grad()
        ranks = rankwise.ranks(model)
        history.append(ranks)
        assert sum(ranks.values()) == 3 * 4, f"budget broken at step {step}: {ranks}"
        assert rankwise.adapter_config(model).rank_pattern == (ranks if step >= 4 else None)
        for name, adapter in adapters(model).items():
            assert adapter.lora_A.shape[0] == adapter.lora_E.shape[0] == adapter.lora_B.shape[1] == ranks[name]
        if step >= 17:  # stabilisation: statistics frozen too
            assert allocator.exp_avg_ipt["proj.lora_E"] is before
    assert allocator.allocations == 7
    assert all(h == history[0] for h in history[:4])
    assert all(h == history[16] for h in history[16:])
    assert any(h != history[0] for h in history), "no rank moved"


# ----------------------------------------------------------------------------------------------
# The surgery: what is pruned, what is grown, the function, the optimizer state
# ----------------------------------------------------------------------------------------------


def at_round(**overrides):
    """A model trained to just before the round at step 4, its optimizer, and the scores that round uses."""
    model = adapted(**overrides)
    optimizer = adamw(model)
    run(model, range(4), optimizer)
    backward(model, 4)
    optimizer.step()
    allocator = rankwise.allocator(model)
    used: dict[str, torch.Tensor] = {}
    scores = allocator.scores

    def spy() -> dict[str, torch.Tensor]:  # records the scores and (under "stats") the EMAs the round sees
        used.update(scores())
        used.update({f"stats.{k}": v.clone() for k, v in allocator.exp_avg_ipt.items()})
        return {name: used[name] for name in allocator.layers}

    allocator.scores = spy
    return model, optimizer, allocator, used


def test_pruned_components_are_the_lowest_offers_and_new_ones_add_nothing():
    model, _, allocator, used = at_round()
    before = tensors(model)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    allocator.step(4)
    scale = 8.0 / (4 + 1e-5)
    offers, pruned = [], []
    for name, adapter in adapters(model).items():
        old_e = before[f"{name}.lora_E"].view(-1)
        survivors = [i for i in range(4)
                     if any(torch.equal(adapter.lora_A[j], before[f"{name}.lora_A"][i]) for j in range(adapter.r))]
        order = sorted(range(4), key=lambda i: (used[name][i].item(), i))[:min(2, 4 - 1)]
        offers += [used[name][i].item() for i in order]
        pruned += [used[name][i].item() for i in range(4) if i not in survivors]
        assert set(range(4)) - set(survivors) <= set(order), f"{name}: pruned a component it did not offer"
        kept = torch.tensor(survivors)
        n_kept = len(survivors)
        assert torch.equal(adapter.lora_A[:n_kept], before[f"{name}.lora_A"][kept])
        assert torch.equal(adapter.lora_E[:n_kept], before[f"{name}.lora_E"][kept])
        assert torch.equal(adapter.lora_B[:, :n_kept], before[f"{name}.lora_B"][:, kept])
        new_rows, new_cols = adapter.lora_A[n_kept:].double(), adapter.lora_B[:, n_kept:].double()
        grown = adapter.r - n_kept
        eye = torch.eye(grown, dtype=torch.float64)
        assert torch.allclose(new_rows @ new_rows.T, eye, atol=1e-6)
        assert torch.allclose(new_cols.T @ new_cols, eye, atol=1e-6)
        assert torch.allclose(new_rows @ adapter.lora_A[:n_kept].double().T, torch.zeros(grown, n_kept, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(new_cols.T @ adapter.lora_B[:, :n_kept].double(), torch.zeros(grown, n_kept, dtype=torch.float64), atol=1e-6)
        expected_e = min(old_e[kept].abs().min().item(), 1e-13)
        assert adapter.lora_E[n_kept:].view(-1).tolist() == [torch.tensor(expected_e).item()] * grown
        # the function after surgery: the surviving components only (the new ones add ~1e-13)
        survivor_update = before[f"{name}.lora_B"][:, kept] @ (before[f"{name}.lora_A"][kept] * old_e[kept, None])
        torch.testing.assert_close(adapter.delta_weight(), survivor_update * scale, atol=1e-9, rtol=0)
    assert len(pruned) == 3 and sorted(pruned) == sorted(offers)[:3]
    assert sum(rankwise.ranks(model).values()) == 12
    layer = model.get_submodule("proj")
    expected = layer.base_layer(x) + x @ adapters(model)["proj"].delta_weight().T
    torch.testing.assert_close(layer(x), expected)


def test_the_optimizer_moments_follow_the_surviving_components():
    model, optimizer, allocator, used = at_round()
    params = {name: {t: getattr(a, t) for t in ("lora_A", "lora_E", "lora_B")} for name, a in adapters(model).items()}
    before = tensors(model)
    states = {(n, t): {k: v.clone() for k, v in optimizer.state[p].items()} for n, d in params.items() for t, p in d.items()}
    allocator.step(4)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    dims = {"lora_A": 0, "lora_E": 0, "lora_B": 1}
    for name, adapter in adapters(model).items():
        old_a, new_a = before[f"{name}.lora_A"], adapter.lora_A
        kept = [i for i in range(4) if any(torch.equal(new_a[j], old_a[i]) for j in range(adapter.r))]
        index = torch.tensor(kept)
        for tensor, dim in dims.items():
            parameter = getattr(adapter, tensor)
            assert parameter is params[name][tensor] and any(parameter is p for p in held)
            state = optimizer.state[parameter]
            old = states[(name, tensor)]
            assert torch.equal(state["step"], old["step"])
            for moment in ("exp_avg", "exp_avg_sq"):
                assert state[moment].shape == parameter.shape
                assert torch.equal(state[moment].narrow(dim, 0, len(kept)), old[moment].index_select(dim, index))
                assert not state[moment].narrow(dim, len(kept), adapter.r - len(kept)).any()
            stat = allocator.exp_avg_ipt[f"{name}.{tensor}"]
            assert torch.equal(stat.narrow(dim, 0, len(kept)), used[f"stats.{name}.{tensor}"].index_select(dim, index))
            assert not stat.narrow(dim, len(kept), adapter.r - len(kept)).any()
            assert parameter.grad is not None and parameter.grad.shape == parameter.shape


def test_one_adamw_step_after_a_round_equals_the_hand_computed_one():
    model, optimizer, allocator, _ = at_round()
    allocator.step(4)
    optimizer.zero_grad()
    backward(model, 5)
    lr, wd, (beta1, beta2), eps = 2e-2, 0.01, (0.9, 0.999), 1e-8
    expected = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            t = state["step"].item() + 1
            m = beta1 * state["exp_avg"] + (1 - beta1) * p.grad
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * p.grad**2
            update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            expected[p] = p.detach() * (1 - lr * wd) - lr * update
    optimizer.step()
    for p, value in expected.items():
        torch.testing.assert_close(p.detach(), value, atol=1e-6, rtol=1e-6)


def test_new_components_are_orthonormal_even_when_the_old_ones_are_not():
    model = adapted(init_weights=False)  # A, B ~ N(0, 1): far from orthonormal
    adapter = adapters(model)["mid"]
    fresh = adapter.new_components(3)
    a, b = fresh["lora_A"].double(), fresh["lora_B"].double()
    assert torch.allclose(a @ adapter.lora_A.double().T, torch.zeros(3, 4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(b.T @ adapter.lora_B.double(), torch.zeros(3, 4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    expected = torch.tensor(min(adapter.lora_E.abs().min().item(), 1e-13)).item()  # 1e-13 in float32
    assert fresh["lora_E"].view(-1).tolist() == [expected] * 3
    with torch.no_grad():
        adapter.lora_E[2] = 0.0  # a zero singular value: the new ones are min(min |E|, 1e-13) = 0
    assert not adapter.new_components(2)["lora_E"].any()


def test_resize_in_place_on_lora_moves_sgd_momentum_too():
    torch.manual_seed(1)
    model = rankwise.adapt(base(), rankwise.config("lora", targets=["proj"], r=3, init_weights=False))
    adapter = adapters(model)["proj"]
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(0)
    model(x, labels=y).loss.backward()
    optimizer.step()
    a = adapter.lora_A.weight
    momentum = optimizer.state[a]["momentum_buffer"].clone()
    adapter.keep_components(torch.tensor([True, False, True]), optimizer)
    adapter.grow_components(2, optimizer)
    assert adapter.lora_A.weight is a and a.shape == (4, 16)
    assert torch.equal(optimizer.state[a]["momentum_buffer"][:2], momentum[[0, 2]])
    assert not optimizer.state[a]["momentum_buffer"][2:].any()


# ----------------------------------------------------------------------------------------------
# Save, load and resume
# ----------------------------------------------------------------------------------------------


def test_saved_adapter_reloads_at_its_ranks(tmp_path):
    model = adapted()
    run(model, range(12), adamw(model))
    rankwise.save(model, tmp_path)
    loaded = rankwise.load(base(), tmp_path)
    assert rankwise.ranks(loaded) == rankwise.ranks(model) != {"proj": 4, "mid": 4, "out": 4}
    x = batch(0)[0]
    torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits, atol=0, rtol=0)


def test_callback_gives_the_allocator_the_trainers_optimizer(tmp_path):
    model = adapted()
    optimizer = adamw(model)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    RankwiseCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
    assert rankwise.allocator(model).optimizer is optimizer


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the fix, before anything changes
# ----------------------------------------------------------------------------------------------


def test_a_round_without_an_optimizer_is_refused_before_anything_changes():
    model = adapted()
    optimizer = adamw(model)
    allocator = rankwise.allocator(model)
    for step in range(4):
        backward(model, step)
        optimizer.step()
        allocator.step(step)  # no round yet: no optimizer needed
        optimizer.zero_grad()
    backward(model, 4)
    optimizer.step()
    before, stats = tensors(model), copy.deepcopy(allocator.exp_avg_ipt)
    with pytest.raises(ValueError, match="attach_optimizer"):
        allocator.step(4)
    assert all(torch.equal(v, before[k]) for k, v in tensors(model).items())
    assert all(torch.equal(v, stats[k]) for k, v in allocator.exp_avg_ipt.items())


def test_an_optimizer_without_the_adapter_is_refused():
    model = adapted()
    other = torch.optim.AdamW([adapters(model)["proj"].lora_A], lr=1e-3)
    with pytest.raises(ValueError, match=r"does not hold \['proj.lora_E', 'proj.lora_B', 'mid.lora_A'"):
        rankwise.allocator(model).attach_optimizer(other)
    adapter = adapters(model)["mid"]
    with pytest.raises(ValueError, match="layer 'mid'"):
        adapter.keep_components(torch.tensor([True, True, False, True]), other)
    with pytest.raises(ValueError, match="layer 'mid'"):
        adapter.grow_components(1, other)
    assert adapter.r == 4 and adapter.lora_A.shape == (4, 24)


def test_growing_past_min_m_n_is_refused():
    adapter = adapters(adapted())["out"]  # 20 -> 12
    with pytest.raises(ValueError, match=r"'out' \(out_features=12, in_features=20\).*exceeds min\(out, in\)=12"):
        adapter.new_components(9)


def test_rank_pattern_for_a_missing_layer_is_refused():
    model = adapted(rank_pattern={"proj": 4, "nope": 3})
    with pytest.raises(ValueError, match=r"rank_pattern names \['nope'\]"):
        rankwise.allocator(model)


def test_a_step_without_gradients_is_refused():
    model = adapted()
    with pytest.raises(ValueError, match=r"ElaLoRA allocator.step\(0\): no gradient"):
        rankwise.allocator(model).step(0)


def test_allocator_on_a_model_without_rank_components_is_refused():
    torch.manual_seed(1)
    model = rankwise.adapt(base(), rankwise.config("c3a", targets=["proj"], block_size=8))
    with pytest.raises(ValueError, match="method 'c3a' has none; the supported methods are"):
        ElaLoRAAllocator(model, total_step=10)


def test_finetune_options_of_a_method_that_needs_the_run_length_are_accepted():
    """``rankwise finetune --method elalora|adalora``: the early option check does not ask for total_step."""
    from rankwise import cli
    from rankwise.cli import finetune

    for argv in (["--method", "elalora", "--init-r", "4", "--set", "deltaT=3"], ["--method", "adalora"]):
        args = cli.build_parser().parse_args(["finetune", *argv])
        assert "total_step" not in finetune.method_options(args)
    args = cli.build_parser().parse_args(["finetune", "--method", "elalora", "--init-r", "1"])
    with pytest.raises(ValueError, match="init_r must be >= 2"):
        finetune.method_options(args)
