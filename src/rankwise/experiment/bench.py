"""Side-by-side step times of every method against the frozen floor: ``bench(BenchConfig(...))``, the
pipeline of ``rankwise bench`` (:mod:`rankwise.cli.bench`)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import adapt, merge, trainable_parameters
from ..core.registry import config as make_config
from .pipeline import LONG_RUN, SHIPPED_MODEL, model_path, with_run_length
from .timing import floor_step, inference_step, interleaved_times, medians, random_batch, training_step

logger = logging.getLogger(__name__)


def load_base(model: str) -> nn.Module:
    """The model's backbone (``AutoModel``) in float32 and train mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path(model), dtype=torch.float32).train()


def benchmark(base: nn.Module, configs: dict[str, Any], batch: int, seq: int, rounds: int,
              warmup: int) -> tuple[list[list[str]], float]:
    """Table rows (method, trainable, step ms, × floor, merged inference × base) and the floor in ms."""
    inputs = random_batch(base, batch, seq)
    steps = {"floor": floor_step(copy.deepcopy(base), inputs)}
    inference = {"plain": inference_step(copy.deepcopy(base), inputs)}
    trainable: dict[str, int] = {}
    errors: dict[str, str] = {}
    unmergeable: dict[str, str] = {}
    for name, config in configs.items():
        try:
            model = adapt(copy.deepcopy(base), config)
        except ValueError as error:
            errors[name] = str(error)
            continue
        trainable[name] = trainable_parameters(model)
        steps[name] = training_step(model, inputs)
        try:  # a method that trains but cannot merge (a bias update on a bias-less layer) keeps its step time
            inference[name] = inference_step(merge(copy.deepcopy(model)), inputs)
        except ValueError as error:
            unmergeable[name] = str(error)
    logger.info("timing %d training steps and %d inference steps", len(steps), len(inference))
    step_s = medians(interleaved_times(steps, rounds, warmup))
    inference_s = medians(interleaved_times(inference, rounds, warmup))
    floor = step_s["floor"]
    rows = [["frozen floor", "0", f"{floor * 1e3:.1f}", "1.00", "—"]]
    for name in configs:
        if name in errors:
            rows.append([name, f"error: {errors[name]}", "—", "—", "—"])
        else:
            merged = (f"— (cannot merge: {unmergeable[name]})" if name in unmergeable
                      else f"{inference_s[name] / inference_s['plain']:.2f}")
            rows.append([name, f"{trainable[name]:,}", f"{step_s[name] * 1e3:.1f}", f"{step_s[name] / floor:.2f}", merged])
    return rows, floor * 1e3


@dataclass(frozen=True)
class BenchConfig:
    """What ``bench`` times: ``configs`` (one adapter config per method, by name) on ``model``'s backbone,
    with random batches of ``batch`` x ``seq`` tokens, ``rounds`` timed rounds after ``warmup``."""

    configs: dict[str, AdapterConfig]
    model: str = SHIPPED_MODEL
    batch: int = 32
    seq: int = 64
    rounds: int = 5
    warmup: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        for option in ("batch", "seq", "rounds"):
            if getattr(self, option) <= 0:
                raise ValueError(f"--{option} must be a positive integer, got {getattr(self, option)}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be a positive integer, got {self.threads}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")


def method_configs(options: dict[str, dict[str, Any]], targets: list[str] | str) -> dict[str, AdapterConfig]:
    """One config per method from its options; a schedule that needs the run length (AdaLoRA, ElaLoRA) gets a
    long one: timing never steps the allocator."""
    return {name: make_config(name, **{"targets": targets, **with_run_length(name, values, LONG_RUN)})
            for name, values in options.items()}


def bench(config: BenchConfig) -> tuple[list[list[str]], float]:
    """Time every config against the floor: the table rows (see :func:`benchmark`) and the floor in ms."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    return benchmark(load_base(config.model), config.configs, config.batch, config.seq, config.rounds, config.warmup)
