"""``rankwise compress``: compress a sentence encoder one-shot and measure what it costs.

Prints the per-layer ranks, the parameters before/after, the CPU inference-time ratio (interleaved),
the fidelity (mean cosine of mean-pooled embeddings to the uncompressed model on held-out tweets)
and the accuracy of a logistic-regression probe on frozen embeddings before and after.
``--then-adapt NAME`` then fine-tunes the compressed model with a rankwise adapter and a linear
head for a few steps (LoRD + LoRA, arXiv 2309.14021) and reports the probe accuracy again.
Defaults run in a few minutes on 2 CPU cores with the shipped all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import copy
import random
import re
from typing import Any

import torch
from torch import nn

from .calibration import Batch
from .evaluate import embed, fidelity, load_minilm, probe_accuracy, time_ratio, tokenize, tweet_splits
from .storage import save_compressed
from .svd import ALLOCATIONS, METHODS, compress, compression_report


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``compress`` on the main CLI's subparsers."""
    parser = subparsers.add_parser("compress", help="one-shot low-rank compression (LoRD / SVD, whitened SVD-LLM)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=_fraction, default=None, help="fraction of targeted weights kept (default 0.5)")
    parser.add_argument("--energy", type=_fraction, default=None, help="per-layer σ² energy kept instead of --ratio")
    parser.add_argument("--method", choices=METHODS, default="whitened", help="svd (LoRD, data-free) or whitened (SVD-LLM)")
    parser.add_argument("--sequential", action="store_true", help="calibrate each layer on the compressed model's inputs")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                        help="rank allocation across layers: sensitivity (measured effect on the output; the default "
                             "with a ratio), uniform (the default with --energy) or global (spectrum only)")
    parser.add_argument("--targets", default="all-linear", help="'all-linear', a regex, or comma-separated suffixes")
    parser.add_argument("--exclude", default="pooler.dense",
                        help="layers left alone (same forms as --targets; the pooler is unused by mean pooling); '' for none")
    parser.add_argument("--force", action="store_true", help="factorise layers even past the break-even rank")
    parser.add_argument("--calibration", type=int, default=256, help="calibration tweets (whitened SVD, sensitivity allocation)")
    parser.add_argument("--held-out", type=int, default=512, help="held-out tweets for fidelity and the probe test")
    parser.add_argument("--probe-train", type=int, default=1500, help="tweets to fit the linear probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="save the compressed model here (safetensors + JSON)")
    parser.add_argument("--then-adapt", default=None, metavar="METHOD", help="fine-tune with this rankwise adapter")
    parser.add_argument("--adapt-steps", type=int, default=60, help="optimizer steps for --then-adapt")
    parser.set_defaults(func=run)
    return parser


def _targets(text: str) -> str | list[str]:
    """``all-linear``; comma-separated name suffixes (``query,value``); anything else is a regex."""
    if text != "all-linear" and re.fullmatch(r"[\w.,]+", text):
        return text.split(",")
    return text


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _adapt_and_train(model: nn.Module, method: str, batches: list[Batch], labels: list[list[int]], steps: int,
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


def run(args: argparse.Namespace) -> int:
    """Compress, measure, print; returns the exit status."""
    torch.manual_seed(args.seed)
    splits = tweet_splits(args.calibration, args.probe_train, args.held_out, seed=args.seed)
    original, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, splits.calibration)
    train = tokenize(tokenizer, splits.train[0], batch_size=32)
    test = tokenize(tokenizer, splits.test[0])
    reference_test, reference_train = embed(original, test), embed(original, train)

    allocation = args.allocation or ("uniform" if args.energy is not None else "sensitivity")
    model = compress(copy.deepcopy(original), ratio=args.ratio, energy=args.energy, method=args.method,
                     calibration=calibration, targets=_targets(args.targets),
                     exclude=_targets(args.exclude) if args.exclude else None,
                     allocation=allocation, sequential=args.sequential, force=args.force)
    print(compression_report(model).table())
    before, after = _parameters(original), _parameters(model)
    print(f"model parameters: {before:,} -> {after:,} ({after / before:.1%})")
    print(f"CPU inference time ratio (compressed / original, interleaved): {time_ratio(original, model, test[:4]):.3f}")
    compressed_test = embed(model, test)
    print(f"fidelity (mean cosine to the original, {len(splits.test[0])} held-out tweets): "
          f"{fidelity(reference_test, compressed_test):.4f}")
    accuracy_before = probe_accuracy(reference_train, splits.train[1], reference_test, splits.test[1])
    accuracy_after = probe_accuracy(embed(model, train), splits.train[1], compressed_test, splits.test[1])
    print(f"linear-probe accuracy: original {accuracy_before:.4f}, compressed {accuracy_after:.4f}")
    if args.output:
        print(f"saved to {save_compressed(model, args.output)}")
    if args.then_adapt:
        train_labels = [splits.train[1][i:i + 32] for i in range(0, len(splits.train[1]), 32)]
        adapted = _adapt_and_train(model, args.then_adapt, train, train_labels, args.adapt_steps, args.seed)
        accuracy_adapted = probe_accuracy(embed(adapted, train), splits.train[1], embed(adapted, test), splits.test[1])
        print(f"linear-probe accuracy after {args.adapt_steps} steps of {args.then_adapt} on the compressed model: "
              f"{accuracy_adapted:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``compress`` on its own (``python -m rankwise.compress.cli``)."""
    parser = argparse.ArgumentParser(prog="rankwise")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
