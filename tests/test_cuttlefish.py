"""Cuttlefish: stable rank, switch rule on constructed trajectories, rank rule, switch, Frobenius decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise.compress.cuttlefish import Cuttlefish, CuttlefishConfig, is_stable
from rankwise.compress.factorized import FactorizedLinear
from rankwise.compress.lowrank_conv import FactorizedConv2d, factorize_layer, frobenius_decay, stable_rank


def test_stable_rank_is_frobenius_over_spectral_norm_squared() -> None:
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.linalg.matrix_norm(weight, "fro") ** 2 / torch.linalg.matrix_norm(weight, 2) ** 2
    assert stable_rank(weight) == pytest.approx(float(expected), rel=1e-10)
    # a rank-one matrix has stable rank 1; an orthogonal one has stable rank n
    assert stable_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0)
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)


def test_stable_rank_rejects_zero_and_nan() -> None:
    with pytest.raises(ValueError, match="all zero"):
        stable_rank(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        stable_rank(torch.tensor([[1.0, float("nan")]]))


def test_constant_trajectory_is_stable_exactly_from_epoch_w() -> None:
    history = [10.0] * 8
    assert not is_stable(history[:4], window=4, points=3, tolerance=0.1)  # epoch 3 < w
    assert is_stable(history[:5], window=4, points=3, tolerance=0.1)  # epoch 4 = w


def test_switch_fires_on_constructed_ramp_then_plateau_and_not_before() -> None:
    """h_t = t for t <= 4, then 4. w = 3 gives α = 1/2, so EMA_t = t − 1 + 2^-t on the ramp and
    EMA_4 = 3.0625; afterwards d_t = 4 − EMA_t halves each epoch: d_7 = 0.1171875, d_8 = 0.05859375.
    With q = 2 the last two numpy.gradient points are (EMA_T − EMA_{T−2})/2 = 1.5 d_T and
    EMA_T − EMA_{T−1} = d_T, mean 1.25 d_T: 0.146 at T = 7 (> τ = 0.1), 0.073 at T = 8 (≤ τ)."""
    history = [0.0, 1.0, 2.0, 3.0, 4.0] + [4.0] * 10
    fired = [t for t in range(len(history)) if is_stable(history[: t + 1], window=3, points=2, tolerance=0.1)]
    assert fired[0] == 8


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def test_default_layers_keep_first_and_classifier_dense() -> None:
    cf = Cuttlefish(_cnn(), CuttlefishConfig())
    assert list(cf.layers) == ["2", "5"]


def test_observe_switches_when_weights_stop_moving_and_not_before() -> None:
    model = _cnn()
    cf = Cuttlefish(model, CuttlefishConfig(window=3, points=2, tolerance=0.1, relaxation=()))
    decisions = [cf.observe() for _ in range(4)]  # the weights never change: srank is constant
    assert decisions == [False, False, False, True]
    assert cf.history["2"] == [math.floor(stable_rank(model[2].weight.detach().reshape(32, 72)))] * 4


def test_forced_switch_warns() -> None:
    model = _cnn()
    cf = Cuttlefish(model, CuttlefishConfig(window=50, max_warmup_points=2))
    assert cf.observe() is False
    with pytest.warns(UserWarning, match="forcing the switch"):
        assert cf.observe() is True


def test_scaled_ranks_and_switch_preserve_function() -> None:
    model = _cnn()
    cf = Cuttlefish(model, CuttlefishConfig())
    at_init = {"2": model[2].weight.detach().reshape(32, 72).clone(), "5": model[5].weight.detach().clone()}
    with torch.no_grad():  # training "found" rank-3 structure in the conv and rank-5 in fc1
        model[2].weight.copy_((torch.randn(32, 3) @ torch.randn(3, 72)).reshape(32, 8, 3, 3))
        model[5].weight.copy_(torch.randn(64, 5) @ torch.randn(5, 512))
    ranks = cf.ranks()
    for name, full in (("2", 32), ("5", 64)):
        matrix = model[int(name)].weight.detach().reshape(full, -1)
        xi = full / math.floor(stable_rank(at_init[name]))
        assert ranks[name] == min(full, math.ceil(xi * math.floor(stable_rank(matrix))))
    x = torch.randn(3, 1, 4, 4)
    reference = model(x)
    # full-rank factors would make these layers larger: the test forces exact ranks to check the function
    cf.ranks = lambda: {"2": 3, "5": 5}  # type: ignore[method-assign]
    report = cf.switch()
    assert report == {"2": {"rank": 3, "factorized": True}, "5": {"rank": 5, "factorized": True}}
    assert isinstance(model[2], FactorizedConv2d) and isinstance(model[5], FactorizedLinear)
    torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="already"):
        cf.switch()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 2))


def _set_srank(layer: nn.Linear, rank: int) -> None:
    """Make the weight [I_rank 0; 0 0]: its stable rank is exactly ``rank``."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:rank, :rank] = torch.eye(rank)


def _observe(cf: Cuttlefish, model: nn.Sequential, script: dict[int, list[int]]) -> list[bool]:
    """Set each layer's stable rank from ``script`` before every observation; return the decisions."""
    decisions = []
    for t in range(len(script[0])):
        for index, ranks in script.items():
            _set_srank(model[index], ranks[t])
        decisions.append(cf.observe())
    return decisions


def test_tolerance_is_relaxed_by_the_number_of_unstable_layers() -> None:
    """w = q = 2, α = 2/3. Layer 1: h = 10, 11, 11, ... gives EMA 10, 10.667, 10.889, 10.963 and mean |∇EMA|
    over the last two points 0.333 at the third point, 0.111 at the fourth, 0.037 at the fifth. At the third
    point two layers are unstable (τ·2.5 = 0.25: not yet); at the fourth only layer 1 is (τ·5 = 0.5: stable).
    Without relaxation (τ = 0.1) it waits for the fifth."""
    script = {0: [10] * 5, 1: [10] + [11] * 4}
    model = _mlp()
    relaxed = Cuttlefish(model, CuttlefishConfig(window=2, points=2, tolerance=0.1, dense_prefix=0))
    assert _observe(relaxed, model, script) == [False, False, False, True, True]
    model = _mlp()
    strict = Cuttlefish(model, CuttlefishConfig(window=2, points=2, tolerance=0.1, dense_prefix=0, relaxation=()))
    assert _observe(strict, model, script) == [False, False, False, False, True]


def test_stable_flags_are_sticky() -> None:
    """Layer 0 is stable at the third point and then jumps (its own criterion fails again); layer 1 settles at
    the fifth point (see above), and the switch fires because layer 0 stays stable."""
    model = _mlp()
    cf = Cuttlefish(model, CuttlefishConfig(window=2, points=2, tolerance=0.1, dense_prefix=0, relaxation=()))
    decisions = _observe(cf, model, {0: [10, 10, 10, 20, 20], 1: [10, 11, 11, 11, 11]})
    assert not is_stable(cf.history["0"], 2, 2, 0.1)
    assert decisions == [False, False, False, False, True]
    assert cf.stable == {"0": True, "1": True}


@pytest.mark.parametrize(("metric", "floor", "expected"), [("vanilla", 0.0, 5), ("vanilla", 0.5, 16), ("vanilla", 0.125, 5),
                                                           ("scaled", 0.0, None), ("scaled", 1.0, 32)])
def test_rank_metric_and_rank_floor(metric: str, floor: float, expected: int | None) -> None:
    model = _mlp()
    cf = Cuttlefish(model, CuttlefishConfig(rank_metric=metric, rank_floor=floor, dense_prefix=0))
    xi = 32 / math.floor(stable_rank(model[0].weight.detach()))
    assert xi > 1.5  # a random init is far from orthogonal, so the scaled rank differs from the vanilla one
    _set_srank(model[0], 5)
    assert cf.ranks()["0"] == (expected if expected is not None else math.ceil(xi * 5))


def test_layers_point_at_the_modules_in_the_model_after_the_switch() -> None:
    model = _cnn()
    cf = Cuttlefish(model, CuttlefishConfig())
    cf.ranks = lambda: {"2": 3, "5": 64}  # type: ignore[method-assign]
    cf.switch()
    assert cf.layers["2"] is model[2] and isinstance(model[2], FactorizedConv2d)
    assert cf.layers["5"] is model[5] and isinstance(model[5], nn.Linear)  # rank 64: kept dense
    del cf.ranks
    for call in (cf.observe, cf.ranks, cf.switch):
        with pytest.raises(ValueError, match="already factorised"):
            call()


def test_rank_at_or_above_break_even_stays_dense() -> None:
    model = _cnn()
    cf = Cuttlefish(model, CuttlefishConfig(rank_floor=1.0))  # floor = full rank: never worth it
    report = cf.switch()
    assert all(not entry["factorized"] for entry in report.values())
    assert isinstance(model[2], nn.Conv2d) and isinstance(model[5], nn.Linear)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_frobenius_decay_gradients(scheme: str) -> None:
    torch.manual_seed(0)
    pair = factorize_layer("c", nn.Conv2d(3, 5, 3), 2, scheme)
    linear = factorize_layer("l", nn.Linear(6, 4), 2)
    frobenius_decay([pair, linear], 0.3).backward()
    a, b = linear.down.weight.detach(), linear.up.weight.detach()
    torch.testing.assert_close(linear.down.weight.grad, 0.3 * b.T @ (b @ a))
    torch.testing.assert_close(linear.up.weight.grad, 0.3 * (b @ a) @ a.T)
    # for the conv pair: the penalty equals (λ/2)‖dense kernel‖² of the pair
    value = frobenius_decay([pair], 0.3)
    torch.testing.assert_close(value, 0.15 * pair.dense_weight().pow(2).sum())


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="no matching layers"):
        Cuttlefish(nn.Sequential(nn.ReLU()), CuttlefishConfig())
    with pytest.raises(ValueError, match="no matching layers"):  # only a classifier: nothing to factorise
        Cuttlefish(nn.Sequential(nn.Linear(4, 2)), CuttlefishConfig(dense_prefix=0))
    with pytest.raises(ValueError, match="rank_metric"):
        CuttlefishConfig(rank_metric="energy")
    with pytest.raises(ValueError, match="rank_floor"):
        CuttlefishConfig(rank_floor=1.5)
    with pytest.raises(ValueError, match="layer '2'.*all zero"):
        model = _cnn()
        nn.init.zeros_(model[2].weight)
        Cuttlefish(model, CuttlefishConfig())


def test_a_layer_with_a_rankwise_adapter_is_refused() -> None:
    """audit p2: as for compress and TRP, factorising an adapted layer would drop the adapter's update."""
    import rankwise

    adapted = rankwise.adapt(_mlp(), rankwise.LoRAConfig(r=2, targets=["1"]))
    with pytest.raises(ValueError, match=r"'1.*carry a rankwise adapter.*unload\(model, merge=True\)"):
        Cuttlefish(adapted, CuttlefishConfig(dense_prefix=0))
    model = _mlp()
    cf = Cuttlefish(model, CuttlefishConfig(dense_prefix=0))
    cf.ranks = lambda: {"0": 2, "1": 2}  # type: ignore[method-assign]
    rankwise.adapt(model, rankwise.LoRAConfig(r=2, targets=["1"]))
    with pytest.raises(ValueError, match=r"Cuttlefish.switch.*\['1'\].*carry a rankwise adapter"):
        cf.switch()
    assert type(model[0]) is nn.Linear and type(model[1]).__name__ == "AdaptedLayer" and not cf.switched
