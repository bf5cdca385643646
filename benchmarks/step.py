"""Training-step benchmark: rankwise vs HF PEFT and every registered method vs the frozen floor.

Usage::

    python benchmarks/step.py                        # full run on the shipped MiniLM, writes results/step.md
    python benchmarks/step.py --rounds 5 --methods lora,dora
    python benchmarks/step.py --quick                # tiny random BERT, seconds (the smoke test's mode)

All candidates are built from copies of one base model and timed in one process, interleaved round
by round after warm-up (medians). Peak memory is the growth of the resident set (VmHWM, reset via
``/proc/self/clear_refs``) over 3 steps, measured in a fresh subprocess per candidate.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from torch import nn

import rankwise
from rankwise.core.registry import get_method
from rankwise.experiment.pipeline import LONG_RUN, with_run_length


@dataclass(frozen=True)
class Shared:
    """A config both rankwise and PEFT implement: the same hyper-parameters and targets on both sides."""

    label: str
    method: str
    kwargs: dict[str, Any]
    peft_config: Callable[[list[str]], Any]
    targets: list[str]

    def rankwise_kwargs(self) -> dict[str, Any]:
        return {**self.kwargs, "targets": self.targets}


def _lora(targets: list[str], **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=8, target_modules=targets, **extra)


def _c3a(targets: list[str]) -> Any:
    from peft import C3AConfig

    return C3AConfig(block_size=64, target_modules=targets)


def _gralora(targets: list[str]) -> Any:
    from peft import GraloraConfig

    return GraloraConfig(r=32, alpha=64, gralora_k=2, target_modules=targets)


def _miss(targets: list[str]) -> Any:
    from peft import MissConfig

    return MissConfig(r=64, target_modules=targets)


SHARED = [
    Shared("LoRA r8 query,value", "lora", {"r": 8, "alpha": 8}, _lora, common.QUERY_VALUE),
    Shared("LoRA r8 all-linear", "lora", {"r": 8, "alpha": 8}, _lora, common.ALL_LINEAR),
    Shared("DoRA r8 all-linear", "dora", {"r": 8, "alpha": 8}, lambda t: _lora(t, use_dora=True), common.ALL_LINEAR),
    Shared("C3A block 64 all-linear", "c3a", {"block_size": 64}, _c3a, common.ALL_LINEAR),
    Shared("GraLoRA r32 k2 all-linear", "gralora", {"r": 32, "alpha": 64, "gralora_k": 2}, _gralora, common.ALL_LINEAR),
    Shared("MiSS r64 all-linear", "miss", {"r": 64}, _miss, common.ALL_LINEAR),
]


def shared_configs(selected: set[str] | None) -> list[Shared]:
    """The shared configs whose method is registered in rankwise right now (and selected)."""
    registered = set(rankwise.methods())
    return [s for s in SHARED if s.method in registered and (selected is None or s.method in selected)]


@dataclass(frozen=True)
class Candidate:
    """One model to time: ``build(base)`` adapts a private copy of the base model."""

    key: str
    build: Callable[[nn.Module], nn.Module]
    is_floor: bool = False


def _rankwise_builder(method: str, kwargs: dict[str, Any]) -> Callable[[nn.Module], nn.Module]:
    return lambda base: rankwise.adapt(copy.deepcopy(base), rankwise.config(method, **kwargs))


def _peft_builder(shared: Shared) -> Callable[[nn.Module], nn.Module]:
    def build(base: nn.Module) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(copy.deepcopy(base), shared.peft_config(shared.targets))

    return build


def candidates(selected: set[str] | None) -> dict[str, Candidate]:
    """Floor, rankwise and PEFT for every shared config, and every method's default on all-linear."""
    found = {"floor": Candidate("floor", copy.deepcopy, is_floor=True)}
    for shared in shared_configs(selected):
        found[f"rankwise {shared.label}"] = Candidate(f"rankwise {shared.label}", _rankwise_builder(shared.method, shared.rankwise_kwargs()))
        found[f"peft {shared.label}"] = Candidate(f"peft {shared.label}", _peft_builder(shared))
    for method in rankwise.methods():
        if selected is None or method in selected:
            key = f"rankwise {method} default"
            defaults = get_method(method).config_cls.comparison_defaults  # SURM: rectangular="native"
            defaults = with_run_length(method, defaults, LONG_RUN)  # total_step for AdaLoRA/ElaLoRA; timing never allocates
            found[key] = Candidate(key, _rankwise_builder(method, {"targets": common.ALL_LINEAR, **defaults}))
    return found


def make_step(candidate: Candidate, model: nn.Module, batch: common.Batch) -> common.Step:
    return common.floor_step(model, batch) if candidate.is_floor else common.training_step(model, batch)


def measure_memory(key: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one candidate, in this process (the subprocess side of :func:`memory_in_subprocess`)."""
    common.setup_torch(args.threads)
    base = common.load_model(args.quick)
    candidate = candidates(None)[key]
    model = candidate.build(base)
    del base
    step = make_step(candidate, model, common.random_batch(model, args.batch, args.seq))
    return common.peak_rss_growth_mib(step)


def memory_in_subprocess(key: str, args: argparse.Namespace) -> float | None:
    """Run :func:`measure_memory` in a fresh interpreter; None (with the error printed) on failure."""
    return common.memory_in_subprocess(__file__, args, key)


def run(args: argparse.Namespace) -> str:
    """Time everything, measure memory and return the markdown report."""
    common.setup_torch(args.threads)
    selected = set(args.methods.split(",")) if args.methods else None
    base = common.load_model(args.quick)
    batch = common.random_batch(base, args.batch, args.seq)
    models: dict[str, nn.Module] = {}
    steps: dict[str, common.Step] = {}
    errors: dict[str, str] = {}
    for key, candidate in candidates(selected).items():
        try:
            models[key] = candidate.build(base)
            steps[key] = make_step(candidate, models[key], batch)
        except (ValueError, TypeError) as error:  # a default config that does not fit this model
            errors[key] = f"{type(error).__name__}: {error}".replace("|", "/")[:160]
    print(f"timing {len(steps)} candidates, {args.rounds} rounds after {args.warmup} warm-up", file=sys.stderr)
    step_s = common.medians(common.interleaved_times(steps, args.rounds, args.warmup))
    merged_ratio = merged_inference_ratios(base, models, batch, args)
    memory = {key: memory_in_subprocess(key, args) for key in steps} if args.memory else {}
    return report(args, selected, models, step_s, merged_ratio, memory, errors)


def merged_inference_ratios(
    base: nn.Module, models: dict[str, nn.Module], batch: common.Batch, args: argparse.Namespace
) -> dict[str, float]:
    """Eval forward time of every merged rankwise default model over the plain base model's."""
    merged = {key: rankwise.merge(model) for key, model in models.items() if key.endswith(" default")}
    steps = {"base": common.inference_step(base, batch)}
    steps.update({key: common.inference_step(model, batch) for key, model in merged.items()})
    times = common.medians(common.interleaved_times(steps, args.rounds, args.warmup))
    return {key: times[key] / times["base"] for key in merged}


def _trainable(model: nn.Module | None) -> str:
    return "—" if model is None else f"{rankwise.trainable_parameters(model):,}"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def report(
    args: argparse.Namespace,
    selected: set[str] | None,
    models: dict[str, nn.Module],
    step_s: dict[str, float],
    merged_ratio: dict[str, float],
    memory: dict[str, float | None],
    errors: dict[str, str],
) -> str:
    """The two markdown tables (rankwise vs PEFT; every method vs the floor) with their set-up."""
    floor = step_s["floor"]
    shared_rows = []
    for shared in shared_configs(selected):
        ours, theirs = f"rankwise {shared.label}", f"peft {shared.label}"
        shared_rows.append([
            shared.label, _trainable(models.get(ours)), _trainable(models.get(theirs)),
            common.ratio(step_s.get(ours), floor), common.ratio(step_s.get(theirs), floor),
            f"**{common.ratio(step_s.get(ours), step_s.get(theirs))}**",
            _mib(memory.get(ours)), _mib(memory.get(theirs)),
            f"**{common.ratio(memory.get(ours), memory.get(theirs))}**",
        ])
    method_rows = [["frozen floor", "0", f"{floor:.3f}", "1.00", "—", _mib(memory.get("floor"))]]
    for key in candidates(selected):
        if key.endswith(" default"):
            name = key.split()[1]
            if key in errors:
                method_rows.append([name, errors[key], "—", "—", "—", "—"])
                continue
            method_rows.append([
                name, _trainable(models[key]), f"{step_s[key]:.3f}", common.ratio(step_s[key], floor),
                f"{merged_ratio[key]:.2f}", _mib(memory.get(key)),
            ])
    setup = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    return "\n".join([
        f"# Training-step benchmark ({setup}, batch {args.batch}, seq {args.seq}, float32, train mode)",
        "",
        f"{common.environment_line(args.threads)}; {args.rounds} interleaved rounds after {args.warmup} warm-up, medians.",
        "Memory: peak RSS growth (VmHWM after reset) over 3 steps, one fresh subprocess per candidate.",
        f"all-linear = {', '.join(common.ALL_LINEAR)}.",
        "",
        "## rankwise vs PEFT (same config, same targets, same run)",
        "",
        common.markdown_table(
            ["config", "trainable rankwise", "trainable PEFT", "rankwise × floor", "PEFT × floor",
             "time rankwise/PEFT", "RSS MiB rankwise", "RSS MiB PEFT", "memory rankwise/PEFT"],
            shared_rows,
        ),
        "",
        "## Every registered method, default config, all-linear",
        "",
        common.markdown_table(
            ["method", "trainable", "step s (median)", "× floor", "merged inference × base", "RSS MiB"],
            method_rows,
        ),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.step_parser(__doc__, rounds=7, out="step.md")
    parser.add_argument("--methods", default="", help="comma-separated rankwise method names (default: all registered)")
    return common.parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    common.step_main(parse_args(argv), measure_memory, run)


if __name__ == "__main__":
    main()
