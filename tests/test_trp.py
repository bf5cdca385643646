"""Trained Rank Pruning: sub-gradient, exact conv reshapes, projection, factorisation, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rankwise.compress.factorized import FactorizedLinear
from rankwise.compress.lowrank_conv import FactorizedConv2d, energy_rank, factorize_layer, matricize, rank_cap
from rankwise.compress.trp import TRP, TRPConfig, nuclear_subgradient


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_subgradient_is_uv_of_kept_subspace() -> None:
    # M = U diag(σ) Vᵀ with σ² = 16, 9, 4, 1 (total 30): energy 25/30 keeps exactly k = 2 directions.
    u, v = orthonormal(7, 4, 0), orthonormal(5, 4, 1)
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    matrix = u @ torch.diag(sigma) @ v.T
    expected = u[:, :2] @ v[:, :2].T
    torch.testing.assert_close(nuclear_subgradient(matrix, energy=25 / 30), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(nuclear_subgradient(matrix, energy=0.9), u[:, :3] @ v[:, :3].T, atol=1e-10, rtol=0)


def test_subgradient_at_full_energy_equals_autograd_of_nuclear_norm() -> None:
    matrix = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    torch.linalg.svdvals(matrix).sum().backward()
    torch.testing.assert_close(nuclear_subgradient(matrix.detach(), energy=1.0), matrix.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (2, (2, 0), 1), (1, 0, (2, 1)), (2, 3, 2)])
def test_full_rank_reshape_reproduces_conv(scheme: str, stride, padding, dilation) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 5), stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 4, 13, 12, dtype=torch.float64)
    pair = factorize_layer("conv", conv, rank_cap(conv.weight.shape, scheme), scheme)
    assert isinstance(pair, FactorizedConv2d)
    reference = F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation)
    torch.testing.assert_close(pair(x), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.dense_weight(), conv.weight, atol=1e-10, rtol=0)


def test_spatial_matricisation_layout() -> None:
    # Jaderberg scheme 2: M[(c, h), (n, w)] = W[n, c, h, w]
    weight = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    matrix = matricize(weight, "spatial")
    assert matrix.shape == (3 * 4, 2 * 5)
    assert matrix[1 * 4 + 2, 1 * 5 + 3] == weight[1, 1, 2, 3]


def test_truncated_factorisation_is_best_rank_r_and_counts() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).double()
    pair = factorize_layer("conv", conv, 3, "channel")
    sigma = torch.linalg.svdvals(conv.weight.reshape(16, 72))
    residual = torch.linalg.matrix_norm(pair.dense_weight().reshape(16, 72) - conv.weight.reshape(16, 72))
    torch.testing.assert_close(residual, sigma[3:].pow(2).sum().sqrt(), atol=1e-10, rtol=0)
    assert sum(p.numel() for p in pair.parameters()) == 3 * (72 + 16) + 16


def test_projection_sets_energy_rank_and_nuclear_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    trp = TRP(model, TRPConfig(energy=0.6, period=2, nuclear_weight=0.5))
    assert list(trp.layers) == ["2"]  # the first conv is skipped, Linear layers are not targets by default
    weight = model[2].weight
    expected_rank = energy_rank(torch.linalg.svdvals(matricize(weight.detach())), 0.6)
    before = nuclear_subgradient(matricize(weight.detach()), 0.6)
    assert trp.before_forward(step=4)
    assert torch.linalg.matrix_rank(matricize(weight.detach()), atol=1e-5) == expected_rank < 8
    weight.grad = torch.zeros_like(weight)
    trp.before_optimizer_step()
    torch.testing.assert_close(matricize(weight.grad), 0.5 * before, atol=1e-5, rtol=0)
    # off-period steps neither project nor add the term
    assert not trp.before_forward(step=5)
    weight.grad.zero_()
    trp.before_optimizer_step()
    assert weight.grad.abs().max() == 0


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_projection_is_the_best_energy_rank_approximation_in_the_weight_precision(scheme: str, dtype, atol) -> None:
    """W <- unmat(U_k Σ_k V_kᵀ) (numpy float64 oracle), computed at least in the weight's own precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3)).to(dtype)
    weight = model[1].weight
    matrix = matricize(weight.detach().double(), scheme).numpy()
    u, sigma, vt = np.linalg.svd(matrix, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(sigma**2) / np.sum(sigma**2), 0.7)) + 1
    expected = torch.from_numpy((u[:, :k] * sigma[:k]) @ vt[:k])
    assert 1 < k < len(sigma)
    TRP(model, TRPConfig(energy=0.7, scheme=scheme)).before_forward(step=0)
    assert weight.dtype == dtype
    torch.testing.assert_close(matricize(weight.detach(), scheme).double(), expected, atol=atol, rtol=0)


def test_final_rank_follows_final_threshold_and_final_energy() -> None:
    sigma = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.04, 0.01], dtype=torch.float64)  # σ²: 9, 1, 0.25, 0.04, ...
    model = nn.Sequential(nn.Linear(6, 8).double(), nn.Linear(8, 2).double())
    with torch.no_grad():
        model[0].weight.copy_(orthonormal(8, 6, 3) @ torch.diag(sigma) @ orthonormal(6, 6, 4).T)
    expected = {0.3: 3, 0.05: 4, 0.0: 6, 0.9: 2, 10.0: 1}  # #{σ >= τ}, at least 1
    for threshold, rank in expected.items():
        assert TRP(model, TRPConfig(targets=["0"], final_threshold=threshold)).final_rank("0") == rank
    # energy 9 / 10.2917 = 0.8745, (9 + 1) / 10.2917 = 0.9717: e = 0.9 keeps 2, e = 0.98 keeps 3
    assert TRP(model, TRPConfig(targets=["0"], final_energy=0.9)).final_rank("0") == 2
    assert TRP(model, TRPConfig(targets=["0"], final_energy=0.98)).final_rank("0") == 3


def test_layers_point_at_the_modules_in_the_model_after_factorize() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(12, 2) @ torch.randn(2, 16))
    trp = TRP(model, TRPConfig(include_linear=True, final_threshold=1e-4))
    trp.factorize()
    assert trp.layers["2"] is model[2] and isinstance(model[2], FactorizedLinear)
    assert trp.layers["0"] is model[0] and isinstance(model[0], nn.Linear)  # kept dense
    for call in (lambda: trp.before_forward(0), trp.factorize, lambda: trp.final_rank("0")):
        with pytest.raises(ValueError, match="already replaced"):
            call()


def test_factorize_replaces_layers_and_keeps_function_when_low_rank() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():  # make layer 2 exactly rank 2, keep layer 0 full rank
        model[2].weight.copy_(torch.randn(12, 2) @ torch.randn(2, 16))
    x = torch.randn(5, 20)
    reference = model(x)
    trp = TRP(model, TRPConfig(include_linear=True, final_threshold=1e-4))
    report = trp.factorize()
    assert report == {"0": {"rank": 16, "factorized": False}, "2": {"rank": 2, "factorized": True}}
    assert isinstance(model[2], FactorizedLinear) and model[2].rank == 2
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors() -> None:
    for energy in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            TRPConfig(energy=energy)
    with pytest.raises(ValueError, match="period"):
        TRPConfig(period=0)
    with pytest.raises(ValueError, match="scheme"):
        TRPConfig(scheme="diagonal")
    with pytest.raises(ValueError, match=r"layer 'fc'.*rank 5 .*\[1, 4\]"):
        factorize_layer("fc", nn.Linear(4, 6), 5)
    with pytest.raises(ValueError, match=r"layer 'conv'.*rank 7 .*\[1, 6\]"):
        factorize_layer("conv", nn.Conv2d(2, 5, 3), 7, "spatial")  # (C·kH) × (N·kW) = 6 × 15
    with pytest.raises(ValueError, match="no matching layers"):
        TRP(nn.Sequential(nn.ReLU(), nn.Tanh()), TRPConfig())
    with pytest.raises(ValueError, match="groups=4"):
        TRP(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=4)), TRPConfig(targets=["1"]))
    with pytest.raises(ValueError, match="do not exist"):
        TRP(nn.Sequential(nn.Linear(3, 3)), TRPConfig(targets=["missing"]))


def test_a_layer_with_a_rankwise_adapter_is_refused() -> None:
    """audit p2: TRP's default rule would pick an adapted layer's base_layer and the adapter's own factors, and a
    layer adapted after TRP(...) would be replaced wrapper and all, dropping the adapter's update."""
    import rankwise

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    adapted = rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets=["0"]))
    for config in (TRPConfig(include_linear=True), TRPConfig(targets=["0"]), TRPConfig(targets=["0.base_layer"])):
        with pytest.raises(ValueError, match=r"'0.*carry a rankwise adapter.*unload\(model, merge=True\)"):
            TRP(adapted, config)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    trp = TRP(model, TRPConfig(include_linear=True, final_threshold=0.0))
    rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(ValueError, match=r"TRP.factorize.*\['0'\].*carry a rankwise adapter"):
        trp.factorize()
    assert type(model[0]).__name__ == "AdaptedLayer" and type(model[2]) is nn.Linear and not trp.factorized


def test_a_non_finite_weight_is_refused_before_any_layer_changes() -> None:
    """audit p5: factorize() replaced the earlier layers, then torch's LinAlgError on the NaN one left the model
    half factorised (and a second call crashed); before_forward likewise projected the earlier weights first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16))
        model[2].weight[3, 3] = float("nan")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trp = TRP(model, TRPConfig(include_linear=True, energy=0.5))
    for call in (trp.factorize, trp.factorize, lambda: trp.before_forward(0), lambda: trp.final_rank("2")):
        with pytest.raises(ValueError, match=r"layer '2' holds NaN or Inf"):
            call()
        assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear] and not trp.factorized
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], equal_nan=True, rtol=0, atol=0)
    with torch.no_grad():
        model[2].weight[3, 3] = 0.0
    assert trp.factorize()["0"] == {"rank": 2, "factorized": True}
