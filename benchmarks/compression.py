"""Fidelity of one-shot compression of the shipped all-MiniLM-L6-v2, with `rankwise compress`'s defaults.

For each variant (LoRD's plain SVD, whitened SVD with uniform ranks, whitened + sensitivity allocation,
and the same with sequential calibration) and each kept-weight ratio, the encoder's Linear layers (the
pooler excluded, as the CLI does) are compressed on the CLI's default calibration tweets, and the fidelity
(mean cosine of mean-pooled embeddings to the original) is measured on the CLI's default held-out tweets.
Writes ``benchmarks/results/compression.md``; the README's compression table is copied from it.

    python benchmarks/compression.py                 # every variant at 0.9, 0.7, 0.5 (about 10 min on 2 cores)
    python benchmarks/compression.py --ratios 0.5 --variants svd,whitened
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import common
import torch

from rankwise.cli.compress import add_parser
from rankwise.compress import compress, compression_report
from rankwise.compress.evaluate import embed, fidelity, load_minilm, tokenize, tweet_splits
from rankwise.experiment.report import markdown_table

RESULTS = Path(__file__).parent / "results" / "compression.md"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    method: str
    allocation: str
    sequential: bool = False


VARIANTS = [
    Variant("svd", '`method="svd"` (LoRD, data-free), uniform ranks', "svd", "uniform"),
    Variant("whitened", '`method="whitened"` (SVD-LLM), uniform ranks', "whitened", "uniform"),
    Variant("sensitivity", '`method="whitened", allocation="sensitivity"` (the CLI default)', "whitened", "sensitivity"),
    Variant("sequential", "the same with `sequential=True`", "whitened", "sensitivity", True),
]


def cli_defaults() -> argparse.Namespace:
    """`rankwise compress`'s own defaults, read from its parser so the two cannot drift apart."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compress"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = cli_defaults()
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [v for v in VARIANTS if v.key in args.variants.split(",")]

    torch.manual_seed(defaults.seed)
    splits = tweet_splits(defaults.calibration, defaults.probe_train, defaults.held_out, seed=defaults.seed)
    original, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, splits.calibration)
    test = tokenize(tokenizer, splits.test[0])
    reference = embed(original, test)

    rows = []
    for variant in variants:
        cells: list[object] = [variant.label]
        for ratio in ratios:
            model = compress(copy.deepcopy(original), ratio=ratio, method=variant.method, calibration=calibration,
                             exclude=[defaults.exclude], allocation=variant.allocation, sequential=variant.sequential)
            report = compression_report(model)
            score = fidelity(reference, embed(model, test))
            cells.append(f"{score:.3f} ({len(report.skipped)} dense)")
            print(f"{variant.key} ratio {ratio}: fidelity {score:.4f}, {len(report.skipped)} of "
                  f"{len(report.layers)} layers left dense", flush=True)
        rows.append(cells)

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = ["kept weights", *(f"{r:g}" for r in ratios)]
    text = "\n".join([
        "# One-shot compression fidelity (all-MiniLM-L6-v2 encoder, `rankwise compress` defaults)",
        "",
        f"torch {torch.__version__}, {platform.machine()}, {stamp}. `python benchmarks/compression.py`.",
        (f"Calibration: {defaults.calibration} tweets; fidelity: mean cosine of mean-pooled embeddings to the original "
        f"on {defaults.held_out} held-out tweets (seed {defaults.seed}). Targets: every Linear of the encoder except "
        f"`{defaults.exclude}`. \"n dense\": layers the allocation left dense (a factorisation past break-even "
        "would hold more weights than the layer)."),
        "",
        markdown_table(header, rows),
    ])
    print(text)
    print(f"written to {common.write_result(args.output.name, text, args.output.parent)}")


if __name__ == "__main__":
    main()
