"""GoRA (rankwise.allocation.gora): rank split, the B₀ init against a dense reference, one-step descent,
untouched base, save / load / PEFT round trip, bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise
from rankwise.adapters.lora import LoRAAdapter
from rankwise.allocation.gora import allocate_ranks, compressed_b, initialize


class Net(nn.Module):
    """Three Linear layers of different shapes and one transformers Conv1D (weight stored in x out)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.mid = Conv1D(40, 48)
        self.down = nn.Linear(40, 24)
        self.out = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))))


TARGETS = ["up", "mid", "down", "out"]


def base() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(20, 16, generator=generator), torch.randn(20, 6, generator=generator)) for _ in range(n)]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def mean_loss(model: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model, b)) for b in data) / len(data)


def gora(**kwargs) -> nn.Module:
    options = {"r": 4, "r_min": 1, "r_max": 16, "targets": TARGETS, **kwargs}
    return rankwise.adapt(base(), rankwise.config("gora", **options))


def dense_gradients(data: list) -> dict[str, torch.Tensor]:
    """Ḡ from plain autograd on an unadapted copy: mean over batches of ∂L/∂W as (out, in) matrices."""
    model = base()
    total = sum(loss_fn(model, b) for b in data) / len(data)
    total.backward()
    return {"up": model.up.weight.grad, "mid": model.mid.weight.grad.T, "down": model.down.weight.grad,
            "out": model.out.weight.grad}


def weight_matrices() -> dict[str, torch.Tensor]:
    model = base()
    return {k: v.detach() for k, v in {"up": model.up.weight, "mid": model.mid.weight.T, "down": model.down.weight,
                                       "out": model.out.weight}.items()}


SHAPES = {"up": (48, 16), "mid": (40, 48), "down": (24, 40), "out": (6, 24)}


# ----------------------------------------------------------------------------------------------
# Rank split
# ----------------------------------------------------------------------------------------------


def reference_ranks(importance, shapes, r, r_min, r_max, budget_features):
    """The official code's get_allocated_rank, ported (features_func = sqrt or identity, 'moderate' rounding);
    the paper rounds the quotient instead of flooring it, which is the 'sqrt' branch."""
    feats = {k: math.sqrt(sum(s)) if budget_features == "sqrt" else sum(s) for k, s in shapes.items()}
    budget = sum(f * r for f in feats.values())
    total = sum(importance.values())
    ranks = {}
    for k, value in importance.items():
        share = budget * value / total
        raw = round(share / feats[k]) if budget_features == "sqrt" else int(round(share) // feats[k])
        ranks[k] = min(max(raw, r_min), r_max, *shapes[k])
    return ranks


def test_hand_computed_split():
    shapes = {"a": (32, 32), "b": (64, 64)}
    # sqrt: f = 8, 11.3137; b = 8 * 19.3137 = 154.51; shares 38.63 / 115.88 -> 4.83 -> 5, 10.24 -> 10
    assert allocate_ranks({"a": 1.0, "b": 3.0}, shapes, 8, 1, 64, "sqrt") == {"a": 5, "b": 10}
    # linear: f = 64, 128; b = 1536; shares 384 / 1152 -> 384 // 64 = 6, 1152 // 128 = 9 (LoRA-equal: 6·64 + 9·128)
    assert allocate_ranks({"a": 1.0, "b": 3.0}, shapes, 8, 1, 64, "linear") == {"a": 6, "b": 9}
    assert 6 * 64 + 9 * 128 == 8 * (64 + 128)
    # clamps: r_min, r_max, and min(out, in)
    assert allocate_ranks({"a": 1.0, "b": 99.0}, shapes, 8, 2, 12, "sqrt") == {"a": 2, "b": 12}
    assert allocate_ranks({"a": 99.0, "b": 1.0}, {"a": (3, 200), "b": (64, 64)}, 2, 1, 64, "linear") == {"a": 3, "b": 1}


@pytest.mark.parametrize("budget_features", ["sqrt", "linear"])
def test_ranks_split_the_budget_within_the_rounding_rules(budget_features):
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        count = int(torch.randint(2, 12, (1,), generator=generator))
        shapes = {f"l{i}": tuple(int(v) for v in torch.randint(64, 1024, (2,), generator=generator))
                  for i in range(count)}
        importance = {k: float(v) for k, v in zip(shapes, torch.rand(count, generator=generator) + 0.05)}
        r = int(torch.randint(1, 17, (1,), generator=generator))
        ranks = allocate_ranks(importance, shapes, r, 1, 10_000, budget_features)
        assert ranks == reference_ranks(importance, shapes, r, 1, 10_000, budget_features), trial
        feats = {k: math.sqrt(sum(s)) if budget_features == "sqrt" else sum(s) for k, s in shapes.items()}
        clamped = any(ranks[k] in (1, min(shapes[k])) for k in shapes)
        if clamped:
            continue
        used, budget = sum(ranks[k] * feats[k] for k in shapes), r * sum(feats.values())
        if budget_features == "sqrt":
            assert abs(used - budget) <= sum(feats.values()) / 2 + 1e-9
        else:  # the trainable-parameter count, LoRA-equal up to the floor
            assert budget - sum(feats.values()) - count / 2 < used <= budget + count / 2
            assert used == sum(ranks[k] * sum(shapes[k]) for k in shapes)


def test_split_follows_importance_on_a_model():
    model = gora()
    allocation = initialize(model, batches(), loss_fn)
    G, W = dense_gradients(batches()), weight_matrices()
    for name in SHAPES:
        assert allocation.importance[name] == pytest.approx(float((W[name] * G[name]).abs().mean()), rel=1e-5)
    assert allocation.ranks == reference_ranks(allocation.importance, SHAPES, 4, 1, 16, "sqrt")
    assert rankwise.ranks(model) == allocation.ranks
    assert len(set(allocation.ranks.values())) > 1  # the split is not uniform here
    assert rankwise.trainable_parameters(model) == sum(allocation.ranks[k] * sum(SHAPES[k]) for k in SHAPES)
    config = rankwise.adapter_config(model)  # the closed form (rankwise inspect) sees each layer's rank
    assert rankwise.trainable_parameters(model) == sum(
        LoRAAdapter.expected_num_params(*SHAPES[k], config.for_layer(k)) for k in SHAPES)


# ----------------------------------------------------------------------------------------------
# Init: a compressed step down the gradient
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [True, False], ids=["rslora", "lora-scale"])
def test_init_equals_the_low_rank_step_of_minus_gamma_g(rslora):
    """s·B₀A₀ = −γ√(n/r)·Ḡ·A⁺A (dense pinv reference), for every layer, Conv1D included."""
    gamma = 0.05
    model = gora(gamma=gamma, use_rslora=rslora, alpha=8.0)
    initialize(model, batches(), loss_fn)
    G = dense_gradients(batches())
    for name, layer in rankwise.adapted_layers(model):
        A = layer.adapter.lora_A.weight.double()
        r, n = A.shape
        assert layer.adapter.scaling == pytest.approx(8.0 / math.sqrt(r) if rslora else 8.0 / r)
        reference = -gamma * math.sqrt(n / r) * G[name].double() @ (torch.linalg.pinv(A) @ A)
        got = layer.adapter.delta_weight().detach().double()
        torch.testing.assert_close(got, reference, atol=1e-7, rtol=1e-5)
        # a descent direction: <Ḡ, ΔW> < 0
        assert float((G[name].double() * got).sum()) < 0


def test_update_norm_is_about_gamma_times_gradient_norm():
    """For a random A, ‖Ḡ P_A‖ ≈ √(r/n)‖Ḡ‖, so ‖ΔW₀‖ ≈ γ‖Ḡ‖ (the spec measured 1.04 at 256×512, r = 8)."""
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(256, 512, generator=generator)
    A = (torch.rand(8, 512, generator=generator) * 2 - 1) / math.sqrt(512)
    scaling = 16 / math.sqrt(8)
    delta = scaling * compressed_b(G, A, scaling, 0.05) @ A.double()
    assert float(delta.norm() / (0.05 * G.norm())) == pytest.approx(1.0, abs=0.1)


def test_one_step_of_the_initialised_adapter_lowers_the_loss():
    data = batches()
    model = gora()
    before = mean_loss(model, data)
    initialize(model, data, loss_fn)
    after = mean_loss(model, data)
    assert after < before
    # and the minus sign is what does it: the official code's sign regression (+γ) raises the loss
    for _, layer in rankwise.adapted_layers(model):
        with torch.no_grad():
            layer.adapter.lora_B.weight.neg_()
    assert mean_loss(model, data) > before


def test_gamma_zero_is_a_plain_start():
    model = gora(gamma=0.0)
    reference = base()
    initialize(model, batches(), loss_fn)
    x = batches()[0][0]
    torch.testing.assert_close(model(x), reference(x))


def _ddp_worker(rank: int, world: int, directory: Path) -> None:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         init_method=f"file://{directory / 'rendezvous'}")
    try:
        model = gora()
        initialize(model, batches(4)[2 * rank:2 * rank + 2], loss_fn)
        torch.save({n: l.adapter.state_dict() for n, l in rankwise.adapted_layers(model)}, directory / f"{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_take_the_same_ranks_and_init_as_one_on_all_batches(tmp_path):
    """Under DDP (gloo, 2 CPU processes, 2 different batches each) Ḡ is all-reduced: both processes get the
    ranks and B₀ of a single process that sees all 4 batches."""
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, tmp_path), nprocs=2, start_method="spawn")
    single = gora()
    initialize(single, batches(4), loss_fn)
    for rank in range(2):
        state = torch.load(tmp_path / f"{rank}.pt")
        for name, layer in rankwise.adapted_layers(single):
            for key, value in layer.adapter.state_dict().items():
                torch.testing.assert_close(state[name][key], value, atol=1e-6, rtol=1e-5, msg=f"{rank} {name} {key}")


# ----------------------------------------------------------------------------------------------
# Base untouched, flags restored
# ----------------------------------------------------------------------------------------------


def test_base_weights_flags_and_grads_untouched():
    model = gora(modules_to_save=None)
    model.up.base_layer.bias.requires_grad_(True)  # a user's own choice of trainable base parameter survives
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    initialize(model, batches(), loss_fn)
    after = dict(model.named_parameters())
    for name, flag in flags.items():
        if name in after:
            assert after[name].requires_grad == flag, name
    assert all(p.requires_grad for n, p in after.items() if "lora_" in n)
    assert all(p.grad is None for p in model.parameters())
    for key, value in base_state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.up.base_layer.weight.requires_grad is False


# ----------------------------------------------------------------------------------------------
# Save / load / PEFT
# ----------------------------------------------------------------------------------------------


def test_save_load_and_peft_round_trip(tmp_path):
    from peft import PeftModel

    model = gora().eval()
    initialize(model, batches(), loss_fn)
    with torch.no_grad():  # as after training
        for _, layer in rankwise.adapted_layers(model):
            layer.adapter.lora_A.weight.add_(0.01)
    x = batches()[0][0]
    expected = model(x)

    rankwise.save(model, tmp_path / "rw")
    loaded = rankwise.load(base(), tmp_path / "rw").eval()
    assert rankwise.adapter_config(loaded).method == "gora"
    assert rankwise.ranks(loaded) == rankwise.ranks(model)
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
    rankwise.allocator(loaded).step(0)  # loaded = initialised

    rankwise.export_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["use_rslora"] is True
    assert written["rank_pattern"] == {f"^{k}$": v for k, v in rankwise.ranks(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)
    imported = rankwise.import_peft(base(), tmp_path / "peft").eval()
    assert rankwise.adapter_config(imported).method == "lora"
    assert rankwise.ranks(imported) == rankwise.ranks(model)
    torch.testing.assert_close(imported(x), expected, atol=1e-6, rtol=1e-6)


def test_allocator_refuses_to_train_an_uninitialised_model():
    model = gora()
    with pytest.raises(ValueError, match="without its gradient init.*allocation.gora.initialize"):
        rankwise.allocator(model).step(0)
    assert rankwise.allocator(model).allocations == 0
    initialize(model, batches(), loss_fn)
    held = rankwise.allocator(model)
    held.step(0)
    assert held.allocations == 1 and held.ranks() == rankwise.ranks(model)
    assert held.state_dict() == ({}, {})


# ----------------------------------------------------------------------------------------------
# Bad input: a ValueError before anything changes
# ----------------------------------------------------------------------------------------------


def snapshot(model: nn.Module):
    return ({n: l.adapter for n, l in rankwise.adapted_layers(model)}, rankwise.adapter_config(model),
            {n: p.requires_grad for n, p in model.named_parameters()})


def unchanged(model: nn.Module, before) -> bool:
    adapters, config, flags = before
    return ({n: l.adapter for n, l in rankwise.adapted_layers(model)} == adapters
            and rankwise.adapter_config(model) is config
            and {n: p.requires_grad for n, p in model.named_parameters()} == flags
            and all(p.grad is None for p in model.parameters()))


@pytest.mark.parametrize(
    ("options", "data", "loss", "message"),
    [
        ({"r": 6, "r_max": 4}, None, None, r"budget of r=6 .* above what the layers allow.*lower r or raise r_max"),
        ({"r_min": 8}, None, None, r"r_min=8 exceeds min\(out, in\) of layer\(s\) \{'out': \(6, 24\)\}"),
        ({}, [], None, "no batches were given"),
        ({}, None, lambda m, b: torch.tensor(1.0), "does not depend on any target weight"),
        ({}, None, lambda m, b: nn.functional.mse_loss(m.up(b[0]), torch.zeros(20, 48)),
         r"layer\(s\) \['down', 'mid', 'out'\] received no gradient"),
        ({}, None, lambda m, b: 0 * m(b[0]).sum(), "every layer's importance is zero"),
        ({}, None, lambda m, b: m(b[0]), "must return a scalar tensor"),
    ],
    ids=["budget", "r_min", "no-batches", "no-graph", "unused-layers", "zero-gradients", "not-scalar"],
)
def test_bad_input_raises_before_any_change(options, data, loss, message):
    model = gora(**options)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        initialize(model, batches() if data is None else data, loss or loss_fn)
    assert unchanged(model, before)


def test_initialise_twice_or_another_method_raises():
    model = gora()
    initialize(model, batches(), loss_fn)
    with pytest.raises(ValueError, match="already initialised"):
        initialize(model, batches(), loss_fn)
    lora = rankwise.adapt(base(), rankwise.LoRAConfig(r=2, targets=TARGETS))
    with pytest.raises(ValueError, match="needs a model adapted with GoRAConfig, got method 'lora'"):
        initialize(lora, batches(), loss_fn)
    merged = rankwise.merge(gora())
    with pytest.raises(ValueError, match=r"merged; rankwise.unmerge"):
        initialize(merged, batches(), loss_fn)


@pytest.mark.parametrize("bad", [{"r_min": 0}, {"r_min": 5, "r_max": 4}, {"gamma": -0.1}, {"gamma": float("nan")},
                                 {"budget_features": "log"}, {"init_weights": "pissa"}, {"lora_bias": True},
                                 {"gradient_batches": 0}])
def test_bad_configs(bad):
    with pytest.raises(ValueError):
        rankwise.config("gora", **bad)
