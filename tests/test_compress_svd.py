"""One-shot low-rank compression (LoRD / SVD, whitened SVD-LLM, sequential, global allocation).

Oracles are independent numpy computations of the formulas (Eckart–Young, SVD-LLM Theorem 3.2,
reduced-rank regression via least squares), never values copied from our own output.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
from torch import nn

import rankwise
from rankwise.compress import (
    FactorizedLinear,
    compress,
    compression_report,
    decompress,
    load_compressed,
    save_compressed,
)
from rankwise.compress.calibration import input_grams, paired_grams
from rankwise.compress.ranks import energy_rank, global_allocation
from rankwise.compress.svd import cholesky_factor, plain_decomposition, regression_decomposition


class Toy(nn.Module):
    """A model that takes a dict input like a transformers model: x -> Linear -> ReLU -> Linear."""

    def __init__(self, n_in: int = 32, hidden: int = 48, n_out: int = 24) -> None:
        super().__init__()
        self.first = nn.Linear(n_in, hidden)
        self.second = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def correlated_inputs(rows: int, n_in: int = 32, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly anisotropic covariance, the case activation-aware methods exist for."""
    mixing = torch.randn(n_in, n_in, generator=torch.Generator().manual_seed(123)) * torch.logspace(0, -2, n_in)[:, None]
    return torch.randn(rows, n_in, generator=torch.Generator().manual_seed(seed)) @ mixing + 0.3


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def calibration(rows: int = 512, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    x = correlated_inputs(rows, seed=seed)
    return [{"x": x[i:i + 128]} for i in range(0, rows, 128)]


# ----------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------


def test_full_rank_factorisation_equals_dense_layer():
    model = toy()
    reference = copy.deepcopy(model)
    compress(model, ranks={"first": 32, "second": 24}, force=True)
    assert isinstance(model.first, FactorizedLinear) and model.first.rank == 32
    x = torch.randn(16, 32)
    torch.testing.assert_close(model(x=x), reference(x=x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.first.bias, reference.first.bias)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_plain_svd_error_is_the_discarded_singular_values(rank):
    model = toy()
    weight = model.first.weight.detach().double().numpy()
    compress(model, ranks={"first": rank})
    approx = model.first.dense_weight().detach().double().numpy()
    sigma = np.linalg.svd(weight, compute_uv=False)
    error = np.linalg.norm(weight - approx, "fro") ** 2
    np.testing.assert_allclose(error, np.sum(sigma[rank:] ** 2), rtol=1e-4)
    assert np.linalg.matrix_rank(approx, tol=1e-5) == rank


def test_whitened_output_error_is_the_discarded_whitened_singular_values():
    """SVD-LLM Theorem 3.2: ‖XWᵀ - XŴᵀ‖_F² = Σ_{i>r} σ_i(W L)², L the Cholesky factor of XᵀX."""
    model = toy()
    batches = calibration()
    x = torch.cat([b["x"] for b in batches]).double().numpy()
    weight = model.first.weight.detach().double().numpy()
    compress(model, method="whitened", calibration=batches, ranks={"first": 6})
    approx = model.first.dense_weight().detach().double().numpy()
    sigma = np.linalg.svd(weight @ np.linalg.cholesky(x.T @ x), compute_uv=False)
    error = np.linalg.norm(x @ weight.T - x @ approx.T, "fro") ** 2
    np.testing.assert_allclose(error, np.sum(sigma[6:] ** 2), rtol=1e-3)


def test_whitened_beats_plain_svd_on_the_calibration_distribution():
    batches = calibration()
    held_out = correlated_inputs(256, seed=1)
    errors = {}
    for method in ("svd", "whitened"):
        model = toy()
        dense = copy.deepcopy(model.first)
        compress(model, method=method, calibration=batches if method == "whitened" else None, ranks={"first": 6})
        with torch.no_grad():
            errors[method] = float((model.first(held_out) - dense(held_out)).norm())
    assert errors["whitened"] < 0.7 * errors["svd"]


def test_reduced_rank_regression_matches_least_squares_oracle():
    """Sequential step: the rank-r Ŵ minimising ‖X_o Wᵀ - X_c Ŵᵀ‖_F, by OLS then projection (numpy)."""
    rng = np.random.default_rng(0)
    x_o = correlated_inputs(400).double().numpy()
    x_c = x_o + 0.1 * rng.standard_normal(x_o.shape)
    weight = rng.standard_normal((20, 32))
    rank = 5
    ols = np.linalg.lstsq(x_c, x_o @ weight.T, rcond=None)[0]  # (n, m)
    _, _, vt = np.linalg.svd(x_c @ ols, full_matrices=False)
    oracle = (ols @ vt[:rank].T @ vt[:rank]).T
    d = regression_decomposition(torch.from_numpy(weight), torch.from_numpy(x_c.T @ x_c), "layer", torch.from_numpy(x_c.T @ x_o))
    left, right = d.factors(rank)
    np.testing.assert_allclose((left @ right).numpy(), oracle, atol=1e-6, rtol=1e-6)


def test_sequential_final_output_error_is_not_above_parallel_whitening():
    """With the first layer compressed alike, the sequential second layer is the optimum of the very
    objective the parallel one is a feasible point of, so its error on the calibration set cannot be larger."""
    batches = calibration()
    x = torch.cat([b["x"] for b in batches])
    reference = toy()
    errors = {}
    for sequential in (False, True):
        model = compress(copy.deepcopy(reference), method="whitened", calibration=batches, ranks={"first": 8, "second": 4},
                         sequential=sequential)
        with torch.no_grad():
            errors[sequential] = float((model(x=x) - reference(x=x)).norm())
    assert errors[True] <= errors[False] * (1 + 1e-6)
    assert errors[True] < 0.99 * errors[False]


class Padded(nn.Module):
    """A sequence model over (batch, tokens, 32) inputs; the mask only tells calibration which tokens are real."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(32, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_calibration_drops_padding_tokens():
    x = correlated_inputs(3 * 7).reshape(3, 7, 32).double()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    x[mask == 0] = 1e3  # garbage at the padded positions
    batches = [{"x": x, "attention_mask": mask}]
    real = x[mask.bool()]  # (13, 32)
    model = Padded().double()
    grams = input_grams(model, ["first"], batches)
    torch.testing.assert_close(grams["first"], real.T @ real, rtol=1e-12, atol=0)
    gram, cross = paired_grams(model, "first", {}, batches)
    torch.testing.assert_close(gram, real.T @ real, rtol=1e-12, atol=0)
    torch.testing.assert_close(cross, real.T @ real, rtol=1e-12, atol=0)


def test_singular_gram_gets_the_smallest_jitter_that_factorises():
    """A dead input channel makes XᵀX singular (zero row and column): L Lᵀ = G + 1e-8 · mean(diag G) · I."""
    x = correlated_inputs(256).double()
    x[:, 5] = 0.0
    gram = x.T @ x
    assert int(torch.linalg.cholesky_ex(gram)[1]) != 0
    lower = cholesky_factor(gram, "layer")
    jitter = 1e-8 * float(gram.diagonal().mean())
    torch.testing.assert_close(lower @ lower.T, gram + jitter * torch.eye(32, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    model = toy()
    batches = [{"x": b["x"].index_fill(1, torch.tensor([5]), 0.0)} for b in calibration()]
    reference = copy.deepcopy(model)
    compress(model, method="whitened", calibration=batches, ranks={"first": 32}, force=True)
    inputs = torch.cat([b["x"] for b in batches])
    torch.testing.assert_close(model(x=inputs), reference(x=inputs), atol=1e-4, rtol=1e-4)


def test_singular_values_are_split_evenly_between_the_factors():
    """``left = Q Σ^½`` and ``right = Σ^½ Pᵀ L⁻¹``: leftᵀ left = Σ and right G rightᵀ = Σ (whitened; G = I for plain SVD)."""
    weight = toy().first.weight.detach().double()
    x = correlated_inputs(512).double()
    for gram, decomposition in ((torch.eye(32, dtype=torch.float64), plain_decomposition(weight)),
                                (x.T @ x, regression_decomposition(weight, x.T @ x, "first"))):
        sigma = torch.diag(decomposition.spectrum)
        torch.testing.assert_close(decomposition.left.T @ decomposition.left, sigma, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(decomposition.right @ gram @ decomposition.right.T, sigma, rtol=1e-9, atol=1e-9)
    model = compress(toy(), ranks={"first": 6})
    up = model.first.up.weight.detach().double()
    torch.testing.assert_close(up.T @ up, torch.diag(torch.linalg.svdvals(weight)[:6]), rtol=1e-5, atol=1e-5)


def test_conv1d_layer_is_factorised_with_its_transposed_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 32))
    reference = copy.deepcopy(model)
    compress(model, ranks={"0": 24}, force=True)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# rank choice
# ----------------------------------------------------------------------------------------------


def test_ratio_keeps_that_fraction_of_weights_and_skips_layers_past_break_even():
    model = compress(toy(), ratio=0.5)
    report = compression_report(model)
    assert [layer.rank for layer in report.layers] == [int(0.5 * 48 * 32 / 80), int(0.5 * 24 * 48 / 72)]
    assert report.params_after <= 0.5 * report.params_before
    square = compress(nn.Sequential(nn.Linear(16, 16)), ratio=1.0)
    (row,) = compression_report(square).layers
    assert row.rank is None and "break-even" in row.note and isinstance(square[0], nn.Linear)
    forced = compress(nn.Sequential(nn.Linear(16, 16)), ranks={"0": 8}, force=True)
    assert isinstance(forced[0], FactorizedLinear) and forced[0].rank == 8


@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_an_unreachable_ratio_is_refused_before_anything_changes(allocation):
    """audit 3: no layer goes below rank 1, so two 32 x 32 layers at ratio 0.01 kept 128 / 2048 = 0.0625 of their
    weights without a word, under every allocation. The ValueError names the floor Σ(m + n) / Σ m·n."""
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    data = [{"input": torch.randn(8, 32)}]
    with pytest.raises(ValueError, match=r"ratio=0\.05 cannot be met.*128 of their 2,048.*smallest ratio reachable is "
                                         r"0\.0625.*larger ratio, or fewer or larger targets"):
        compress(model, ratio=0.05, allocation=allocation, calibration=data)
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    report = compression_report(compress(model, ratio=0.0625, allocation=allocation, calibration=data))
    assert [layer.rank for layer in report.layers] == [1, 1] and report.params_after == 128


def test_a_uniform_plan_over_the_ratio_names_the_layers_rank_one_overfills():
    """Above the floor a uniform plan still overshoots when a small layer's share is below rank 1 (here the 2 x 64
    layer needs ratio >= 66 / 128); global allocation meets the same ratio."""
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(64, 2))

    uniform = model()
    with pytest.raises(ValueError, match=r"ratio=0\.2 cannot be met.*uniform plan keeps 258 of their 1,152.*"
                                         r"rank 1 already keeps more than 0\.2 of \['2'\].*ratio >= 0\.5156.*"
                                         r"allocation='global'"):
        compress(uniform, ratio=0.2)
    assert type(uniform[0]) is nn.Linear and type(uniform[2]) is nn.Linear
    report = compression_report(compress(model(), ratio=0.2, allocation="global"))
    assert report.params_after <= 0.2 * report.params_before


def test_energy_rank_is_the_smallest_rank_reaching_the_threshold():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert energy_rank(sigma, 16 / 22) == 1
    assert energy_rank(sigma, 0.8) == 2
    assert energy_rank(sigma, 21 / 22) == 3
    assert energy_rank(sigma, 1.0) == 4


def test_global_allocation_gives_an_exactly_low_rank_layer_its_rank_and_respects_the_budget():
    torch.manual_seed(0)
    low = torch.randn(64, 3) @ torch.randn(3, 64)
    full = torch.randn(64, 64)
    spectra = {name: (torch.linalg.svdvals(w), 64, 64) for name, w in (("low", low), ("full", full))}
    ranks = global_allocation(spectra, ratio=0.3)
    assert ranks["low"] == 3
    assert 14 <= ranks["full"] <= 16
    assert (ranks["low"] + ranks["full"]) * 128 <= 0.3 * 2 * 64 * 64


# ----------------------------------------------------------------------------------------------
# save / load / decompress
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_decompress(tmp_path):
    model = compress(toy(), method="whitened", calibration=calibration(), ratio=0.5)
    with torch.no_grad():
        model.second.up.bias.add_(0.25)  # a change after compression must come back too
    save_compressed(model, tmp_path / "out")
    loaded = load_compressed(toy(seed=3), tmp_path / "out")
    assert loaded.first.rank == model.first.rank and loaded.second.rank == model.second.rank
    x = correlated_inputs(8, seed=2)
    torch.testing.assert_close(loaded(x=x), model(x=x))
    expected = model(x=x)
    plain = decompress(loaded)
    assert type(plain.first) is nn.Linear and type(plain.second) is nn.Linear
    torch.testing.assert_close(plain(x=x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="first"):
        load_compressed(Toy(n_in=16), tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.2}, "ratio"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.01}, "energy"),
        ({"ranks": {"first": 33}}, "first.*min"),
        ({"ranks": {"first": 0}}, "positive"),
        ({"ranks": {"nothing": 3}}, "nothing"),
        ({"ratio": 0.5, "energy": 0.9}, "only one"),
        ({"method": "asvd"}, "method"),
        ({"method": "whitened"}, "calibration"),
        ({"sequential": True}, "sequential"),
        ({"targets": ["missing"]}, "match no"),
    ],
)
def test_bad_inputs_raise_a_clear_value_error(kwargs, match):
    model = toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        compress(model, **kwargs)
    assert type(model.first) is nn.Linear
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


class WithUnused(Toy):
    """Toy with a Linear layer its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(32, 32)


@pytest.mark.parametrize("targets", ["all-linear", ["unused"]])
def test_whitening_refuses_a_targeted_layer_that_never_runs(targets):
    """audit p1: a target with no calibration input raised a KeyError when other layers ran, and fell back to
    plain SVD (the report still saying "whitened") when none did."""
    torch.manual_seed(0)
    model = WithUnused()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for sequential in (False, True):
        with pytest.raises(ValueError, match=r"\['unused'\].*never ran on the 4 calibration batch.*exclude them"):
            compress(model, ratio=0.5, method="whitened", calibration=calibration(), targets=targets,
                     sequential=sequential)
        assert all(type(m) is nn.Linear for m in (model.first, model.second, model.unused))
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    compress(model, ratio=0.5, method="whitened", calibration=calibration(), exclude=["unused"])
    assert isinstance(model.first, FactorizedLinear) and type(model.unused) is nn.Linear


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_sensitivity_allocation_refuses_a_targeted_layer_that_never_runs(method):
    """audit 3: with method="svd" the sensitivity probe of a layer the model never calls measured distortion 0,
    so every rank looked free and the layer was cut to rank 1 silently (whitening already refused it)."""
    torch.manual_seed(0)
    model = WithUnused()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    data = "64 calibration sequence.*sensitivity_sequences" if method == "svd" else "4 calibration batch"
    where = "sensitivity allocation" if method == "svd" else "whitened compression"
    with pytest.raises(ValueError, match=rf"{where}: .*\['unused'\].*never ran on the {data}.*exclude them"):
        compress(model, ratio=0.5, method=method, calibration=calibration(), allocation="sensitivity")
    assert all(type(m) is nn.Linear for m in (model.first, model.second, model.unused))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    compress(model, ratio=0.5, method=method, calibration=calibration(), allocation="sensitivity", exclude=["unused"])
    assert isinstance(model.first, FactorizedLinear) and type(model.unused) is nn.Linear


def test_compressing_twice_is_refused():
    model = compress(toy(), ratio=0.5)
    with pytest.raises(ValueError, match="already factorised"):
        compress(model, ratio=0.5)


def test_an_adapted_layer_is_refused_before_anything_changes():
    """audit p2: targeting sees an adapted layer as its base layer, so compress replaced wrapper and adapter by a
    factorisation of the base weight alone: the adapter's update was lost and the model still listed it."""
    model = rankwise.adapt(toy(), rankwise.LoRAConfig(r=4, targets=["first"]))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for targets in ("all-linear", ["first"]):
        with pytest.raises(ValueError, match=r"\['first'\].*carry a rankwise adapter.*unload\(model, merge=True\)"):
            compress(model, ranks={"first": 32}, targets=targets, force=True)
    assert type(model.first).__name__ == "AdaptedLayer" and type(model.second) is nn.Linear
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    # the fix the message names: merge, then compress (at full rank the function is kept)
    with torch.no_grad():
        model.first.adapter.lora_B.weight.normal_()
    x = correlated_inputs(8)
    adapted = model(x)
    compress(rankwise.unload(model, merge=True), ranks={"first": 32, "second": 24}, force=True)
    torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)


def test_the_package_is_callable_as_rankwise_compress():
    model = rankwise.compress(toy(), ratio=0.5)
    assert isinstance(model.first, FactorizedLinear)
    assert isinstance(rankwise.compress(toy(), ratio=0.5).second, FactorizedLinear)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def test_cli_parser_defaults_and_validation():
    from rankwise.cli import compress as cli

    parser = argparse.ArgumentParser(prog="rankwise")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compress", "--ratio", "0.7", "--method", "whitened"])
    assert args.ratio == 0.7 and args.method == "whitened" and args.func is cli.run
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--method", "nope"])


def test_rankwise_compress_runs_end_to_end_from_the_main_cli(tmp_path, capsys, one_thread):
    from rankwise.cli import main

    status = main(["compress", "--ratio", "0.8", "--targets", "intermediate.dense", "--calibration", "16", "--held-out", "24", "--probe-train", "48",
                   "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert status == 0
    assert "whitened sensitivity" in printed and "fidelity" in printed and "linear-probe accuracy" in printed
    assert (tmp_path / "out" / "compress_config.json").is_file()


def test_rankwise_compress_then_adapt_saves_the_trained_adapter_beside_the_compressed_model(
        tmp_path, capsys, one_thread, monkeypatch):
    """``--output DIR --then-adapt lora``: DIR holds the compressed model before adaptation and DIR/adapter the
    trained adapter, and ``rankwise.load(load_compressed(base, DIR), DIR/adapter)`` computes exactly what the
    trained model computed (the adaptation used to be lost: only the compressed model was saved)."""
    from rankwise.cli import main
    from rankwise.compress.evaluate import load_minilm
    from rankwise.experiment import compression

    trained = []
    train = compression.adapt_and_train

    def keep(*args, **kwargs):
        trained.append(train(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(compression, "adapt_and_train", keep)
    out = tmp_path / "out"
    status = main(["compress", "--method", "svd", "--allocation", "uniform", "--ratio", "0.8", "--targets",
                   "intermediate.dense", "--calibration", "16", "--held-out", "24", "--probe-train", "48",
                   "--output", str(out), "--then-adapt", "lora", "--adapt-steps", "2"])
    assert status == 0 and f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    base, tokenizer = load_minilm()
    batch = tokenizer(["a short test sentence", "another one here"], return_tensors="pt", padding=True)
    compressed = load_compressed(copy.deepcopy(base), out)
    with torch.no_grad():
        before = compressed(**batch).last_hidden_state
        reloaded = rankwise.load(compressed, out / "adapter").eval()
        want, got = trained[0](**batch).last_hidden_state, reloaded(**batch).last_hidden_state
    assert not torch.equal(want, before)  # the adapter was trained: it changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=0)
