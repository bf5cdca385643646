"""LoRA-Pro (rankwise.optim): the equivalent gradient against a brute-force least-squares solve, one step
against a hand-written oracle (AdamW or full-mode Adam on the spec's formulas), exact resume, bad input,
and a toy regression that trains."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

import rankwise
from rankwise.optim import LoRAPro, adjusted_gradients, two_factor_pairs

F64 = torch.float64
DELTA = 1e-8


# ----------------------------------------------------------------------------------------------
# The equivalent gradient is the least-squares optimum; the Sylvester X is the closest pair
# ----------------------------------------------------------------------------------------------


def random_layer(m: int, n: int, r: int, zero_B: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=generator, dtype=F64)
    B = torch.zeros(m, r, dtype=F64) if zero_B else torch.randn(m, r, generator=generator, dtype=F64)
    return A, B, torch.randn(m, n, generator=generator, dtype=F64)


def lstsq(matrix: Tensor, target: Tensor) -> Tensor:
    return torch.linalg.lstsq(matrix, target[:, None], driver="gelsd").solution[:, 0]


@pytest.mark.parametrize("optimal_x", [True, False], ids=["efficient-sylvester", "full-x0"])
@pytest.mark.parametrize("zero_B", [False, True], ids=["B-random", "B-zero-step0"])
def test_equivalent_gradient_is_the_least_squares_optimum(optimal_x: bool, zero_B: bool) -> None:
    m, n, r, s = 7, 5, 2, 1.5
    A, B, G = random_layer(m, n, r, zero_B)
    # min over (u, v) of ‖s·(B·u + v·A) − G‖, row-major vec: vec(B·u) = (B ⊗ I_n) vec(u), vec(v·A) = (I_m ⊗ Aᵀ) vec(v)
    operator = s * torch.cat([torch.kron(B, torch.eye(n, dtype=F64)), torch.kron(torch.eye(m, dtype=F64), A.T.contiguous())], dim=1)
    best = (operator @ lstsq(operator, G.reshape(-1))).reshape(m, n)

    hat_A, hat_B = adjusted_gradients(A, B, s * B.T @ G, s * G @ A.T, s, optimal_x=optimal_x)
    ours = s * (B @ hat_A + hat_B @ A)
    torch.testing.assert_close(ours, best, rtol=0, atol=1e-6)
    assert (best - G).norm() < G.norm()  # the projection is not trivial


def test_sylvester_x_gives_the_pair_closest_to_the_raw_gradients() -> None:
    m, n, r, s = 7, 5, 3, 2.0
    A, B, G = random_layer(m, n, r, zero_B=False, seed=1)
    g_A, g_B = s * B.T @ G, s * G @ A.T
    base_A, base_B = adjusted_gradients(A, B, g_A, g_B, s, optimal_x=False)  # X = 0 (full mode's first pass)
    hat_A, hat_B = adjusted_gradients(A, B, g_A, g_B, s, optimal_x=True)
    # min over X of ‖base_A + X·A − g_A‖² + ‖base_B − B·X − g_B‖²: vec(X·A) = (I_r ⊗ Aᵀ) vec X, vec(B·X) = (B ⊗ I_r) vec X
    eye = torch.eye(r, dtype=F64)
    operator = torch.cat([torch.kron(eye, A.T.contiguous()), -torch.kron(B, eye)])
    X = lstsq(operator, torch.cat([(g_A - base_A).reshape(-1), (g_B - base_B).reshape(-1)])).reshape(r, r)
    torch.testing.assert_close(hat_A, base_A + X @ A, rtol=0, atol=1e-7)
    torch.testing.assert_close(hat_B, base_B - B @ X, rtol=0, atol=1e-7)

    def distance(a: Tensor, b: Tensor) -> float:
        return float((a - g_A).square().sum() + (b - g_B).square().sum())

    assert distance(hat_A, hat_B) < distance(base_A, base_B)
    assert (hat_A - base_A).norm() > 0.1 * base_A.norm()  # the two modes' pairs really differ
    torch.testing.assert_close(B @ hat_A + hat_B @ A, B @ base_A + base_B @ A)  # same equivalent gradient


# ----------------------------------------------------------------------------------------------
# A toy model and the hand-written oracle
# ----------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body1 = nn.Linear(6, 5)
        self.body2 = nn.Linear(5, 5)
        self.body3 = nn.Linear(5, 5)  # same shape as body2: the two are adjusted in one batch
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body3(torch.tanh(self.body2(torch.tanh(self.body1(x)))))))


def toy(config: rankwise.AdapterConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = Toy().to(F64)
    return model if config is None else rankwise.adapt(model, config)


def lora(method: str = "lora") -> rankwise.AdapterConfig:
    """r = 2, α = 3 on the hidden layers, the head trained in full; ``method`` is lora, rslora, pissa or dora
    (LoRA-Pro adjusts DoRA's direction only with ``directions=True``).

    PiSSA starts with B ≠ 0, so its first step is the general adjustment, not the B = 0 special case.
    """
    config_cls = rankwise.DoRAConfig if method == "dora" else rankwise.LoRAConfig
    return config_cls(r=2, alpha=3.0, use_rslora=method == "rslora", init_weights="pissa" if method == "pissa" else True,
                      targets=["body1", "body2", "body3"], modules_to_save=["head"])


def backward(model: nn.Module, step: int) -> float:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=generator, dtype=F64)
    y = torch.randn(16, 3, generator=generator, dtype=F64)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.item()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        backward(model, step)
        optimizer.step()
        optimizer.zero_grad()


def oracle_adjust(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, sylvester: bool) -> tuple[Tensor, Tensor]:
    """The spec's closed form with explicit m×m projections, pinv and scipy's Sylvester solver (δ-damped Grams)."""
    m, r = B.shape
    gram_A, gram_B = A @ A.T + DELTA * torch.eye(r, dtype=F64), B.T @ B + DELTA * torch.eye(r, dtype=F64)
    inv_A, inv_B = torch.linalg.pinv(gram_A), torch.linalg.pinv(gram_B)
    projector_B = B @ inv_B @ B.T
    X = torch.zeros(r, r, dtype=F64)
    if sylvester:
        rhs = -(1 / s**2) * inv_B @ g_A @ A.T
        X = torch.from_numpy(scipy.linalg.solve_sylvester(gram_B.numpy(), gram_A.numpy(), rhs.numpy()))
    hat_A = (1 / s**2) * inv_B @ g_A + X @ A
    hat_B = (1 / s**2) * (torch.eye(m, dtype=F64) - projector_B) @ g_B @ inv_A - B @ X
    return hat_A, hat_B


class OracleAdam:
    """Adam moments and bias correction written out: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², t from 1."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas, self.eps = betas, eps
        self.moments: dict[str, tuple[Tensor, Tensor]] = {}
        self.t: dict[str, int] = {}

    def direction(self, key: str, grad: Tensor) -> Tensor:
        beta1, beta2 = self.betas
        m, v = self.moments.get(key, (torch.zeros_like(grad), torch.zeros_like(grad)))
        m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad * grad
        self.moments[key], self.t[key] = (m, v), self.t.get(key, 0) + 1
        t = self.t[key]
        return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + self.eps)


def oracle_step(model: nn.Module, adam: OracleAdam, lr: float, decay: float, mode: str) -> dict[str, Tensor]:
    """Every trainable tensor after one step, from the spec's formulas, given the gradients in ``model``."""
    new: dict[str, Tensor] = {}
    paired: set[str] = set()
    for pair in two_factor_pairs(model, directions=True):
        A, B, s = pair.A.detach(), pair.B.detach(), pair.scaling
        if mode == "efficient":
            hat_A, hat_B = oracle_adjust(A, B, pair.A.grad, pair.B.grad, s, sylvester=True)
            new[pair.name + ".A"] = A * (1 - lr * decay) - lr * adam.direction(pair.name + ".A", hat_A)
            new[pair.name + ".B"] = B * (1 - lr * decay) - lr * adam.direction(pair.name + ".B", hat_B)
        else:
            hat_A, hat_B = oracle_adjust(A, B, pair.A.grad, pair.B.grad, s, sylvester=False)
            D = adam.direction(pair.name, s * (B @ hat_A + hat_B @ A))
            step_A, step_B = oracle_adjust(A, B, s * B.T @ D, s * D @ A.T, s, sylvester=True)
            new[pair.name + ".A"] = A * math.sqrt(1 - lr * decay) - lr * step_A
            new[pair.name + ".B"] = B * math.sqrt(1 - lr * decay) - lr * step_B
        paired |= {id(pair.A), id(pair.B)}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in paired:
            new[name] = p.detach() * (1 - lr * decay) - lr * adam.direction(name, p.grad)
    return new


def trainable(model: nn.Module) -> dict[str, Tensor]:
    values = {}
    for pair in two_factor_pairs(model, directions=True):
        values[pair.name + ".A"], values[pair.name + ".B"] = pair.A.detach().clone(), pair.B.detach().clone()
    paired = {id(t) for pair in two_factor_pairs(model, directions=True) for t in (pair.A, pair.B)}
    values.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and id(p) not in paired})
    return values


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("method", ["lora", "rslora", "pissa", "dora"])
def test_two_steps_match_the_hand_written_oracle(mode: str, method: str) -> None:
    model = toy(lora(method))
    lr, decay = 0.05, 0.1
    optimizer = LoRAPro(model, lr=lr, weight_decay=decay, mode=mode, directions=method == "dora")
    adam = OracleAdam()
    for step in range(2):
        backward(model, step)
        expected = oracle_step(model, adam, lr, decay, mode)
        optimizer.step()
        optimizer.zero_grad()
        got = trainable(model)
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-8, msg=f"{name} at step {step}")


def test_step_zero_is_a_full_adam_step() -> None:
    """At B = 0 the adjusted g_A is 0 and the first AdamW step moves every entry of B by lr (t = 1, not 0.74·lr)."""
    model = toy(lora())
    A_before = two_factor_pairs(model)[0].A.detach().clone()
    lr = 0.05
    optimizer = LoRAPro(model, lr=lr)
    backward(model, 0)
    optimizer.step()
    pair = two_factor_pairs(model)[0]
    torch.testing.assert_close(pair.A.detach(), A_before, rtol=0, atol=0)
    torch.testing.assert_close(pair.B.detach().abs(), torch.full_like(pair.B, lr), rtol=0, atol=1e-6)


def test_other_trainable_tensors_get_torch_adamw() -> None:
    model, reference = toy(lora()), toy(lora())
    optimizer = LoRAPro(model, lr=0.05, weight_decay=0.1)
    assert [g["name"] for g in optimizer.param_groups] == ["body1", "body2", "body3", "other trainable tensors"]
    torch_adamw = torch.optim.AdamW(reference.head.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(3):
        backward(model, step)
        backward(reference, step)
        optimizer.step()
        torch_adamw.step()
        for m in (optimizer, torch_adamw):
            m.zero_grad()
        with torch.no_grad():  # the factors follow LoRA-Pro in both models, so the heads see the same gradients
            for ours, theirs in zip(two_factor_pairs(model), two_factor_pairs(reference)):
                theirs.A.copy_(ours.A)
                theirs.B.copy_(ours.B)
    torch.testing.assert_close(model.head.weight, reference.head.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.head.bias, reference.head.bias, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_resume_is_exact(mode: str, method: str, tmp_path: Path) -> None:
    config, directions = lora(method), method == "dora"
    total, split = 6, 3
    straight = toy(config)
    train(straight, LoRAPro(straight, lr=0.05, weight_decay=0.1, mode=mode, directions=directions), range(total))

    first = toy(config)
    optimizer = LoRAPro(first, lr=0.05, weight_decay=0.1, mode=mode, directions=directions)
    train(first, optimizer, range(split))
    rankwise.save(first, tmp_path)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    del first, optimizer

    resumed = rankwise.load(toy(), tmp_path)
    optimizer = LoRAPro(resumed, lr=1.0, weight_decay=0.0, mode=mode, directions=directions)  # hyper-parameters: from the state
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer))
    train(resumed, optimizer, range(split, total))
    expected, got = trainable(straight), trainable(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


SUPPORTED = r"\['gora', 'lora'\] \(and \['bora', 'dora'\] with directions=True\)"


def test_model_without_two_factor_adapters_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"it has no adapted layer.*" + SUPPORTED):
        LoRAPro(toy())
    model = toy(rankwise.config("loldu", r=2, targets=["body1"]))
    with pytest.raises(ValueError, match=r"the adapted methods found are \['loldu'\].*body1.*" + SUPPORTED):
        LoRAPro(model)
    # AdaLoRA has rank components and factors() for its allocator, but B·(E ⊙ A) is no two-factor product
    model = toy(rankwise.config("adalora", init_r=2, target_r=1, total_step=10, targets=["body1"]))
    with pytest.raises(ValueError, match=r"the adapted methods found are \['adalora'\].*body1.*" + SUPPORTED):
        LoRAPro(model, directions=True)


@pytest.mark.parametrize("method", ["dora", "bora"])
def test_an_update_that_is_not_s_b_a_needs_directions(method: str) -> None:
    model = toy(rankwise.config(method, r=2, alpha=3.0, targets=["body1", "body2"]))
    with pytest.raises(ValueError, match=rf"layer 'body1' is adapted with '{method}', whose update is not ΔW = s·B·A"
                                         r".*directions=True.*\['gora', 'lora'\]"):
        LoRAPro(model)
    assert [group["name"] for group in LoRAPro(model, directions=True).param_groups[:2]] == ["body1", "body2"]


def test_every_declaration_says_whether_the_update_is_s_b_a() -> None:
    """For every method whose adapter declares two factors: ΔW = s·B·A exactly iff the declaration says so
    (B set to random values, so that the product is not zero)."""
    from rankwise.core.rank import TwoFactors

    declaring = [m.name for m in rankwise.core.registry.registered() if issubclass(m.adapter_cls, TwoFactors)]
    assert set(declaring) == {"lora", "dora", "bora", "gora"}
    for method in declaring:
        model = toy(rankwise.config(method, r=2, alpha=3.0, targets=["body1"]))
        adapter = model.body1.adapter
        product = adapter.factor_product()
        with torch.no_grad():
            product.B.copy_(torch.randn(product.B.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
        update = adapter.delta_weight()
        matches = torch.allclose(update, product.scaling * product.B @ product.A, rtol=0, atol=1e-12)
        assert matches == product.exact, method


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": -1.0}, "lr=-1.0"), ({"betas": (1.0, 0.9)}, "betas"), ({"eps": -1.0}, "eps"),
     ({"weight_decay": -0.1}, "weight_decay"), ({"mode": "fast"}, "mode='fast'"), ({"damping": 0.0}, "damping")],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAPro(toy(lora()), **kwargs)


def test_state_of_another_model_is_rejected() -> None:
    """body2 and body3 have the same shapes, so torch alone would load one's moments into the other."""
    saved = toy(rankwise.LoRAConfig(r=2, targets=["body1", "body3"]))
    optimizer = LoRAPro(saved)
    train(saved, optimizer, range(1))
    other = LoRAPro(toy(rankwise.LoRAConfig(r=2, targets=["body1", "body2"])))
    with pytest.raises(ValueError, match=r"saved for the parameter groups \['body1', 'body3'\], this optimizer has"):
        other.load_state_dict(optimizer.state_dict())


def test_frozen_adapters_are_rejected() -> None:
    model = toy(lora()).requires_grad_(False)
    with pytest.raises(ValueError, match="every two-factor adapter is frozen"):
        LoRAPro(model)


def test_rank_above_the_layer_size_is_rejected() -> None:
    model = toy(rankwise.LoRAConfig(r=6, allow_excess_rank=True, targets=["body2"]))
    with pytest.raises(ValueError, match=r"layer 'body2' \(A 6×5, B 5×6\): LoRA-Pro needs .* r <= min\(m, n\)"):
        LoRAPro(model)


def test_one_trainable_factor_is_rejected() -> None:
    model = toy(lora())
    two_factor_pairs(model)[1].B.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer 'body2' \(A 2×5, B 5×2\): only one factor is trainable"):
        LoRAPro(model)


def test_non_finite_gradient_raises_before_any_update() -> None:
    model = toy(lora())
    optimizer = LoRAPro(model, lr=0.05)
    backward(model, 0)
    optimizer.step()  # B ≠ 0 from here on
    backward(model, 1)
    two_factor_pairs(model)[2].A.grad[0, 0] = float("nan")  # body3, second in the batch it shares with body2
    before = trainable(model)
    with pytest.raises(ValueError, match="non-finite gradient in layer 'body3'"):
        optimizer.step()
    for name, value in trainable(model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_unused_layer_is_skipped_and_half_gradients_rejected() -> None:
    model = toy(lora())
    optimizer = LoRAPro(model, lr=0.05)
    pair = two_factor_pairs(model)[0]
    pair.A.grad = torch.zeros_like(pair.A)
    with pytest.raises(ValueError, match="layer 'body1' has a gradient for only one factor"):
        optimizer.step()
    pair.A.grad = None
    optimizer.step()  # no gradient anywhere: nothing moves, no state
    assert not optimizer.state


# ----------------------------------------------------------------------------------------------
# It trains
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_it_trains_a_toy_regression(mode: str) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8))
    target = nn.Linear(16, 8)
    with torch.no_grad():
        target.weight.copy_(base[0].weight + 0.5 * torch.randn(8, 2) @ torch.randn(2, 16))
        target.bias.copy_(base[0].bias)
    x = torch.randn(256, 16)
    y = target(x).detach()
    model = rankwise.adapt(base, rankwise.LoRAConfig(r=2, alpha=2.0, targets=["0"]))
    optimizer = LoRAPro(model, lr=0.02, mode=mode)
    losses = []
    for _ in range(150):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_lorapro_is_reachable_from_the_package() -> None:
    assert rankwise.LoRAPro is LoRAPro


def test_an_embedding_lora_steps_as_the_same_lora_on_a_one_hot_linear() -> None:
    """nn.Embedding(V, d) is the linear map x ↦ Eᵀx on one-hot tokens: LoRA-Pro must take the same step on both."""
    torch.manual_seed(0)
    vocab, dim, tokens = 12, 6, torch.tensor([[1, 3, 3, 7], [0, 11, 5, 2]])
    embedding = nn.Embedding(vocab, dim)
    linear = nn.Linear(vocab, dim, bias=False)
    linear.weight.data.copy_(embedding.weight.data.T)
    emb_model = rankwise.adapt(nn.Sequential(embedding), rankwise.LoRAConfig(r=2, alpha=4, targets=["0"]))
    lin_model = rankwise.adapt(nn.Sequential(linear), rankwise.LoRAConfig(r=2, alpha=4, targets=["0"]))
    emb, lin = emb_model[0].adapter, lin_model[0].adapter
    with torch.no_grad():  # the same nonzero factors in both layouts
        emb.lora_embedding_A.copy_(torch.randn(2, vocab))
        emb.lora_embedding_B.copy_(torch.randn(dim, 2))
        lin.lora_A.weight.copy_(emb.lora_embedding_A)
        lin.lora_B.weight.copy_(emb.lora_embedding_B)
    target = torch.randn(2, 4, dim)
    for model, inputs in ((emb_model, tokens), (lin_model, nn.functional.one_hot(tokens, vocab).float())):
        optimizer = LoRAPro(model, lr=1e-2)
        for _ in range(2):
            ((model(inputs) - target) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(emb.lora_embedding_A, lin.lora_A.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.lora_embedding_B, lin.lora_B.weight, atol=1e-5, rtol=1e-5)


def test_a_convolution_lora_is_refused_naming_the_layer() -> None:
    model = rankwise.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), rankwise.LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(ValueError, match="layer '0'.*convolution kernel"):
        LoRAPro(model, lr=1e-3)
