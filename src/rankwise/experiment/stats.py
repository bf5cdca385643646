"""Seeds: mean ± sample standard deviation per method, and the tie rule on paired per-seed differences.

Two methods run with the same seeds (same split, head initialisation and batch order per seed) are
compared seed by seed. With d_s = x_s − y_s the per-seed differences of methods x and y over n common
seeds::

    d̄ = (1/n) Σ_s d_s,      SE = sd(d) / √n,      sd(d) = √( Σ_s (d_s − d̄)² / (n − 1) )

and the difference is a **tie** when |d̄| < 2·SE (about a 95% interval of the paired difference
containing 0 for a normal d; a rule of thumb, not a significance test with few seeds). Identical
numbers (every d_s = 0) are a tie; a difference that is the same non-zero amount at every seed (SE = 0)
is not. The best method is the one with the highest mean (lowest with ``higher_is_better=False``), and
every method tied with it is marked as well. With fewer than two common seeds there is no standard
error and no tie information: :class:`Ranking` says so in ``note`` and marks the best method only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: ``|mean difference| < TIE_SE · SE`` is a tie.
TIE_SE = 2.0


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean of a non-empty sequence (exactly the value when all values are equal)."""
    if not values:
        raise ValueError("mean of no values: every run of this method failed or none was given")
    if all(v == values[0] for v in values):
        return values[0]
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n − 1 in the denominator; 0 for equal values); None for fewer than two."""
    if len(values) < 2:
        return None
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Paired:
    """Method x against method y over their common seeds: d̄, SE (None with one seed) and the tie verdict
    (None when there is no standard error)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean_difference: float
    standard_error: float | None
    tie: bool | None


def paired(x: Mapping[int, float], y: Mapping[int, float]) -> Paired:
    """Paired per-seed comparison of ``x`` and ``y`` (``{seed: score}``) over the seeds both have."""
    seeds = tuple(sorted(set(x) & set(y)))
    if not seeds:
        raise ValueError(f"no common seed to pair: {sorted(x)} and {sorted(y)}")
    differences = tuple(x[s] - y[s] for s in seeds)
    centre = mean(differences)
    spread = sample_std(differences)
    if spread is None:
        return Paired(seeds, differences, centre, None, None)
    error = spread / math.sqrt(len(seeds))
    tie = all(d == 0 for d in differences) or abs(centre) < TIE_SE * error
    return Paired(seeds, differences, centre, error, tie)


@dataclass(frozen=True)
class Summary:
    """One method's scores over its seeds."""

    seeds: tuple[int, ...]
    mean: float
    std: float | None


def summarize(scores: Mapping[int, float]) -> Summary:
    """Mean and sample standard deviation of ``{seed: score}``."""
    values = [scores[s] for s in sorted(scores)]
    return Summary(tuple(sorted(scores)), mean(values), sample_std(values))


@dataclass
class Ranking:
    """The best method and the methods tied with it.

    ``marks`` maps each method to ``"best"``, ``"tie"`` (tied with the best) or ``""``; ``against_best``
    holds each other method's paired comparison with the best (best − method); ``note`` says when the
    seeds give no tie information.
    """

    best: str
    summaries: dict[str, Summary]
    marks: dict[str, str]
    against_best: dict[str, Paired] = field(default_factory=dict)
    note: str | None = None


def rank(scores: Mapping[str, Mapping[int, float]], higher_is_better: bool = True) -> Ranking:
    """Mark the best method by mean score and every method tied with it (module docstring).

    Args:
        scores: ``{method: {seed: score}}``; a method with no scores (every run failed) is left out.
        higher_is_better: accuracy and F1 (True) or a loss (False).
    """
    summaries = {name: summarize(values) for name, values in scores.items() if values}
    if not summaries:
        raise ValueError("rank: no method has a score")
    sign = 1.0 if higher_is_better else -1.0
    best = min(sorted(summaries), key=lambda name: -sign * summaries[name].mean)  # equal means: first by name
    marks = dict.fromkeys(summaries, "")
    marks[best] = "best"
    against = {name: paired(scores[best], scores[name]) for name in summaries
               if name != best and set(scores[best]) & set(scores[name])}
    for name, comparison in against.items():
        if comparison.tie:
            marks[name] = "tie"
    note = None
    if any(comparison.tie is None for comparison in against.values()) or len(against) < len(summaries) - 1:
        note = ("fewer than two seeds in common with the best method for some methods: no standard error, so no "
                "tie information for them (run more seeds)")
    return Ranking(best, summaries, marks, against, note)


__all__ = ["TIE_SE", "Paired", "Ranking", "Summary", "mean", "paired", "rank", "sample_std", "summarize"]
