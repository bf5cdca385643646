"""LoRAE (rankwise.models.lorae): penalty gradient = λ·U Vᵀ, the vanilla baseline has no penalty,
shapes, the GMM sampler and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.models import (
    LatentGMM,
    LoRAEConfig,
    LowRankAutoencoder,
    code_covariance,
    effective_rank,
    generate,
    linear_flops,
    mlp_autoencoder,
    nuclear_norm,
    numerical_rank,
    parameter_count,
    train_autoencoder,
)


def _svd_subgradient(matrix: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of the thin SVD, computed in numpy float64 (independent of torch's nuclear-norm backward)."""
    u, _, vt = np.linalg.svd(matrix.detach().double().numpy(), full_matrices=False)
    return torch.from_numpy(u @ vt)


def _model(lam: float, layers: int = 1, penalise: str = "first", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp_autoencoder(12, 10, LoRAEConfig(latent_dim=6, latent_layers=layers, lam=lam, penalise=penalise)).double()


def _grads(model: nn.Module, x: torch.Tensor, total: bool = True) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss, mse = model.loss(x)
    (loss if total else mse).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_nuclear_norm_is_sum_of_singular_values() -> None:
    matrix = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = np.linalg.svd(matrix.numpy(), compute_uv=False).sum()
    assert nuclear_norm(matrix).item() == pytest.approx(expected, rel=1e-12)
    assert nuclear_norm(matrix.half()).dtype == torch.float32  # half precision is widened for the SVD


@pytest.mark.parametrize("penalise", ["first", "each"])
def test_penalty_gradient_is_lambda_u_vt(penalise: str) -> None:
    lam = 0.3
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lorae, plain = _model(lam, penalise=penalise), _model(lam)
    with_penalty = _grads(lorae, x, total=True)
    without = _grads(plain, x, total=False)
    weight = lorae.latent.layers[0].weight
    expected = lam * _svd_subgradient(weight)
    torch.testing.assert_close(with_penalty["latent.layers.0.weight"] - without["latent.layers.0.weight"], expected,
                               rtol=1e-10, atol=1e-10)
    for name, grad in with_penalty.items():  # the penalty touches no other tensor
        if name != "latent.layers.0.weight":
            torch.testing.assert_close(grad, without[name], rtol=0, atol=0)


def test_product_penalty_gradient_through_two_layers() -> None:
    """‖M₂M₁‖_*: ∂/∂M₁ = M₂ᵀ U Vᵀ and ∂/∂M₂ = U Vᵀ M₁ᵀ, with U Vᵀ from the SVD of M₂M₁."""
    lam = 0.2
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = _model(lam, layers=2, penalise="product")
    total, plain = _grads(model, x, total=True), _grads(model, x, total=False)
    m1, m2 = model.latent.layers[0].weight.detach(), model.latent.layers[1].weight.detach()
    uvt = _svd_subgradient(m2 @ m1)
    torch.testing.assert_close(total["latent.layers.0.weight"] - plain["latent.layers.0.weight"], lam * m2.T @ uvt,
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(total["latent.layers.1.weight"] - plain["latent.layers.1.weight"], lam * uvt @ m1.T,
                               rtol=1e-9, atol=1e-10)


def test_each_penalty_gradient_per_layer() -> None:
    """Σ_k ‖M_k‖_*: each layer's gradient gains λ U_k V_kᵀ from its own SVD."""
    lam = 0.1
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = _model(lam, layers=2, penalise="each")
    total, plain = _grads(model, x, total=True), _grads(model, x, total=False)
    for k in range(2):
        name = f"latent.layers.{k}.weight"
        expected = lam * _svd_subgradient(model.latent.layers[k].weight)
        torch.testing.assert_close(total[name] - plain[name], expected, rtol=1e-10, atol=1e-10)


def test_first_penalty_ignores_later_layers() -> None:
    """The official code penalises only M₁: M₂'s gradient carries no penalty term."""
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = _model(0.5, layers=2, penalise="first")
    total, plain = _grads(model, x, total=True), _grads(model, x, total=False)
    torch.testing.assert_close(total["latent.layers.1.weight"], plain["latent.layers.1.weight"], rtol=0, atol=0)
    assert not torch.allclose(total["latent.layers.0.weight"], plain["latent.layers.0.weight"])


def test_vanilla_really_has_lambda_zero() -> None:
    config = LoRAEConfig(latent_dim=6, lam=1e-2, penalise="product")
    vanilla = config.vanilla()
    assert vanilla.lam == 0.0
    assert (vanilla.latent_dim, vanilla.latent_layers, vanilla.penalise) == (6, 1, "product")
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.manual_seed(0)
    model = mlp_autoencoder(12, 10, vanilla).double()
    loss, mse = model.loss(x)
    assert loss is mse  # no penalty term is even built
    reference = F.mse_loss(model(x), x)
    model.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=0, atol=0)


def test_same_budget_for_lorae_and_vanilla() -> None:
    config = LoRAEConfig(latent_dim=16, lam=1e-3)
    lorae, vanilla = mlp_autoencoder(64, 32, config), mlp_autoencoder(64, 32, config.vanilla())
    expected_params = (64 * 32 + 32) + (32 * 16 + 16) + 16 * 16 + (16 * 32 + 32) + (32 * 64 + 64)
    assert parameter_count(lorae) == parameter_count(vanilla) == expected_params
    expected_flops = 2 * (64 * 32 + 32 * 16 + 16 * 16 + 16 * 32 + 32 * 64) + (32 + 16 + 32 + 64)  # + biases
    assert linear_flops(lorae) == linear_flops(vanilla) == expected_flops


def test_shapes_encode_decode_and_plain_autoencoder() -> None:
    model = mlp_autoencoder(12, 10, LoRAEConfig(latent_dim=6))
    x = torch.rand(4, 12)
    codes = model.encode(x)
    assert codes.shape == (4, 6)
    torch.testing.assert_close(codes, model.latent.layers[0](model.encoder(x)))  # encode applies M
    assert model(x).shape == x.shape
    plain = mlp_autoencoder(12, 10, LoRAEConfig(latent_dim=6, latent_layers=0, lam=0.0))
    torch.testing.assert_close(plain.encode(x), plain.encoder(x))
    assert plain.loss(x)[0].shape == ()


def test_latent_matrix_follows_the_model_device_and_dtype() -> None:
    plain = mlp_autoencoder(12, 10, LoRAEConfig(latent_dim=6, latent_layers=0, lam=0.0))
    torch.testing.assert_close(plain.latent.matrix(), torch.eye(6), rtol=0, atol=0)
    assert plain.double().latent.matrix().dtype == torch.float64
    assert plain.to("meta").latent.matrix().device.type == "meta"
    assert "latent._anchor" not in plain.state_dict()  # nothing extra is saved
    two = _model(0.1, layers=2)  # float64
    m1, m2 = two.latent.layers[0].weight, two.latent.layers[1].weight
    torch.testing.assert_close(two.latent.matrix(), m2 @ m1, rtol=0, atol=0)


def test_gmm_sampler_and_generation() -> None:
    model = mlp_autoencoder(12, 10, LoRAEConfig(latent_dim=3))
    codes = model.encode(torch.rand(60, 12)).detach()
    sampler = LatentGMM(n_components=2, seed=0).fit(codes)
    samples = sampler.sample(7)
    assert samples.shape == (7, 3) and samples.dtype == torch.float32
    assert generate(model, sampler, 5).shape == (5, 12)
    other = LatentGMM(2).fit(torch.randn(20, 4))
    with pytest.raises(ValueError, match="4-dimensional codes"):
        generate(model, other, 3)


def test_rank_measures() -> None:
    diagonal = torch.diag(torch.tensor([3.0, 3.0, 0.0, 0.0]))
    assert effective_rank(diagonal) == pytest.approx(2.0)
    assert numerical_rank(diagonal) == 2
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    codes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    torch.testing.assert_close(code_covariance(codes), torch.diag(torch.tensor([2 / 3, 8 / 3])).double())


def test_penalty_lowers_latent_rank_in_training() -> None:
    """A strong penalty trains a lower-rank M than λ = 0 from the same start (digits, 40 epochs)."""
    from sklearn.datasets import load_digits

    data = torch.tensor(load_digits().data[:400] / 16.0, dtype=torch.float32)
    ranks = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention on a shared machine
    try:
        for lam in (0.0, 3e-3):
            torch.manual_seed(0)
            model = mlp_autoencoder(64, 32, LoRAEConfig(latent_dim=16, lam=lam))
            train_autoencoder(model, data, epochs=40, batch_size=100, lr=3e-3, seed=0)
            ranks[lam] = numerical_rank(model.latent.layers[0].weight, rtol=1e-2)
    finally:
        torch.set_num_threads(threads)
    assert ranks[3e-3] < ranks[0.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latent_dim": 0},
        {"latent_dim": 4.0},
        {"latent_dim": 4, "latent_layers": -1},
        {"latent_dim": 4, "lam": -1e-3},
        {"latent_dim": 4, "lam": float("nan")},
        {"latent_dim": 4, "lam": False},
        {"latent_dim": 4, "penalise": "last"},
        {"latent_dim": 4, "latent_layers": 0, "lam": 1e-3},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="LoRAEConfig"):
        LoRAEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"epochs": 1.5}, "epochs must be a positive integer"),
        ({"epochs": True}, "epochs must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"data": torch.full((32, 10), float("nan"))}, r"data rows \[0, 1, .*of 32 have NaN or inf"),
        ({"data": torch.rand(32, 10).index_fill(0, torch.tensor([5]), float("inf"))}, r"data rows \[5\] of 32"),
        ({"data": torch.rand(32, 7)}, r"cannot read data of shape \(32, 7\).*first Linear reads 10 features"),
        ({"data": torch.rand(32, 10, dtype=torch.float64)}, r"cannot read data .*float64.*parameters are torch.float32"),
        ({"data": torch.randint(0, 2, (32, 10))}, r"dtype torch.int64; pass floating-point data"),
    ],
)
def test_train_autoencoder_refuses_bad_input_and_leaves_the_model_unchanged(kwargs: dict, match: str) -> None:
    """audit 3: lr=inf and NaN data trained to non-finite parameters (the first behind a normal-looking history);
    float epochs / batch_size, wrong-width and integer data raised TypeError / RuntimeError from inside the loop."""
    torch.manual_seed(0)
    model = mlp_autoencoder(10, 8, LoRAEConfig(latent_dim=4))
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    data = kwargs.pop("data", torch.rand(32, 10))
    with pytest.raises(ValueError, match=f"train_autoencoder: .*{match}"):
        train_autoencoder(model, data, **{"epochs": 1, **kwargs})
    assert model.training
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_bad_inputs_raise() -> None:
    config = LoRAEConfig(latent_dim=6)
    wrong_encoder = LowRankAutoencoder(nn.Linear(12, 5), nn.Linear(6, 12), config)
    with pytest.raises(ValueError, match=r"maps input \(2, 12\) to \(2, 5\).*\(batch, 6\)"):
        wrong_encoder.encode(torch.rand(2, 12))
    wrong_decoder = LowRankAutoencoder(nn.Linear(12, 6), nn.Linear(6, 11), config)
    with pytest.raises(ValueError, match=r"returns \(2, 11\) for input \(2, 12\)"):
        wrong_decoder.loss(torch.rand(2, 12))
    model = mlp_autoencoder(12, 10, config)
    with pytest.raises(ValueError, match=r"codes must have shape \(batch, 6\)"):
        model.decode(torch.rand(3, 4))
    with pytest.raises(ValueError, match="expects a matrix"):
        nuclear_norm(torch.rand(3))
    with pytest.raises(ValueError, match="non-empty batch"):
        train_autoencoder(model, torch.rand(0, 12), epochs=1)
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        mlp_autoencoder(12, 0, config)
    with pytest.raises(ValueError, match="call fit"):
        LatentGMM().sample(3)
    with pytest.raises(ValueError, match="N >= n_components=4"):
        LatentGMM(4).fit(torch.rand(3, 6))
