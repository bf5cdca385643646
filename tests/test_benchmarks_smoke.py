"""Smoke runs of the benchmark scripts on toy sizes: they build, time and report. No timing is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import allocation
import common
import scaling
import step


def test_interleaved_times_runs_every_candidate_every_round() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.interleaved_times(steps, rounds=3, warmup=1)
    assert {name: len(samples) for name, samples in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert len(calls) == 12


def test_markdown_table_and_ratio() -> None:
    assert common.markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert common.ratio(3.0, 2.0) == "1.50"
    assert common.ratio(None, 2.0) == "—"


def test_step_benchmark_quick(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    args = step.parse_args(["--quick", "--rounds", "1", "--warmup", "0", "--methods", "lora,dora", "--no-memory", "--out", ""])
    text = step.run(args)
    assert "| LoRA r8 all-linear |" in text and "| DoRA r8 all-linear |" in text
    assert "| lora |" in text and "| dora |" in text


def test_step_memory_subprocess_quick() -> None:
    args = step.parse_args(["--quick"])
    assert step.memory_in_subprocess("rankwise LoRA r8 query,value", args) is not None


def test_scaling_benchmark_quick() -> None:
    args = scaling.parse_args(["--widths", "64", "--tokens", "4", "--rounds", "1", "--warmup", "0",
                               "--methods", "lora,dora", "--out", ""])
    text = scaling.run(args)
    assert "| lora |" in text and "| n = 64 |" in text


def test_lorapro_benchmark_quick() -> None:
    import lorapro

    text = lorapro.run(lorapro.parse_args(["--quick", "--rounds", "1", "--warmup", "0", "--out", ""]))
    assert "| LoRA-Pro efficient |" in text and "| LoRA-Pro full |" in text and "| AdamW |" in text


def test_allocation_benchmark_quick() -> None:
    pytest.importorskip("peft")
    args = allocation.parse_args(["--quick", "--rounds", "1", "--warmup", "0", "--no-memory", "--out", "",
                                  "--note", "shared machine"])
    text = allocation.run(args)
    assert "| rankwise AdaLoRA |" in text and "| PEFT AdaLoRA |" in text and "**shared machine**" in text
    assert "rankwise / PEFT: step time **" in text


def test_qlora_benchmark_quick() -> None:
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import qlora

    text = qlora.run(qlora.parse_args(["--quick", "--rounds", "1", "--warmup", "0", "--no-memory", "--out", ""]))
    assert "| rankwise QLoRA |" in text and "| peft QLoRA |" in text and "| frozen NF4 floor |" in text
    assert "| after prepare_for_kbit_training" in text
