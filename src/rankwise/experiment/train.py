"""The training engine of ``finetune`` and ``compare``: ``transformers.Trainer`` with rankwise's callback.

rankwise trains through :class:`~rankwise.integrations.trainer.RankwiseTrainer` (a Trainer whose
checkpoints hold the adapter only and appear atomically) with
:class:`~rankwise.integrations.trainer.RankwiseCallback` (allocators, checks) and
:class:`~rankwise.integrations.trainer.DivergenceGuard` (NaN/Inf stop). Trainer, through accelerate,
brings what a user of this field expects and what a hand-written loop would have to re-implement:
warm-up + decay schedules (``get_scheduler``), gradient accumulation, DDP/FSDP on any launcher
(``torchrun``, ``accelerate launch``, several machines), bf16 autocast, ``torch.compile``, activation
checkpointing, resumable checkpoints (optimizer, scheduler, every rank's RNG state, data position) and
the experiment trackers (``report_to``). rankwise keeps what is its own: tasks and splits, method
options, baselines and reports. Padding is ``DataCollatorWithPadding``; accuracy and macro-F1 are
scikit-learn's.

``TrainSettings.batch_size`` is the global batch of one optimizer step: each of ``world_size``
processes takes ``batch_size / (world_size * grad_accum)`` examples per forward, so the same settings
train the same model on any number of processes (up to floating-point summation order) as long as every batch
is full. An epoch's last, shorter batch is not: it is cut into micro-batches (or process shares) of unequal
size, whose mean losses Trainer averages with equal weight, so that step differs from the mean over the whole
batch (≈ 1 % of a weight's size after one such step, seen with 124 examples, batch 16 and ``grad_accum`` 2).
Use a training-set size that ``batch_size`` divides (``--max-examples``) when the runs must agree exactly.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from ..core.inject import trainable_parameters

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lorapro")
#: ``--schedule``: the learning rate after warm-up (transformers' ``get_scheduler`` names in brackets).
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
PRECISIONS = ("fp32", "bf16")
#: ``--report-to``: Trainer's integration name and the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples (unpadded ids) with their labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


class EncodedDataset(torch.utils.data.Dataset):
    """:class:`Encoded` as the map-style dataset Trainer reads: ``{"input_ids": [...], "labels": y}`` per example."""

    def __init__(self, data: Encoded) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.data.input_ids[index], "labels": self.data.labels[index]}


@dataclass(frozen=True)
class TrainSettings:
    """How long, how fast and on what machinery to train.

    Args:
        epochs: passes over the training set (ignored when ``steps`` is set).
        steps: total optimizer steps, overriding ``epochs``.
        batch_size: examples per optimizer step, over all processes and accumulated micro-batches.
        lr: peak learning rate.
        seed: seeds the example order, dropout and the head's initialisation.
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"``, or ``"lorapro"`` (:class:`rankwise.optim.LoRAPro`: AdamW on LoRA-Pro's
            equivalent gradient for the two-factor adapters, DoRA's and BoRA's on their direction
            (``directions=True``), plain AdamW for every other trainable tensor).
        schedule: the learning rate after warm-up: ``constant``, ``linear`` decay to zero or ``cosine``.
        warmup: linear warm-up from 0 over this fraction of the steps.
        grad_accum: micro-batches accumulated per optimizer step.
        precision: ``fp32``, or ``bf16`` (autocast; the weights and optimizer stay float32).
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant).
        compile: ``torch.compile`` the model.
        save_every: write a checkpoint every this many optimizer steps (None: no checkpoints).
        report_to: ``none``, ``tensorboard``, ``mlflow`` or ``wandb`` (Trainer's integrations).
        max_grad_norm: gradient clipping (0: none).
    """

    epochs: float = 2.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "linear"
    warmup: float = 0.06
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    save_every: int | None = None
    report_to: str = "none"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.steps is None or self.steps > 0, f"steps must be a positive integer, got {self.steps}"),
            (self.steps is not None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size > 0, f"batch size must be a positive integer, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}"),
            (0 <= self.warmup < 1, f"warmup is a fraction of the steps in [0, 1), got {self.warmup}"),
            (self.grad_accum > 0, f"grad_accum must be a positive integer, got {self.grad_accum}"),
            (self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}"),
            (self.save_every is None or self.save_every > 0, f"save_every must be >= 1, got {self.save_every}"),
            (self.report_to == "none" or self.report_to in TRACKERS,
             f"report_to must be none or one of {list(TRACKERS)}, got {self.report_to!r}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def steps_per_epoch(self, n_examples: int) -> int:
        return max(1, math.ceil(n_examples / self.batch_size))

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(n_examples)))

    def per_device_batch(self, world_size: int) -> int:
        """Examples per process and forward: ``batch_size / (world_size * grad_accum)``, which must be whole."""
        share = world_size * self.grad_accum
        if self.batch_size % share:
            raise ValueError(
                f"batch size {self.batch_size} is the global batch of one optimizer step; it must divide evenly "
                f"over {world_size} process(es) x {self.grad_accum} accumulated micro-batch(es). Use a multiple "
                f"of {share}"
            )
        return self.batch_size // share


@dataclass(frozen=True)
class Metrics:
    """Classification quality on one dataset."""

    accuracy: float
    macro_f1: float
    loss: float


@dataclass
class History:
    """What happened during training: the loss of every step and the validation metrics at each evaluation."""

    losses: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, Metrics]] = field(default_factory=list)


@dataclass
class Trained:
    """A classifier after training, with its test metrics and how long its training steps took.

    ``train_seconds`` is the whole ``Trainer.train`` (with the validation passes, when there are any);
    ``step_seconds`` holds the time of each optimizer step, from one step's start to the next's.
    """

    model: nn.Module
    trainable: int
    history: History
    test: Metrics
    train_seconds: float
    step_seconds: list[float]
    world_size: int = 1

    @property
    def steps(self) -> int:
        return len(self.history.losses)

    @property
    def seconds_per_step(self) -> float:
        """The median step time: the first step's warm-up and other programs' bursts do not move it."""
        return statistics.median(self.step_seconds) if self.step_seconds else self.train_seconds / max(1, self.steps)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (scikit-learn; the unweighted mean of per-class F1 over all ``num_labels``
    classes, a class never predicted nor present scoring 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty dataset")
    accuracy = float(accuracy_score(labels, predictions))
    macro_f1 = float(f1_score(labels, predictions, labels=list(range(num_labels)), average="macro", zero_division=0))
    return accuracy, macro_f1


def majority_metrics(train_labels: list[int], test_labels: list[int], num_labels: int) -> Metrics:
    """The majority-class baseline: always predict the most frequent training label."""
    majority = max(range(num_labels), key=train_labels.count)
    accuracy, macro_f1 = classification_metrics([majority] * len(test_labels), test_labels, num_labels)
    return Metrics(accuracy=accuracy, macro_f1=macro_f1, loss=float("nan"))


def _metric_function(num_labels: int) -> Any:
    def compute(prediction: Any) -> dict[str, float]:
        accuracy, macro_f1 = classification_metrics(np.argmax(prediction.predictions, axis=-1).tolist(),
                                                    np.asarray(prediction.label_ids).tolist(), num_labels)
        return {"accuracy": accuracy, "macro_f1": macro_f1}

    return compute


def _metrics(values: dict[str, float], prefix: str) -> Metrics:
    return Metrics(accuracy=values[f"{prefix}_accuracy"], macro_f1=values[f"{prefix}_macro_f1"],
                   loss=values.get(f"{prefix}_loss", float("nan")))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def world_size() -> int:
    """The number of processes of this run (``WORLD_SIZE``, set by torchrun / accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_tracker(name: str) -> None:
    """``ValueError`` with the install line unless the package of tracker ``name`` is installed."""
    if name != "none" and find_spec(TRACKERS[name]) is None:
        raise ValueError(f"--report-to {name} needs the '{TRACKERS[name]}' package, which is not installed: "
                         f"pip install {TRACKERS[name]} (or --report-to none)")


def training_arguments(settings: TrainSettings, output_dir: Path, n_train: int, validate: bool) -> Any:
    """Trainer's arguments for ``settings`` (``max_steps`` from the data size, the global batch split over the ranks)."""
    from transformers import TrainingArguments

    check_tracker(settings.report_to)
    save = settings.save_every is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.total_steps(n_train),
        per_device_train_batch_size=settings.per_device_batch(world_size()),
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        lr_scheduler_type=SCHEDULES[settings.schedule],
        warmup_steps=settings.warmup,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        bf16=settings.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        torch_compile=settings.compile,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        save_strategy="steps" if save else "no",
        save_steps=settings.save_every or 500,
        eval_strategy="epoch" if validate else "no",
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        report_to=settings.report_to,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


class _Recorder(TrainerCallback):
    """Fills a :class:`History` from Trainer's logs and evaluations and times every optimizer step."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.starts: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.history.losses.append(float(logs["loss"]))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if metrics and "eval_accuracy" in metrics:
            self.history.evaluations.append((state.global_step, _metrics(metrics, "eval")))

    def step_seconds(self, ended: float) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], ended])]


def build_trainer(model: nn.Module, settings: TrainSettings, train: Encoded, tokenizer: Any, output_dir: Path,
                  num_labels: int, validation: Encoded | None = None, callbacks: Sequence[Any] = (),
                  adapter: bool = True, run_record: dict[str, Any] | None = None) -> Any:
    """A Trainer for ``model`` on ``train`` with the divergence guard and ``callbacks``, evaluating on
    ``validation`` at epoch ends when given: a :class:`~rankwise.integrations.trainer.RankwiseTrainer`
    for an adapted model (writing ``run_record``, when given, into each checkpoint), a plain ``Trainer``
    (``adapter=False``) for the linear probe."""
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer

    from ..integrations.trainer import DivergenceGuard, RankwiseCallback, RankwiseTrainer

    if len(train) == 0:
        raise ValueError("the training set is empty")
    args = training_arguments(settings, output_dir, len(train), validate=validation is not None)
    optimizers: tuple[Any, Any] = (None, None)
    if settings.optimizer == "lorapro":
        from ..optim import LoRAPro

        optimizers = (LoRAPro(model, lr=settings.lr, weight_decay=settings.weight_decay, directions=True), None)
    guards = [DivergenceGuard(), *([RankwiseCallback(save_final=False)] if adapter else [])]
    trainer = (RankwiseTrainer if adapter else Trainer)(
        model=model, args=args, train_dataset=EncodedDataset(train),
        eval_dataset=EncodedDataset(validation) if validation is not None else None,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_metric_function(num_labels),
        optimizers=optimizers, callbacks=[*guards, *callbacks], **({"run_record": run_record} if adapter else {}),
    )
    trainer.remove_callback(PrinterCallback)  # the logs go to the History (and report_to), not to stdout
    # A sequence classifier's forward takes **kwargs, so Trainer assumes its loss sums over num_items_in_batch and
    # skips dividing by the accumulation steps (and multiplies by the processes under DDP); the loss is a batch
    # mean, so that would make gradients K (or N) times too large, which clipping turns into a different update.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def train_and_test(model: nn.Module, settings: TrainSettings, train: Encoded, test: Encoded, tokenizer: Any,
                   output_dir: Path, num_labels: int, validation: Encoded | None = None,
                   resume: str | Path | None = None, before_training: Any = None,
                   callbacks: Sequence[Any] = (), adapter: bool = True,
                   run_record: dict[str, Any] | None = None) -> Trained:
    """Train ``model`` (evaluating on ``validation`` at epoch ends when given), then test it.

    ``resume``: a checkpoint folder to continue from (Trainer's resume: adapter, optimizer, scheduler,
    RNG states and data position). ``before_training(trainer)`` runs once the Trainer exists and before
    it trains (GoRA's gradient init takes its first batches there). Checkpoints (``settings.save_every``)
    go to ``output_dir``, each with ``run_record`` (when given) as its ``run.json``. ``adapter=False`` trains a
    model without adapter (the probe) with a plain Trainer. Raises
    :class:`~rankwise.integrations.trainer.TrainingDiverged` at a NaN/Inf.
    """
    history = History()
    recorder = _Recorder(history)
    trainer = build_trainer(model, settings, train, tokenizer, output_dir, num_labels, validation,
                            callbacks=[recorder, *callbacks], adapter=adapter, run_record=run_record)
    if before_training is not None:
        before_training(trainer)
    trainable = trainable_parameters(model)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    ended = time.perf_counter()
    tested = trainer.predict(EncodedDataset(test), metric_key_prefix="test").metrics
    return Trained(model=model, trainable=trainable, history=history, test=_metrics(tested, "test"),
                   train_seconds=ended - started, step_seconds=recorder.step_seconds(ended),
                   world_size=trainer.args.world_size)

