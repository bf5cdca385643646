"""The seed statistics and the tie rule (rankwise.experiment.stats) on constructed numbers."""

from __future__ import annotations

import math

import pytest

from rankwise.experiment import stats


def test_mean_and_sample_std():
    assert stats.mean([1.0, 2.0, 6.0]) == 3.0
    assert stats.sample_std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0), abs=1e-15)  # (4 + 1 + 9) / 2
    assert stats.sample_std([0.5]) is None
    assert stats.sample_std([0.7, 0.7, 0.7]) == 0.0
    with pytest.raises(ValueError, match="no values"):
        stats.mean([])


def test_paired_differences_and_standard_error():
    x = {0: 0.80, 1: 0.82, 2: 0.90}
    y = {0: 0.79, 1: 0.80, 2: 0.87, 7: 0.1}  # seed 7 has no partner and is ignored
    result = stats.paired(x, y)
    assert result.seeds == (0, 1, 2)
    assert result.differences == pytest.approx((0.01, 0.02, 0.03), abs=1e-12)
    assert result.mean_difference == pytest.approx(0.02, abs=1e-12)
    assert result.standard_error == pytest.approx(0.01 / math.sqrt(3), abs=1e-12)  # sd(d) = 0.01
    assert result.tie is False  # 0.02 > 2 · 0.00577
    with pytest.raises(ValueError, match="no common seed"):
        stats.paired({0: 1.0}, {1: 1.0})


def test_tie_threshold_is_two_standard_errors():
    # d = (0, 2t): mean t, sd = √2·t, SE = t, so |mean| = SE: a tie exactly when the rule's factor exceeds 1.
    assert stats.paired({0: 0.5, 1: 0.7}, {0: 0.5, 1: 0.5}).tie is True  # |d̄| = 0.1 < 2·0.1
    # d = (0.10, 0.12, 0.14): d̄ = 0.12, SE = 0.02/√3 = 0.0115: not a tie.
    assert stats.paired({0: 0.6, 1: 0.62, 2: 0.64}, {0: 0.5, 1: 0.5, 2: 0.5}).tie is False
    # d = (0.1, -0.05, 0.1): d̄ = 0.05, sd = 0.0866, SE = 0.05: |d̄| = 1·SE < 2·SE, a tie.
    close = stats.paired({0: 0.6, 1: 0.45, 2: 0.6}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert close.standard_error == pytest.approx(0.05, abs=1e-12) and close.tie is True
    # Just above and below 2·SE: d = (a, a, a + h) with h chosen so that d̄ = 2·SE·(1 ± ε).
    for factor, expected in ((1.01, False), (0.99, True)):
        h = 0.03
        se = h * math.sqrt(1 / 3) / math.sqrt(3)  # sd of (0, 0, h) is h/√3
        a = 2 * se * factor - h / 3
        result = stats.paired({0: a, 1: a, 2: a + h}, {0: 0.0, 1: 0.0, 2: 0.0})
        assert result.mean_difference == pytest.approx(2 * se * factor, abs=1e-12)
        assert result.tie is expected


def test_identical_numbers_tie_and_a_constant_gap_does_not():
    same = {0: 0.8, 1: 0.75, 2: 0.9}
    assert stats.paired(same, dict(same)).tie is True
    shifted = {seed: value - 0.01 for seed, value in same.items()}
    result = stats.paired(same, shifted)
    assert result.standard_error == pytest.approx(0.0, abs=1e-15) or result.standard_error < 1e-15
    assert result.tie is False


def test_rank_marks_best_and_every_method_tied_with_it():
    scores = {
        "lora": {0: 0.80, 1: 0.82, 2: 0.84},
        "dora": {0: 0.81, 1: 0.80, 2: 0.84},     # d = (-0.01, 0.02, 0): d̄ = 0.0033, tie with lora
        "c3a": {0: 0.70, 1: 0.71, 2: 0.72},      # far below at every seed
        "miss": {0: 0.80, 1: 0.82, 2: 0.84},     # identical to lora: tie
        "failed": {},                              # every run failed: left out
    }
    ranking = stats.rank(scores)
    assert ranking.best == "lora"  # equal means with miss: the first by name... lora < miss
    assert ranking.marks == {"lora": "best", "dora": "tie", "miss": "tie", "c3a": ""}
    assert ranking.note is None
    assert ranking.summaries["c3a"].mean == pytest.approx(0.71, abs=1e-12)
    assert ranking.summaries["c3a"].std == pytest.approx(0.01, abs=1e-12)
    assert ranking.against_best["c3a"].mean_difference == pytest.approx(0.11, abs=1e-12)


def test_rank_lower_is_better_for_losses():
    ranking = stats.rank({"a": {0: 0.3, 1: 0.31}, "b": {0: 0.5, 1: 0.52}}, higher_is_better=False)
    assert ranking.best == "a" and ranking.marks == {"a": "best", "b": ""}


def test_one_seed_gives_no_tie_information_and_says_so():
    ranking = stats.rank({"lora": {0: 0.8}, "dora": {0: 0.79}})
    assert ranking.best == "lora" and ranking.marks == {"lora": "best", "dora": ""}
    assert ranking.against_best["dora"].tie is None and ranking.against_best["dora"].standard_error is None
    assert "no tie information" in ranking.note
    assert ranking.summaries["lora"].std is None
    with pytest.raises(ValueError, match="no method has a score"):
        stats.rank({"lora": {}})
