"""How long ``rankwise compare`` takes with its defaults: every method and LoRA-Pro, 3 seeds, the full fine-tuning,
linear-probe and majority baselines, movie-reviews at ``rankwise.cli.compare.DEFAULT_SCALE``, no lr tuning.

It runs the real command with no option but its output folder (a fresh temporary one; ``--workers`` and
``--threads`` at their defaults for this machine: one run per core), times it from start to the written table, and
reports the wall time beside the run count, the sum of the runs' own times, the workers, threads and cores and the
load average before and after (a busy machine makes it slower: run it on a quiet one).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare_default.py --out compare_default.md    # about 30 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import publish

from rankwise import cli
from rankwise.cli.compare import DEFAULT_SCALE, compare_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "compare"
        command = ["compare", "--output-dir", str(output)]
        parsed = compare_config(cli.build_parser().parse_args(command))
        started = time.perf_counter()
        status = cli.main(command)
        wall = time.perf_counter() - started
        runs = [json.loads(path.read_text()) for path in (output / "results").glob("*.json")]
    load_after = os.getloadavg()
    own = sum(run["seconds"] for run in runs)
    scale = ", ".join(f"{key} {value}" for key, value in DEFAULT_SCALE.items())
    text = "\n".join([
        "# `rankwise compare` with its defaults: wall time",
        "",
        ("Regenerate: `OMP_WAIT_POLICY=PASSIVE python benchmarks/compare_default.py --out compare_default.md` (runs "
         f"`rankwise compare` with its defaults: movie-reviews, every method and lorapro, 3 seeds, budget like LoRA r=8 "
         f"on all-linear, {scale}, full fine-tuning at lr {parsed.full_lrs[0]:g}, the shared lr {parsed.settings.lr:g})."),
        "",
        ("| runs | exit status | wall time (min) | sum of the runs' own times (min) | workers × threads | cores "
         "| load average before → after |"),
        "|---:|---:|---:|---:|---|---:|---|",
        (f"| {len(runs)} | {status} | {wall / 60:.1f} | {own / 60:.1f} | {parsed.workers} × {parsed.threads} | "
         f"{os.cpu_count()} | {load_before[0]:.2f} → {load_after[0]:.2f} |"),
        "",
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
