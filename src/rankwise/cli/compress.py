"""``rankwise compress``: compress a sentence encoder one-shot and measure what it costs.

Prints the per-layer ranks, the parameters before/after, the CPU inference-time ratio (interleaved),
the fidelity (mean cosine of mean-pooled embeddings to the uncompressed model on held-out tweets)
and the accuracy of a logistic-regression probe on frozen embeddings before and after.
``--then-adapt NAME`` then fine-tunes the compressed model with a rankwise adapter and a linear
head for a few steps (LoRD + LoRA, arXiv 2309.14021) and reports the probe accuracy again.
``--output DIR`` saves the compressed model (before any adaptation) to DIR and, with ``--then-adapt``,
the trained adapter to DIR/adapter: ``rankwise.load(load_compressed(base, DIR), DIR/adapter)`` gives
back the adapted model (the probe's linear head is not saved).
Defaults run in a few minutes on 2 CPU cores with the shipped all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..compress.svd import ALLOCATIONS, METHODS
from ..experiment.compression import CompressJob, compress_and_measure


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``compress`` on the main CLI's subparsers."""
    parser = subparsers.add_parser("compress", help="one-shot low-rank compression (LoRD / SVD, whitened SVD-LLM)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=_fraction, default=None, help="at most this fraction of the targeted weights is kept (default 0.5; a ratio below rank 1 everywhere is refused)")
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
    parser.add_argument("--output", default=None,
                        help="save the compressed model here (safetensors + JSON), before any --then-adapt; with "
                             "--then-adapt, the trained adapter goes to OUTPUT/adapter (rankwise.load it onto "
                             "load_compressed(base, OUTPUT))")
    parser.add_argument("--then-adapt", default=None, metavar="METHOD",
                        help="fine-tune with this rankwise adapter (saved to OUTPUT/adapter with --output)")
    parser.add_argument("--adapt-steps", type=int, default=60, help="optimizer steps for --then-adapt")
    parser.set_defaults(func=run)
    return parser


def _targets(text: str) -> str | list[str]:
    """``all-linear``; comma-separated name suffixes (``query,value``); anything else is a regex."""
    if text != "all-linear" and re.fullmatch(r"[\w.,]+", text):
        return text.split(",")
    return text


def job(args: argparse.Namespace) -> CompressJob:
    """The parsed options as the pipeline's :class:`CompressJob`."""
    return CompressJob(ratio=args.ratio, energy=args.energy, method=args.method, sequential=args.sequential,
                       allocation=args.allocation, targets=_targets(args.targets),
                       exclude=_targets(args.exclude) if args.exclude else None, force=args.force,
                       calibration=args.calibration, held_out=args.held_out, probe_train=args.probe_train,
                       seed=args.seed, output=args.output, then_adapt=args.then_adapt, adapt_steps=args.adapt_steps)


def run(args: argparse.Namespace) -> int:
    """Compress, measure, print; returns the exit status."""
    result = compress_and_measure(job(args))
    print(result.table)
    before, after = result.parameters_before, result.parameters_after
    print(f"model parameters: {before:,} -> {after:,} ({after / before:.1%})")
    print(f"CPU inference time ratio (compressed / original, interleaved): {result.time_ratio:.3f}")
    print(f"fidelity (mean cosine to the original, {result.held_out} held-out tweets): {result.fidelity:.4f}")
    print(f"linear-probe accuracy: original {result.accuracy_before:.4f}, compressed {result.accuracy_after:.4f}")
    if result.saved is not None:
        print(f"saved to {result.saved}")
    if result.accuracy_adapted is not None:
        print(f"linear-probe accuracy after {args.adapt_steps} steps of {args.then_adapt} on the compressed model: "
              f"{result.accuracy_adapted:.4f}")
    if result.saved_adapter is not None:
        print(f"trained {args.then_adapt} adapter saved to {result.saved_adapter} "
              f"(rankwise.load it onto load_compressed(base, {result.saved}))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``compress`` on its own (``python -m rankwise.cli.compress``)."""
    parser = argparse.ArgumentParser(prog="rankwise")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
