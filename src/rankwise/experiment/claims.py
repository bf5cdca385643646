"""What each method's paper claims over LoRA, so that ``compare`` can say whether the claim holds on its data.

One :class:`Claim` per method that ``rankwise compare`` ranks, keyed by the method's row name in
:data:`CLAIMS`. LoRA is the reference every claim is measured against, so it has no entry. ``lorapro``
is LoRA trained with the LoRA-Pro optimizer (:mod:`rankwise.optim.lorapro`): same adapter, other
update rule.

Each ``claim`` is our own one-sentence paraphrase of the paper's headline result relative to LoRA,
taken from its abstract and results tables (as recorded in the method specs under
``shared/methods/*.md``; for LoHa, LoKr and KRAdapter from the module docstrings of
:mod:`rankwise.adapters`, ``docs/lokh.md`` and the abstracts), with the paper's arXiv id in
``arxiv``. Each sentence names the budget the paper compares at. Several papers could only be read
up to their abstract (ARD-LoRA, BoRA, SURM, and GraLoRA's tables): their claims go no further than
the abstract says.

``kind`` says what would support the claim on one task:

* ``"better"``: the paper claims higher accuracy than LoRA at a comparable (or smaller) budget, so
  only a win over LoRA supports it; a tie does not.
* ``"match"``: the paper claims LoRA's accuracy at a smaller budget or a lower cost, so a tie with
  LoRA is consistent with it, and a win supports it.

How a measured difference becomes "holds", "tie" or "does not hold": :func:`verdict`, on the paired per-seed
test-accuracy differences method − LoRA of one ``compare`` sweep (:func:`rankwise.experiment.stats.paired`,
the tie rule of the table): a difference beyond the tie threshold holds when it favours the method and
does not hold otherwise; within it the verdict is ``tie`` whatever the kind (consistent with a ``"match"``
claim, but a tie from a wide spread is no evidence of parity, so it is not called ``holds``). With one seed
there is no standard error: ``undecided``. The verdict is about this task, model,
budget and run length only: :func:`claims_markdown` says so above the lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import stats
from .plots import RunRecord
from .report import markdown_table


@dataclass(frozen=True)
class Claim:
    """One paper's headline claim relative to LoRA (see the module docstring for ``kind``)."""

    method: str  # compare row name
    paper: str  # short title
    arxiv: str  # arXiv id, e.g. "2402.09353"
    claim: str  # one sentence, our own words, naming the budget condition
    kind: str  # "better" or "match"


CLAIMS: dict[str, Claim] = {
    "adalora": Claim(
        method="adalora",
        paper="AdaLoRA",
        arxiv="2303.10512",
        claim="Allocating a shared rank budget by importance beats uniform-rank LoRA at the same or smaller "
        "parameter budget, most clearly at small budgets.",
        kind="better",
    ),
    "ardlora": Claim(
        method="ardlora",
        paper="ARD-LoRA",
        arxiv="2506.18267",
        claim="Learned per-head ranks outperform LoRA-family baselines, including DoRA and AdaLoRA, while "
        "training only a small fraction (about 0.3%) of parameters.",
        kind="better",
    ),
    "bora": Claim(
        method="bora",
        paper="BoRA",
        arxiv="2412.06441",
        claim="Adding trainable row and column magnitudes to LoRA's direction beats LoRA and DoRA at a "
        "near-equal budget (m + n extra parameters per matrix).",
        kind="better",
    ),
    "c3a": Claim(
        method="c3a",
        paper="C3A (Circular Convolution Adaptation)",
        arxiv="2407.19342",
        claim="Block-circulant updates computed by FFT beat LoRA's accuracy while using fewer trainable "
        "parameters and less memory.",
        kind="better",
    ),
    "dora": Claim(
        method="dora",
        paper="DoRA",
        arxiv="2402.09353",
        claim="Splitting weights into magnitude and LoRA-updated direction beats LoRA at the same rank, adding "
        "only one magnitude per output feature and no inference cost.",
        kind="better",
    ),
    "elalora": Claim(
        method="elalora",
        paper="ElaLoRA",
        arxiv="2504.00254",
        claim="Pruning and regrowing ranks during training beats fixed-rank LoRA and AdaLoRA at every matched "
        "rank budget tested.",
        kind="better",
    ),
    "gora": Claim(
        method="gora",
        paper="GoRA",
        arxiv="2502.12171",
        claim="Gradient-driven rank allocation and initialisation beat LoRA at about the same trainable-parameter "
        "budget as uniform-rank LoRA.",
        kind="better",
    ),
    "gralora": Claim(
        method="gralora",
        paper="GraLoRA",
        arxiv="2505.20355",
        claim="Splitting the weight into a grid of small independent LoRAs beats LoRA at the identical parameter "
        "count, across ranks and model sizes.",
        kind="better",
    ),
    "kradapter": Claim(
        method="kradapter",
        paper="KRAdapter (Khatri-Rao adapter)",
        arxiv="2508.00230",
        claim="Khatri-Rao product updates of high effective rank beat LoRA, notably on unseen commonsense tasks, "
        "at LoRA-like memory and compute cost.",
        kind="better",
    ),
    "loha": Claim(
        method="loha",
        paper="FedPara (origin of LoHa; via LyCORIS)",
        arxiv="2108.06098",
        claim="A Hadamard product of two low-rank pairs reaches rank r², outperforming a plain low-rank "
        "factorisation at the same parameter count.",
        kind="better",
    ),
    "lokr": Claim(
        method="lokr",
        paper="LyCORIS (LoKr)",
        arxiv="2309.14859",
        claim="Offers LoRA-comparable fine-tuning from a much smaller adapter, since Kronecker factors can form a "
        "full-rank update from few parameters.",
        kind="match",
    ),
    "loldu": Claim(
        method="loldu",
        paper="LoLDU",
        arxiv="2410.13618",
        claim="Training only r diagonal scalars of a fixed LU basis per matrix reaches LoRA-level accuracy with "
        "orders of magnitude fewer trainable parameters.",
        kind="match",
    ),
    "miss": Claim(
        method="miss",
        paper="MiSS (formerly Bone)",
        arxiv="2409.15371",
        claim="A single shared, zero-initialised shard matrix keeps LoRA-level accuracy at lower memory and "
        "compute cost, easing LoRA's slow convergence.",
        kind="match",
    ),
    "singlora": Claim(
        method="singlora",
        paper="SingLoRA",
        arxiv="2507.05566",
        claim="One matrix used as A·Aᵀ beats LoRA's accuracy with roughly half to 60% of its trainable "
        "parameters, and is less sensitive to the learning rate.",
        kind="better",
    ),
    "surm": Claim(
        method="surm",
        paper="SURM (Structured Unrestricted-Rank Matrices)",
        arxiv="2406.17740",
        claim="Swapping LoRA's low-rank factors for structured matrices such as circulant or Toeplitz raises "
        "image-classification accuracy by 5-7% at similar or fewer parameters.",
        kind="better",
    ),
    "lorapro": Claim(
        method="lorapro",
        paper="LoRA-Pro",
        arxiv="2407.18242",
        claim="Adjusting LoRA's factor gradients to approximate the full fine-tuning gradient raises accuracy over "
        "LoRA with the identical adapter and trainable parameters.",
        kind="better",
    ),
}


#: The method every claim is measured against.
REFERENCE = "lora"
HOLDS, TIE, DOES_NOT_HOLD, UNDECIDED = "holds", "tie", "does not hold", "undecided"


@dataclass(frozen=True)
class Verdict:
    """One claim against one sweep: the paired test-accuracy difference method − LoRA (``difference`` ± its
    ``standard_error`` over ``seeds`` paired seeds) and the ``outcome``; ``budget_note`` when the method did not
    run at the matched budget."""

    claim: Claim
    outcome: str
    difference: float
    standard_error: float | None
    seeds: int
    budget_note: str | None = None

    def line(self) -> str:
        """One Markdown line: the paper, its claim, the measured difference and the outcome."""
        error = "" if self.standard_error is None else f" ± {self.standard_error:.4f} (SE)"
        plural = "" if self.seeds == 1 else "s"
        budget = f"; not at the matched budget: {self.budget_note}" if self.budget_note else ""
        return (f"- **{self.claim.paper}** ({self.claim.method}, arXiv {self.claim.arxiv}): {self.claim.claim} "
                f"Here: test accuracy {self.difference:+.4f}{error} vs LoRA over {self.seeds} paired seed{plural}"
                f"{budget} → **{self.outcome}**")


def verdict(comparison: stats.Paired) -> str:
    """The outcome of a claim over LoRA given the paired comparison method − LoRA (module docstring): the same rule
    for both kinds."""
    if comparison.tie is None:
        return UNDECIDED
    if comparison.tie:
        return TIE
    return HOLDS if comparison.mean_difference > 0 else DOES_NOT_HOLD


def verdicts(records: Sequence[RunRecord], claims: Mapping[str, Claim] = CLAIMS) -> list[Verdict]:
    """A :class:`Verdict` for every claimed method of ``records`` that has test accuracies on seeds LoRA also
    has (none without LoRA's runs), in the records' order."""
    scores: dict[str, dict[int, float]] = {}
    notes: dict[str, str | None] = {}
    for record in records:
        if record.error is None and record.accuracy is not None:
            scores.setdefault(record.method, {})[record.seed] = record.accuracy
            notes.setdefault(record.method, record.budget_note)
    reference = scores.get(REFERENCE, {})
    found = []
    for method, values in scores.items():
        if method in claims and set(values) & set(reference):
            comparison = stats.paired(values, reference)
            found.append(Verdict(claims[method], verdict(comparison), comparison.mean_difference,
                                 comparison.standard_error, len(comparison.seeds), notes[method]))
    return found


def claims_markdown(found: Sequence[Verdict], context: Mapping[str, Any]) -> str:
    """``claims.md``: one line per paper, under what the verdicts are conditioned on."""
    setting = ", ".join(f"{key} {value}" for key, value in context.items())
    lines = ["# Papers' headline claims over LoRA on this run", "",
             (f"Measured in one `rankwise compare` sweep ({setting}). Outcome: the paired per-seed test-accuracy "
             f"difference method − LoRA against {stats.TIE_SE:g} standard errors (the table's tie rule); a claim holds "
             "beyond the threshold in the method's favour and does not hold beyond it against; within it: tie (which "
             "a claim of parity at a smaller budget or cost, kind match, is consistent with). This is one task, one "
             "model, one budget and one run length, not the papers' settings."), ""]
    if not found:
        return "\n".join([*lines, "No claimed method has paired runs with LoRA."]) + "\n"
    rows = [[f"{v.claim.paper} ({v.claim.method}, arXiv {v.claim.arxiv})", v.claim.kind,
             f"{v.difference:+.4f}" + ("" if v.standard_error is None else f" ± {v.standard_error:.4f}")
             + (" †" if v.budget_note else ""), v.seeds, f"**{v.outcome}**"] for v in found]
    lines += [markdown_table(("paper (method)", "claim", "Δ test accuracy vs LoRA ± SE", "seeds", "verdict"), rows), "",
              "† not at the matched budget (see the lines below). Claims, in our words, with the details:", ""]
    lines += [v.line() for v in found]
    return "\n".join(lines) + "\n"
