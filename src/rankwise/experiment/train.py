"""The training loop, evaluation and metrics for sequence classification.

The loop is deterministic given its seed: the example order of epoch ``e`` is a permutation drawn
from ``seed + e``, the learning rate is a pure function of the step (linear decay to zero), and a
checkpoint holds the adapter (``rankwise.save``), the optimizer state and the RNG state. So a run
saved at step ``k`` and resumed on a fresh base model continues with the same numbers as a run that
never stopped.

An allocating method (``rankwise.allocator(model)``, e.g. AdaLoRA) is stepped after every optimizer
step; a run that reaches its last step without the allocator ever having allocated raises
``ValueError``, as ``RankwiseCallback`` does under ``transformers.Trainer``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.inject import adapter_config, is_adapted
from ..core.io import load, save
from ..core.rank import allocator as model_allocator

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"
OPTIMIZERS = ("adamw", "lorapro")


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples (unpadded ids) with their labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast to train.

    Args:
        epochs: passes over the training set (ignored when ``steps`` is set).
        steps: total optimizer steps, overriding ``epochs``.
        batch_size: examples per step.
        lr: peak learning rate of AdamW; it decays linearly to zero at the last step.
        seed: seeds the example order and dropout.
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"``, or ``"lorapro"`` (:class:`rankwise.optim.LoRAPro`: AdamW on LoRA-Pro's
            equivalent gradient for the two-factor adapters, DoRA's and BoRA's on their direction
            (``directions=True``), plain AdamW for every other trainable tensor).
    """

    epochs: float = 2.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")

    def steps_per_epoch(self, n_examples: int) -> int:
        return max(1, math.ceil(n_examples / self.batch_size))

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(n_examples)))


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


# ----------------------------------------------------------------------------------------------
# Metrics and evaluation
# ----------------------------------------------------------------------------------------------


def classification_metrics(predictions: list[int], labels: list[int], num_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class never predicted nor present scores 0)."""
    if not labels:
        raise ValueError("cannot compute metrics on an empty dataset")
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        predicted = sum(p == c for p in predictions)
        actual = sum(y == c for y in labels)
        f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return accuracy, sum(f1s) / num_labels


def majority_metrics(train_labels: list[int], test_labels: list[int], num_labels: int) -> Metrics:
    """The majority-class baseline: always predict the most frequent training label."""
    majority = max(range(num_labels), key=train_labels.count)
    accuracy, macro_f1 = classification_metrics([majority] * len(test_labels), test_labels, num_labels)
    return Metrics(accuracy=accuracy, macro_f1=macro_f1, loss=float("nan"))


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, Tensor]:
    """A padded batch (padded to its own longest example)."""
    rows = [data.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([data.labels[i] for i in indices])}


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, pad_id: int, num_labels: int, batch_size: int = 64) -> Metrics:
    """Accuracy, macro-F1 and mean cross-entropy of ``model`` on ``data`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    total_loss = 0.0
    try:
        for start in range(0, len(data), batch_size):
            batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id)
            output = model(**batch)
            total_loss += float(output.loss) * len(batch["labels"])
            predictions.extend(output.logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    accuracy, macro_f1 = classification_metrics(predictions, data.labels, num_labels)
    return Metrics(accuracy=accuracy, macro_f1=macro_f1, loss=total_loss / len(data))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on ``seed`` and ``epoch``."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """``settings.optimizer`` over the parameters that require gradients (AdamW, or LoRA-Pro)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; adapt it or unfreeze a module first")
    if settings.optimizer == "lorapro":
        from ..optim import LoRAPro

        return LoRAPro(model, lr=settings.lr, weight_decay=settings.weight_decay, directions=True)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def train(
    model: nn.Module,
    train_data: Encoded,
    settings: TrainSettings,
    pad_id: int,
    validation: Encoded | None = None,
    num_labels: int = 2,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    history: History | None = None,
    description: str = "train",
) -> tuple[History, torch.optim.Optimizer]:
    """Train from ``start_step`` to ``stop_step`` (default: the last step); evaluate on ``validation`` at epoch ends.

    Pass the ``optimizer`` and ``start_step`` of a checkpoint (see :func:`load_checkpoint`) to resume.
    A fresh run (``start_step == 0``) seeds torch with ``settings.seed``. ``ValueError`` when the last
    step is reached and the model's allocator (if it has one) never allocated.
    """
    if len(train_data) == 0:
        raise ValueError("the training set is empty")
    total = settings.total_steps(len(train_data))
    stop = total if stop_step is None else min(stop_step, total)
    per_epoch = settings.steps_per_epoch(len(train_data))
    optimizer = optimizer or make_optimizer(model, settings)
    history = history or History()
    if start_step == 0:
        torch.manual_seed(settings.seed)
    model.train()
    allocator = model_allocator(model) if is_adapted(model) else None  # AdaLoRA: stepped in PEFT's order below
    if allocator is not None:
        allocator.attach_optimizer(optimizer)  # ElaLoRA resizes the optimizer's state with the adapter
    progress = tqdm(range(start_step, stop), desc=description, unit="step", leave=False)
    for step in progress:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(len(train_data), settings.seed, epoch)
        batch = collate(train_data, order[offset * settings.batch_size : (offset + 1) * settings.batch_size], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * (1.0 - step / total)
        loss = model(**batch).loss
        if allocator is not None and (term := allocator.regularizer()) is not None:
            loss = loss + term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step(step)
        history.losses.append(loss.item())
        progress.set_postfix(loss=f"{history.losses[-1]:.4f}")
        if validation is not None and ((step + 1) % per_epoch == 0 or step + 1 == total):
            metrics = evaluate(model, validation, pad_id, num_labels)
            history.evaluations.append((step + 1, metrics))
            logger.info("step %d: validation accuracy %.4f, macro-F1 %.4f", step + 1, metrics.accuracy, metrics.macro_f1)
    progress.close()
    if allocator is not None and stop == total:
        if allocator.allocations == 0:
            raise ValueError(
                f"training ended after {total} steps but the {adapter_config(model).method} allocator never "
                "allocated, so the adapter kept its initial rank everywhere (a fixed-rank adapter, which PEFT trains "
                "silently). Set the config's total_step to the run's steps and tinit / tfinal / deltaT so that the "
                "budget phase falls inside the run"
            )
        allocator.finalize()  # ARD-LoRA shrinks its adapters to their final ranks; the optimizer is done with them
    return history, optimizer


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, directory: str | Path) -> Path:
    """Write the adapter (``rankwise.save``) plus optimizer and RNG state, enough to resume exactly."""
    directory = save(model, directory)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    torch.save(state, directory / TRAINING_STATE_FILE)
    return directory


def load_checkpoint(
    base_model: nn.Module, directory: str | Path, settings: TrainSettings
) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """Adapt ``base_model`` from a checkpoint; return it with its optimizer and the step to resume from."""
    directory = Path(directory)
    state_path = directory / TRAINING_STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} does not exist; {directory} is not a checkpoint written by save_checkpoint")
    model = load(base_model, directory)
    state = torch.load(state_path, weights_only=True)
    optimizer = make_optimizer(model, settings)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return model, optimizer, int(state["step"])
