"""Options shared by the commands, and their translation into the pipelines' dataclasses."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..core.registry import get_method, methods
from ..experiment.pipeline import SHIPPED_MODEL, DataConfig, check_options
from ..experiment.threads import THREADS_HELP, advice, default_threads
from ..experiment.train import OPTIMIZERS, PRECISIONS, SCHEDULES, TRACKERS, TrainSettings


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The data options shared by ``finetune`` and ``compare``."""
    from ..experiment import data as datasets

    data = parser.add_argument_group("data")
    data.add_argument("--task", default="movie-reviews", help=f"built-in task: {', '.join(sorted(datasets.TASKS))}")
    data.add_argument("--data", help="your own .csv or .jsonl file instead of a built-in task")
    data.add_argument("--text-column", default="text", help="text column of --data (refused without --data)")
    data.add_argument("--label-column", default="label", help="label column of --data (refused without --data)")
    data.add_argument("--max-examples", type=int, default=3000,
                      help="cap on training examples (validation and test get max(100, N/3)); 0 = no cap")
    data.add_argument("--max-length", type=int, default=64,
                      help="tokens per example, special tokens included: from their number + 1 to what the model "
                           "takes (the tokenizer's model_max_length, the model's max_position_embeddings)")


def add_targets_option(group: argparse._ArgumentGroup, default: str) -> None:
    """``--targets``, shared by ``finetune`` and ``compare`` (which differ only in the default)."""
    group.add_argument("--targets", default=default,
                       help="layers to adapt: comma list of name suffixes, a regex, or all-linear")


def add_training_options(parser: argparse.ArgumentParser, output_help: str) -> None:
    """The model, budget, schedule, engine, seed and output options shared by ``finetune`` and ``compare``."""
    defaults = TrainSettings()
    training = parser.add_argument_group("training")
    training.add_argument("--model", default=SHIPPED_MODEL,
                          help="model id or local path; the default is the shipped all-MiniLM-L6-v2")
    training.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the training set")
    training.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    training.add_argument("--batch-size", type=int, default=defaults.batch_size,
                          help="examples per optimizer step, over all processes and accumulated micro-batches")
    training.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (after warm-up)")
    training.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                          help="learning rate after warm-up: constant, linear decay to zero, or cosine")
    training.add_argument("--warmup", type=float, default=defaults.warmup,
                          help="linear warm-up over this fraction of the steps")
    training.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                          help="adamw, or lorapro (LoRA-Pro's equivalent gradient for LoRA/rsLoRA/GoRA factors, DoRA/BoRA "
                               "on their direction; the linear probe always uses AdamW)")
    training.add_argument("--probe-lr", type=float, default=5e-3, help="learning rate of the linear probe")
    training.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    training.add_argument("--seed", type=int, default=0, help="seeds the split, the order and the init")
    training.add_argument("--output-dir", help=output_help)

    engine = parser.add_argument_group("engine (transformers.Trainer)")
    engine.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    engine.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine (DDP: gloo on CPU, NCCL on GPUs), launched with torchrun; "
                             "--batch-size stays the global batch")
    engine.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="bf16: autocast (weights and optimizer stay float32)")
    engine.add_argument("--grad-accum", type=int, default=defaults.grad_accum,
                        help="micro-batches accumulated per optimizer step")
    engine.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less memory, more time)")
    engine.add_argument("--compile", action="store_true", help="torch.compile the model")
    engine.add_argument("--save-every", type=int, default=None, metavar="N",
                        help="write an adapter-only checkpoint every N optimizer steps to OUTPUT/checkpoints")
    engine.add_argument("--report-to", choices=["none", *TRACKERS], default=defaults.report_to,
                        help="experiment tracker, through Trainer's integrations (its package must be installed)")


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(task=args.task, data=args.data, text_column=args.text_column, label_column=args.label_column,
                      max_examples=args.max_examples, max_length=args.max_length)


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The training settings of the parsed options (checked: a bad value is a ValueError here)."""
    return TrainSettings(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         optimizer=args.optimizer, schedule=args.schedule, warmup=args.warmup,
                         grad_accum=args.grad_accum, precision=args.precision,
                         gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                         save_every=args.save_every, report_to=args.report_to)


def threads(args: argparse.Namespace, processes: int | None = None) -> int:
    """``--threads``, or the default for this machine shared among ``processes`` (default ``--nproc``; ``compare``
    passes its workers), with a note on stderr when a busy machine made it leave cores unused."""
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
        return args.threads
    processes = processes if processes is not None else args.nproc
    count = default_threads(processes)
    note = advice(count, processes)
    if note is not None:
        print(f"rankwise: note: {note}", file=sys.stderr)
    return count


def parse_value(text: str) -> Any:
    """A command-line value as JSON when it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(item: str, form: str = "KEY=VALUE") -> tuple[str, Any]:
    """``KEY=VALUE`` (the value read by :func:`parse_value`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects {form}, got {item!r}")
    return key.strip(), parse_value(value)


def selected_methods(text: str | None, everything: Callable[[], list[str]] = methods,
                     method_of: Callable[[str], Any] = get_method) -> list[str]:
    """The methods named by ``--methods`` (each checked by ``method_of``: against the registry), or
    ``everything()`` (all registered methods)."""
    if text is None:
        return everything()
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--methods needs at least one method name")
    for name in names:
        method_of(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"--methods names {duplicates} more than once")
    return names


def per_method_options(items: list[str], names: list[str], training_keys: tuple[str, ...] = (),
                       method_of: Callable[[str], str] = str) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` items as {method: {key: value}}, each key checked against that method's config,
    over the method's ``comparison_defaults`` (SURM: ``rectangular="native"``, so it runs on all-linear).

    Keys in ``training_keys`` (``lr`` for ``compare``) are training settings, not config fields. ``method_of``
    maps a name to the registered method whose config it uses (``compare``'s ``lorapro`` -> ``lora``).
    """
    options = {name: dict(get_method(method_of(name)).config_cls.comparison_defaults) for name in names}
    for item in items:
        target, value = parse_assignment(item, form="METHOD.KEY=VALUE")
        method, dot, key = target.partition(".")
        if not dot or not key:
            raise ValueError(f"--set expects METHOD.KEY=VALUE (e.g. lora.r=16), got {item!r}")
        if method not in options:
            raise ValueError(f"--set {item!r} names method {method!r}, which is not compared (--methods: {names})")
        options[method][key] = value
    for method, values in options.items():
        check_options(method_of(method), {k: v for k, v in values.items() if k not in training_keys})
        if "lr" in training_keys and "lr" in values:
            lr = values["lr"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"--set {method}.lr must be a positive number, got {lr!r}")
    return options
