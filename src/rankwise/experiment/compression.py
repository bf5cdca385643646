"""One-shot compression of the shipped sentence encoder, measured: ``compress_and_measure(CompressJob(...))``,
the pipeline of ``rankwise compress`` (:mod:`rankwise.cli.compress`).

It compresses the encoder (``rankwise.compress``), then measures the parameters before and after, the
CPU inference-time ratio (interleaved), the fidelity (mean cosine of mean-pooled embeddings to the
uncompressed model on held-out tweets) and the accuracy of a logistic-regression probe on frozen
embeddings before and after; ``then_adapt`` fine-tunes the compressed model with a rankwise adapter
and a linear head for a few steps (LoRD + LoRA, arXiv 2309.14021) and measures the probe again.

With ``output``, the compressed model is saved to that directory *before* the adaptation
(:func:`~rankwise.compress.save_compressed`) and, with ``then_adapt``, the trained adapter afterwards to
``output/adapter`` (:func:`rankwise.save`; the linear head is a probe of the run and is not saved), so
``rankwise.load(load_compressed(base, output), output / "adapter")`` gives back the adapted model.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..compress.calibration import Batch
from ..compress.evaluate import embed, fidelity, load_minilm, probe_accuracy, time_ratio, tokenize, tweet_splits
from ..compress.storage import save_compressed
from ..compress.svd import compress, compression_report


@dataclass(frozen=True)
class CompressJob:
    """What to compress and how (the arguments of ``rankwise.compress``), and what to measure."""

    ratio: float | None = None
    energy: float | None = None
    method: str = "whitened"
    sequential: bool = False
    allocation: str | None = None
    targets: list[str] | str = "all-linear"
    exclude: list[str] | str | None = None
    force: bool = False
    calibration: int = 256
    held_out: int = 512
    probe_train: int = 1500
    seed: int = 0
    output: str | None = None
    then_adapt: str | None = None
    adapt_steps: int = 60


@dataclass(frozen=True)
class CompressOutcome:
    """The measurements of one :class:`CompressJob`."""

    table: str
    parameters_before: int
    parameters_after: int
    time_ratio: float
    held_out: int
    fidelity: float
    accuracy_before: float
    accuracy_after: float
    saved: Path | None
    accuracy_adapted: float | None
    saved_adapter: Path | None = None


ADAPTER_DIR = "adapter"  # the trained ``then_adapt`` adapter's subdirectory of ``output``


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adapt_and_train(model: nn.Module, method: str, batches: list[Batch], labels: list[list[int]], steps: int,
                    seed: int) -> nn.Module:
    """Adapter + linear head on the mean-pooled embedding, cross-entropy, AdamW; returns the adapted model."""
    import rankwise

    torch.manual_seed(seed)
    model = rankwise.adapt(model, rankwise.config(method))
    head = nn.Linear(model.config.hidden_size, 1 + max(max(y) for y in labels))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    order = random.Random(seed)
    model.train()
    for _ in range(steps):
        index = order.randrange(len(batches))
        batch = batches[index]
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        loss = nn.functional.cross_entropy(head(pooled), torch.tensor(labels[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def compress_and_measure(job: CompressJob) -> CompressOutcome:
    """Compress the shipped MiniLM as ``job`` says and measure it (see the module docstring)."""
    torch.manual_seed(job.seed)
    splits = tweet_splits(job.calibration, job.probe_train, job.held_out, seed=job.seed)
    original, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, splits.calibration)
    train = tokenize(tokenizer, splits.train[0], batch_size=32)
    test = tokenize(tokenizer, splits.test[0])
    reference_test, reference_train = embed(original, test), embed(original, train)

    allocation = job.allocation or ("uniform" if job.energy is not None else "sensitivity")
    model = compress(copy.deepcopy(original), ratio=job.ratio, energy=job.energy, method=job.method,
                     calibration=calibration, targets=job.targets, exclude=job.exclude,
                     allocation=allocation, sequential=job.sequential, force=job.force)
    compressed_test = embed(model, test)
    accuracy_adapted = None
    saved_adapter = None
    saved = save_compressed(model, job.output) if job.output else None
    outcome = {
        "table": compression_report(model).table(), "parameters_before": parameters(original),
        "parameters_after": parameters(model), "time_ratio": time_ratio(original, model, test[:4]),
        "held_out": len(splits.test[0]), "fidelity": fidelity(reference_test, compressed_test),
        "accuracy_before": probe_accuracy(reference_train, splits.train[1], reference_test, splits.test[1]),
        "accuracy_after": probe_accuracy(embed(model, train), splits.train[1], compressed_test, splits.test[1]),
        "saved": Path(saved) if saved is not None else None,
    }
    if job.then_adapt:
        train_labels = [splits.train[1][i:i + 32] for i in range(0, len(splits.train[1]), 32)]
        adapted = adapt_and_train(model, job.then_adapt, train, train_labels, job.adapt_steps, job.seed)
        accuracy_adapted = probe_accuracy(embed(adapted, train), splits.train[1], embed(adapted, test), splits.test[1])
        if job.output:
            import rankwise

            saved_adapter = rankwise.save(adapted, Path(job.output) / ADAPTER_DIR)
    return CompressOutcome(**outcome, accuracy_adapted=accuracy_adapted, saved_adapter=saved_adapter)
