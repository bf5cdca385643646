"""Scaling benchmark: forward + backward time of one adapted n×n Linear as the width n grows.

Usage::

    python benchmarks/scaling.py                       # widths 256, 1024, 4096; writes results/scaling.md
    python benchmarks/scaling.py --widths 256,1024 --methods lora,c3a --tokens 128

For every width, the frozen Linear (forward + backward to its input) and every registered method
with its default config are timed interleaved round by round; the table gives each method's time
as a multiple of the frozen layer at the same width, so how the adapter's cost grows is visible
(FFT methods should grow as n log n per row, dense-update methods as n²).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

import rankwise
from rankwise.experiment.pipeline import LONG_RUN, with_run_length


def layer_step(model: nn.Module, tokens: int, width: int) -> common.Step:
    """Forward + backward of ``model`` on a (tokens, width) input that requires a gradient."""
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def step() -> None:
        x.grad = None
        model(x).square().mean().backward()
        for parameter in model.parameters():
            parameter.grad = None

    return step


def adapted_linear(method: str, width: int) -> nn.Module:
    """One ``width``×``width`` Linear adapted by ``method`` with its default config."""
    options = with_run_length(method, {}, LONG_RUN)  # total_step for AdaLoRA/ElaLoRA; timing never allocates
    return rankwise.adapt(nn.Sequential(nn.Linear(width, width)), rankwise.config(method, targets=["0"], **options))


def run(args: argparse.Namespace) -> str:
    """Time every method at every width and return the markdown table."""
    common.setup_torch(args.threads)
    methods = args.methods.split(",") if args.methods else rankwise.methods()
    widths = [int(w) for w in args.widths.split(",")]
    cells: dict[str, dict[int, str]] = {method: {} for method in methods}
    frozen_ms: dict[int, float] = {}
    for width in widths:
        frozen = nn.Sequential(nn.Linear(width, width)).requires_grad_(False)
        steps = {"frozen": layer_step(frozen, args.tokens, width)}
        for method in methods:
            try:
                steps[method] = layer_step(adapted_linear(method, width), args.tokens, width)
            except ValueError as error:  # the default config does not fit this width
                cells[method][width] = f"n/a ({str(error)[:60]})".replace("|", "/")
        print(f"width {width}: timing {len(steps)} candidates", file=sys.stderr)
        times = common.medians(common.interleaved_times(steps, args.rounds, args.warmup))
        frozen_ms[width] = times["frozen"] * 1e3
        for method in methods:
            if method in times:
                cells[method][width] = f"{times[method] / times['frozen']:.2f}"
    rows = [["frozen Linear (ms)"] + [f"{frozen_ms[w]:.2f}" for w in widths]]
    rows += [[method] + [cells[method][w] for w in widths] for method in methods]
    return "\n".join([
        f"# Per-layer scaling: one n×n Linear, {args.tokens} tokens, forward + backward, float32",
        "",
        f"{common.environment_line(args.threads)}; {args.rounds} interleaved rounds after {args.warmup} warm-up, medians.",
        "Cells: time as a multiple of the frozen Linear's forward + backward (to its input) at the same width;",
        "default config of every method (its own `targets=['0']`).",
        "",
        common.markdown_table(["method"] + [f"n = {w}" for w in widths], rows),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="256,1024,4096", help="comma-separated n = m")
    parser.add_argument("--tokens", type=int, default=256, help="rows of the input (batch × sequence)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all registered)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="scaling.md", help="file name under benchmarks/results/ ('' to not write)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.publish(run(args), args.out)


if __name__ == "__main__":
    main()
