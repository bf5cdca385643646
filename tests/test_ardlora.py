"""ARD-LoRA: per-unit scaling factors, the hard rank gate with its straight-through gradient, the ℓ1 + TV
regulariser, the rank rule, the final shrinking, exact resume and bad input.

There is no official code, so the oracles are written here from the formulas in the module docstrings of
``rankwise.adapters.ardlora`` and ``rankwise.allocation.ardlora``: a dense per-head ΔW built block by block,
a hand-written chain rule for ∂L/∂α, and the ℓ1 / TV sums over explicitly listed layer pairs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.allocation import ARDLoRAAllocator
from rankwise.core.layer import AdaptedLayer

R0, CAP, HEADS = 2, 4, 4
OPTIONS = {"r": R0, "r_max": CAP, "alpha": 6.0, "heads": {"q": HEADS}, "input_heads": {"o": HEADS},
           "targets": ["q", "o", "f"], "l1_weight": 0.01, "tv_weight": 0.02}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)  # 4 heads of 4 output rows
        self.o = nn.Linear(16, 16)  # 4 heads of 4 input columns
        self.f = nn.Linear(16, 16)  # one unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.o(torch.tanh(self.q(x)))) + torch.tanh(self.f(x))


class Net(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def base(depth: int = 3) -> Net:
    torch.manual_seed(0)
    return Net(depth)


def adapted(depth: int = 3, **overrides) -> nn.Module:
    model = base(depth)
    torch.manual_seed(1)
    return rankwise.adapt(model, rankwise.config("ardlora", **{**OPTIONS, **overrides}))


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer.adapter for name, layer in rankwise.adapted_layers(model)}


@torch.no_grad()
def randomise(model: nn.Module, scales: dict[str, list[float]] | None = None) -> None:
    """Non-zero A and B everywhere (gated-off components included) and the given α."""
    generator = torch.Generator().manual_seed(5)
    for name, adapter in adapters(model).items():
        adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=generator))
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator))
        if scales is not None and name in scales:
            adapter.ard_scale.copy_(torch.tensor(scales[name]))


def inputs(seed: int = 3) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Dense references
# ----------------------------------------------------------------------------------------------


def rank_rule(alpha: float) -> int:
    """r = clamp(⌊r₀ α + ½⌋, 1, c), written out."""
    value = int(torch.floor(torch.tensor(R0 * alpha, dtype=torch.float64) + 0.5))
    return min(CAP, max(1, value))


def reference_delta(adapter: nn.Module, gates: torch.Tensor) -> torch.Tensor:
    """ΔW assembled head by head: rows (q) or columns (o) of unit h are s · B_h diag(g_h) A_h."""
    s = OPTIONS["alpha"] / R0
    delta = torch.zeros(adapter.out_features, adapter.in_features, dtype=gates.dtype)
    for h in range(adapter.heads):
        block = s * adapter.lora_B[h].detach().to(gates.dtype) @ torch.diag(gates[h]) @ adapter.lora_A[h].detach().to(
            gates.dtype)
        if adapter.split_input:
            width = adapter.in_features // adapter.heads
            delta = delta.index_put((torch.arange(delta.shape[0])[:, None], torch.arange(h * width, (h + 1) * width)),
                                    block)
        else:
            height = adapter.out_features // adapter.heads
            delta = delta.index_put((torch.arange(h * height, (h + 1) * height)[:, None], torch.arange(delta.shape[1])),
                                    block)
    return delta


def hard_gates(ranks: list[int], capacity: int = CAP) -> torch.Tensor:
    return torch.tensor([[1.0 if i < r else 0.0 for i in range(capacity)] for r in ranks], dtype=torch.float64)


SCALES = {"blocks.0.q": [0.0, 0.3, 1.6, 1.9], "blocks.0.o": [0.5, 0.8, 1.2, 2.0], "blocks.0.f": [1.3]}


def test_forward_is_the_hard_gated_per_head_update():
    model = adapted(depth=1)
    randomise(model, SCALES)
    x = inputs().double()
    for name, adapter in adapters(model).items():
        ranks = [rank_rule(a) for a in SCALES[name]]
        layer = model.get_submodule(name).double()
        expected = layer.base_layer(x) + x @ reference_delta(adapter, hard_gates(ranks)).T
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(adapter.delta_weight(), reference_delta(adapter, hard_gates(ranks)), atol=1e-12,
                                   rtol=0)


def test_a_unit_at_alpha_one_is_peft_lora_at_rank_r0():
    """The spec's oracle: α = 1 gives rank r₀, and the layer equals PEFT 0.21.2's LoRA of rank r₀ and the same alpha
    holding the first r₀ components (the other r_max − r₀ are gated off, however large)."""
    peft = pytest.importorskip("peft")
    model = adapted(depth=1).double()
    randomise(model)
    ours = adapters(model)["blocks.0.f"]
    theirs = peft.get_peft_model(base(depth=1).double(), peft.LoraConfig(r=R0, lora_alpha=OPTIONS["alpha"],
                                                                         target_modules=["f"]))
    layer = theirs.base_model.model.blocks[0].f
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A[0, :R0])
        layer.lora_B["default"].weight.copy_(ours.lora_B[0, :, :R0])
    x = inputs().double()
    torch.testing.assert_close(model.blocks[0].f(x), layer(x), atol=1e-12, rtol=0)


def test_effective_ranks_follow_the_rule():
    """r = max(1, ⌊r₀α⌉) capped at c, rounding half up; rankwise.ranks sums a layer's units."""
    model = adapted(depth=1)
    alphas = [0.0, 0.2, 0.25, 0.74, 0.75, 1.24, 1.25, 3.0]  # r₀α = 0, .4, .5, 1.48, 1.5, 2.48, 2.5, 6
    assert [rank_rule(a) for a in alphas] == [1, 1, 1, 1, 2, 2, 3, 4]
    randomise(model, {"blocks.0.q": alphas[:4], "blocks.0.o": alphas[4:], "blocks.0.f": [0.75]})
    allocator = rankwise.allocator(model)
    assert allocator.unit_ranks() == {"blocks.0.q": [1, 1, 1, 1], "blocks.0.o": [2, 2, 3, 4], "blocks.0.f": [2]}
    assert rankwise.ranks(model) == {"blocks.0.q": 4, "blocks.0.o": 11, "blocks.0.f": 2}
    fresh = adapted(depth=1)  # α = 1 at init: every unit at rank r₀
    assert rankwise.allocator(fresh).unit_ranks()["blocks.0.q"] == [R0] * HEADS


# ----------------------------------------------------------------------------------------------
# Gradients through the rounding
# ----------------------------------------------------------------------------------------------


def test_gradients_reach_the_scaling_factors_by_the_straight_through_rule():
    """∂L/∂α_u = Σ_i ∂L/∂g_{u,i} · σ'((r₀α_u − i + ½)/τ) · r₀/τ, with ∂L/∂g from the dense reference."""
    tau = 0.7
    model = adapted(depth=1, temperature=tau).double()
    randomise(model, SCALES)
    x = inputs().double()
    for name, adapter in adapters(model).items():
        layer = model.get_submodule(name)
        adapter.zero_grad()
        layer(x).sin().sum().backward()
        ranks = [rank_rule(a) for a in SCALES[name]]
        gates = hard_gates(ranks).requires_grad_(True)
        (layer.base_layer(x) + x @ reference_delta(adapter, gates).T).sin().sum().backward()
        alpha = adapter.ard_scale.detach()[:, None]
        index = torch.arange(1, CAP + 1, dtype=torch.float64)
        soft = torch.sigmoid((R0 * alpha - index + 0.5) / tau)
        expected = (gates.grad * soft * (1 - soft) * R0 / tau).sum(dim=1)
        assert torch.isfinite(adapter.ard_scale.grad).all() and (adapter.ard_scale.grad != 0).all()
        torch.testing.assert_close(adapter.ard_scale.grad, expected, atol=1e-10, rtol=1e-8)


def test_gradients_reach_every_scaling_factor_in_a_training_step():
    model = adapted().train()
    randomise(model)
    loss = nn.functional.cross_entropy(model(inputs()), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    for name, adapter in adapters(model).items():
        assert adapter.ard_scale.grad is not None and (adapter.ard_scale.grad.abs() > 0).all(), name


# ----------------------------------------------------------------------------------------------
# The meta-objective's regulariser
# ----------------------------------------------------------------------------------------------


def test_regularizer_equals_the_dense_l1_and_tv_sums():
    """TV runs along depth per module type, by layer number (0, 2, 10: not the string order 0, 10, 2)."""
    model = base(depth=11)
    torch.manual_seed(1)
    config = rankwise.config("ardlora", **{**OPTIONS, "targets": r"blocks\.(0|2|10)\.(q|o|f)"})
    model = rankwise.adapt(model, config)
    generator = torch.Generator().manual_seed(7)
    alpha = {name: torch.rand(adapter.heads, generator=generator, dtype=torch.float64) * 2
             for name, adapter in adapters(model).items()}
    with torch.no_grad():
        for name, adapter in adapters(model).items():
            adapter.ard_scale.copy_(alpha[name])
    l1 = sum(float(a.sum()) for a in alpha.values())
    tv = 0.0
    for kind in ("q", "o", "f"):
        for upper, lower in ((0, 2), (2, 10)):
            tv += float((alpha[f"blocks.{lower}.{kind}"] - alpha[f"blocks.{upper}.{kind}"]).abs().sum())
    expected = OPTIONS["l1_weight"] * l1 + OPTIONS["tv_weight"] * tv
    term = rankwise.allocator(model).regularizer()
    assert abs(term.item() - expected) <= 1e-6 * expected
    assert OPTIONS["tv_weight"] * tv > 0.05 * expected  # the TV part is large enough to be seen
    term.backward()
    grad = adapters(model)["blocks.2.f"].ard_scale.grad
    sign = torch.sign(alpha["blocks.2.f"] - alpha["blocks.0.f"]) - torch.sign(alpha["blocks.10.f"] - alpha["blocks.2.f"])
    torch.testing.assert_close(grad.double(), OPTIONS["l1_weight"] + OPTIONS["tv_weight"] * sign, atol=1e-7, rtol=0)


def test_depth_pairs_need_the_same_module_type_and_head_count():
    from rankwise.allocation.ardlora import depth_neighbours

    names = ["m.1.q", "m.0.q", "m.0.k", "m.12.q", "m.2.q", "head", "x.3.y.1.q", "x.3.y.0.q"]
    assert sorted(depth_neighbours(names)) == sorted(
        [("m.0.q", "m.1.q"), ("m.1.q", "m.2.q"), ("m.2.q", "m.12.q"), ("x.3.y.0.q", "x.3.y.1.q")])
    model = adapted(depth=2, heads={"blocks.0.q": 4, "blocks.1.q": 2})
    assert ("blocks.0.q", "blocks.1.q") not in rankwise.allocator(model).pairs  # 4 heads vs 2: no TV term
    assert ("blocks.0.f", "blocks.1.f") in rankwise.allocator(model).pairs


def test_step_projects_the_scaling_factors_onto_their_range():
    model = adapted(depth=1)
    randomise(model, {"blocks.0.q": [-0.5, 0.5, 2.5, 9.0]})
    model(inputs()).sum().backward()
    rankwise.allocator(model).step(0)
    assert adapters(model)["blocks.0.q"].ard_scale.tolist() == [0.0, 0.5, 2.0, 2.0]  # [0, c / r₀]


def test_param_groups_give_the_scaling_factors_their_own_learning_rate():
    model = adapted(scale_lr=0.05)
    groups = rankwise.allocator(model).param_groups(1e-3, weight_decay=0.1)
    scales = {id(a.ard_scale) for a in adapters(model).values()}
    assert {id(p) for p in groups[1]["params"]} == scales and groups[1]["lr"] == 0.05
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert sum(len(g["params"]) for g in groups) == len(trainable)


# ----------------------------------------------------------------------------------------------
# Shrinking at the end
# ----------------------------------------------------------------------------------------------


def test_finalize_shrinks_and_keeps_the_function(tmp_path):
    model = adapted(depth=1).eval()
    randomise(model, SCALES)
    x = inputs()
    with torch.no_grad():
        before = model(x)
        ungated = {name: reference_delta(a, torch.ones(a.heads, CAP, dtype=torch.float64))
                   for name, a in adapters(model).items()}
    trainable = rankwise.trainable_parameters(model)
    allocator = rankwise.allocator(model)
    ranks = allocator.unit_ranks()
    assert allocator.finalize() == ranks
    assert rankwise.adapter_config(model).rank_pattern == ranks
    with torch.no_grad():
        after = model(x)
    # the pruned components are gated off in the forward, so the output moves by 0 up to float rounding ...
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    for name, adapter in adapters(model).items():
        kept = max(ranks[name])
        assert adapter.fixed and adapter.lora_A.shape[1] == kept and adapter.lora_B.shape[2] == kept
        for h, r in enumerate(ranks[name]):
            assert torch.count_nonzero(adapter.lora_B[h, :, r:]) == 0  # unused components are zero, not only gated
        # ... although they did hold weight: without the gate the update would differ a lot
        assert (ungated[name] - adapter.delta_weight().double()).abs().max() > 0.1
    assert rankwise.trainable_parameters(model) < trainable
    assert allocator.regularizer() is None and rankwise.allocator(model).ranks() == {k: sum(v) for k, v in ranks.items()}
    rankwise.save(model, tmp_path)
    restored = rankwise.load(base(depth=1), tmp_path).eval()
    assert rankwise.allocator(restored).unit_ranks() == ranks
    with torch.no_grad():
        torch.testing.assert_close(restored(x), after, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Training: the loop, exact resume, rankwise's own loop and the Trainer callback
# ----------------------------------------------------------------------------------------------

LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
STEPS = 12


def optimizer_of(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(rankwise.allocator(model).param_groups(1e-2), lr=1e-2)


def run(model: nn.Module, steps: range, optimizer: torch.optim.Optimizer) -> list[float]:
    allocator = rankwise.allocator(model)
    losses = []
    for step in steps:
        loss = nn.functional.cross_entropy(model(inputs(step)), LABELS) + allocator.regularizer()
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def trained_model(**overrides) -> nn.Module:
    return adapted(**{"scale_lr": 0.3, "l1_weight": 0.05, **overrides}).train()


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    straight = trained_model()
    start = rankwise.allocator(straight).unit_ranks()
    straight_losses = run(straight, range(STEPS), optimizer_of(straight))
    assert rankwise.allocator(straight).unit_ranks() != start  # the ranks did move during the run

    first = trained_model()
    optimizer = optimizer_of(first)
    losses = run(first, range(STEPS // 2), optimizer)
    rankwise.save(first, tmp_path)
    moments = copy.deepcopy(optimizer.state_dict())
    resumed = rankwise.load(base(), tmp_path).train()
    assert rankwise.allocator(resumed).last_step == STEPS // 2 - 1
    optimizer = optimizer_of(resumed)
    optimizer.load_state_dict(moments)
    losses += run(resumed, range(STEPS // 2, STEPS), optimizer)
    assert rankwise.ranks(resumed) == rankwise.ranks(straight)
    assert rankwise.allocator(resumed).allocations == rankwise.allocator(straight).allocations == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight_losses), atol=1e-6, rtol=0)
    want = dict(straight.named_parameters())
    for key, value in resumed.named_parameters():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_callback_finalizes_before_the_final_save(tmp_path):
    from test_trainer import logits, tiny_bert, train

    model = rankwise.adapt(tiny_bert(), rankwise.config("ardlora", r=2, targets=["query", "value"],
                                                        heads={"query": 2, "value": 2}))
    train(model, tmp_path, max_steps=2)
    assert all(adapter.fixed for adapter in adapters(model).values())
    saved = rankwise.load(tiny_bert(), tmp_path / "adapter")
    assert rankwise.ranks(saved) == rankwise.ranks(model)
    torch.testing.assert_close(logits(saved), logits(model), atol=1e-6, rtol=0)


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_resumes_exactly_from_a_checkpoint(tmp_path):
    from test_trainer import tiny_bert, train

    from rankwise.core.io import adapter_state

    def bert() -> nn.Module:
        model = tiny_bert()
        torch.manual_seed(1)
        return rankwise.adapt(model, rankwise.config("ardlora", r=2, targets=["query", "value"], l1_weight=0.5,
                                                     heads={"query": 2, "value": 2}))

    straight = bert()
    train(straight, tmp_path / "straight", max_steps=4)
    train(bert(), tmp_path / "split", max_steps=4, stop_at=2)
    resumed = bert()
    train(resumed, tmp_path / "split", max_steps=4, resume=str(tmp_path / "split" / "checkpoint-2"))
    assert rankwise.allocator(resumed).allocations == rankwise.allocator(straight).allocations == 4
    assert rankwise.adapter_config(resumed).rank_pattern == rankwise.adapter_config(straight).rank_pattern
    want = adapter_state(straight)
    assert set(adapter_state(resumed)) == set(want)
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0, msg=key)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_stepping_without_gradients_names_the_layers_and_changes_nothing():
    model = adapted(depth=1)
    randomise(model, {"blocks.0.q": [-1.0, 1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=r"step\(0\): no gradient on the scaling factors of \['blocks.0.f'"):
        rankwise.allocator(model).step(0)
    assert adapters(model)["blocks.0.q"].ard_scale[0].item() == -1.0  # not projected
    assert rankwise.allocator(model).last_step is None


def test_the_allocator_refuses_other_adapters():
    model = rankwise.adapt(base(depth=1), rankwise.LoRAConfig(r=2, targets=["q"]))
    with pytest.raises(ValueError, match="needs a model adapted with ARDLoRAConfig, got method 'lora'"):
        ARDLoRAAllocator(model, rankwise.adapter_config(model))


def test_a_foreign_allocator_state_is_refused():
    allocator = rankwise.allocator(adapted(depth=1))
    with pytest.raises(ValueError, match="expected only 'last_step'"):
        allocator.load_state_dict({"mask.blocks.0.q": torch.ones(2)}, {"last_step": 3})
    with pytest.raises(ValueError, match="last_step=-2"):
        allocator.load_state_dict({}, {"last_step": -2})


@pytest.mark.parametrize(("overrides", "words"), [
    ({"heads": {"q": 3}}, r"'blocks.0.q' \(out_features=16, in_features=16\): out_features=16 is not divisible by the 3"),
    ({"input_heads": {"o": 5}}, r"'blocks.0.o'.*in_features=16 is not divisible by the 5 heads"),
    ({"r_max": 5}, r"'blocks.0.q'.*r_max=5 exceeds min\(rows, cols\)=4 of a unit \(4x16, 4 head\(s\)\)"),
    ({"rank_pattern": {"blocks.0.q": [1, 2]}}, r"'blocks.0.q'.*rank_pattern gives 2 ranks for 4 units"),
])
def test_layers_that_do_not_fit_are_refused_before_anything_changes(overrides, words):
    model = base(depth=1)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        rankwise.adapt(model, rankwise.config("ardlora", **{**OPTIONS, **overrides}))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("overrides", "words"), [
    ({"r_max": 1}, "r_max \\(1\\) must be >= r \\(2\\)"),
    ({"heads": {"q": 2}, "input_heads": {"q": 2}}, r"\['q'\] are in both heads and input_heads"),
    ({"l1_weight": -1.0}, "l1_weight must be a finite number >= 0"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"rank_pattern": {"blocks.0.q": [0, 1, 1, 1]}}, r"rank_pattern\['blocks.0.q'\] must be a non-empty list"),
])
def test_bad_configs_name_the_field(overrides, words):
    with pytest.raises(ValueError, match=words):
        rankwise.config("ardlora", **{**OPTIONS, **overrides})


@pytest.mark.parametrize("field", ["heads", "input_heads", "rank_pattern"])
def test_tables_of_the_wrong_type_are_value_errors(field):
    """Found by the fuzzer: a string for a table raised AttributeError."""
    with pytest.raises(ValueError, match=f"{field} must be a dict"):
        rankwise.config("ardlora", **{field: "query"})
