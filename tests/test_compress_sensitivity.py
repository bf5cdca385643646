"""Sensitivity-based rank allocation (ASVD-style measured end-to-end distortion, Lagrangian budget split).

The oracle model has two parallel layers with *identical* weights whose outputs reach the model
output with gains 100 and 0.01: any spectrum-only rule must treat them alike, while the measured
sensitivity must spend the budget on the loud one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.compress import compress, compression_report
from rankwise.compress.calibration import input_grams
from rankwise.compress.ranks import RankOptions, allocate, exact_rank
from rankwise.compress.sensitivity import (
    _interpolate,
    distortion,
    first_tensor,
    model_outputs,
    sensitivity_gains,
    take_sequences,
)
from rankwise.compress.svd import regression_decomposition


class LoudAndQuiet(nn.Module):
    """``y = 100 · loud(x) + 0.01 · quiet(x)`` with ``loud`` and ``quiet`` holding the same weights."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud = nn.Linear(width, width)
        self.quiet = copy.deepcopy(self.loud)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * self.loud(x) + 0.01 * self.quiet(x)


def batches(rows: int = 256, width: int = 16) -> list[dict[str, torch.Tensor]]:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1))
    return [{"x": x[i:i + 64]} for i in range(0, rows, 64)]


def test_sensitivity_spends_the_budget_on_the_layer_the_output_depends_on():
    data = batches()
    reference = model_outputs(LoudAndQuiet(), data)
    model = compress(LoudAndQuiet(), ratio=0.5, method="whitened", calibration=data, allocation="sensitivity")
    ranks = {layer.name: layer.rank for layer in compression_report(model).layers}
    uniform = compress(LoudAndQuiet(), ratio=0.5, method="whitened", calibration=data)
    uniform_ranks = {layer.name: layer.rank for layer in compression_report(uniform).layers}
    assert uniform_ranks["loud"] == uniform_ranks["quiet"]
    assert ranks["quiet"] == 1 and ranks["loud"] == 7  # 7·32 + 1·32 = 256 = half of 2·16·16
    assert compression_report(model).params_after <= 0.5 * compression_report(model).params_before
    assert distortion(model, data, reference) < 0.8 * distortion(uniform, data, reference)


def exactly_rank_three(kind: str) -> LoudAndQuiet:
    """LoudAndQuiet whose loud layer has exact rank 3: 13 pruned rows, or a float32 product of rank-3 factors."""
    model = LoudAndQuiet()
    with torch.no_grad():
        if kind == "pruned":
            model.loud.weight[3:] = 0.0
        else:
            generator = torch.Generator().manual_seed(5)
            model.loud.weight.copy_(torch.randn(16, 3, generator=generator) @ torch.randn(3, 16, generator=generator))
    return model


@pytest.mark.parametrize("method", ["whitened", "svd"])
@pytest.mark.parametrize("kind", ["pruned", "product"])
def test_an_exactly_low_rank_loud_layer_keeps_its_rank(kind, method):
    """A 16 x 16 layer of exact rank 3 reaching the output x100: its tail at the probe rank 4 is zero, which
    must not make every rank look free (it used to get rank 1 and distortion 0.22 against 1.3e-8 uniform)."""
    data = batches()
    reference = model_outputs(exactly_rank_three(kind), data)
    model = compress(exactly_rank_three(kind), ratio=0.5, method=method, calibration=data, allocation="sensitivity")
    uniform = compress(exactly_rank_three(kind), ratio=0.5, method=method, calibration=data)
    ranks = {layer.name: layer.rank for layer in compression_report(model).layers}
    assert ranks == {"loud": 3, "quiet": 5}  # 3·32 + 5·32 = 256 = half of 2·16·16
    assert distortion(model, data, reference) < distortion(uniform, data, reference) < 1e-6


def test_exact_rank_ignores_rounding_noise_of_the_weight_dtype():
    product = exactly_rank_three("product").loud.weight.detach()
    spectrum = torch.linalg.svdvals(product.double())
    assert float(spectrum[3]) > 0  # the float32 product is full rank in float64 ...
    assert exact_rank(spectrum, 16, 16, torch.float32) == 3  # ... and rank 3 to float32 precision
    assert exact_rank(spectrum, 16, 16, torch.float64) == 16
    assert exact_rank(torch.zeros(4, dtype=torch.float64), 4, 4, torch.float32) == 0


class TwoBlocks(nn.Module):
    """``y = [a · first(x), b · second(x)]`` without biases: truncating ``first`` alone at rank r gives
    ``D = a² ‖X W1ᵀ‖² tail_1(r) / (a² ‖X W1ᵀ‖² + b² ‖X W2ᵀ‖²)`` (whitened tails are output errors)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first, self.second = nn.Linear(12, 10, bias=False), nn.Linear(12, 10, bias=False)
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a * self.first(x), self.b * self.second(x)], dim=-1)


def test_gain_is_the_output_distortion_per_unit_of_relative_tail():
    model = TwoBlocks(a=3.0, b=0.5).double()
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    data = [{"x": x[:100]}, {"x": x[100:]}]
    names = ["first", "second"]
    grams = input_grams(model, names, data)
    factors = {}
    for name in names:
        d = regression_decomposition(model.get_submodule(name).weight, grams[name], name)
        factors[name] = (d.left, d.right, d.spectrum)
    gains = sensitivity_gains(model, factors, dict.fromkeys(names, (10, 12)), data, fractions=(0.3, 0.8))
    energy = {n: float((x @ model.get_submodule(n).weight.detach().T).pow(2).sum()) for n in names}
    total = 9.0 * energy["first"] + 0.25 * energy["second"]
    torch.testing.assert_close(gains["first"], torch.full((10,), 9.0 * energy["first"] / total, dtype=torch.float64),
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(gains["second"], torch.full((10,), 0.25 * energy["second"] / total, dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_allocate_picks_the_cheapest_loss_within_the_budget():
    options = {
        "a": RankOptions([1, 2, None], torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64),
                         torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)),
        "b": RankOptions([1, 2, None], torch.tensor([0.5, 0.4, 0.0], dtype=torch.float64),
                         torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)),
    }
    # Brute force: within cost 50 the least loss is (a dense, b rank 1) = 0.5; within cost 30 it is
    # (a rank 2, b rank 1) = 1.5.
    assert allocate(options, 50.0) == {"a": None, "b": 1}
    assert allocate(options, 30.0) == {"a": 2, "b": 1}


def test_gain_interpolation_is_linear_between_points_and_flat_outside():
    values = _interpolate([(2, 1.0), (4, 3.0)], 6)
    assert values.tolist() == [1.0, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert _interpolate([(3, 5.0)], 4).tolist() == [5.0] * 4


def test_model_output_helpers():
    tensor = torch.ones(2, 3)
    assert first_tensor(tensor) is tensor
    assert first_tensor((None, tensor)) is tensor
    assert first_tensor({"loss": None, "logits": tensor}) is tensor
    with pytest.raises(ValueError, match="no tensor"):
        first_tensor((None, "text"))
    data = batches()
    model = LoudAndQuiet()
    assert distortion(model, data, model_outputs(model, data)) == 0.0
    taken = take_sequences(data, 100)
    assert [b["x"].shape[0] for b in taken] == [64, 36]
    assert torch.equal(taken[1]["x"], data[1]["x"][:36])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.5, "method": "svd", "allocation": "sensitivity"}, "calibration"),
        ({"energy": 0.9, "method": "whitened", "allocation": "sensitivity", "calibration": batches()}, "ratio"),
    ],
)
def test_sensitivity_allocation_needs_data_and_a_ratio(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress(LoudAndQuiet(), **kwargs)
