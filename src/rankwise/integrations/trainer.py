"""Train rankwise adapters with ``transformers.Trainer``: adapter files in every checkpoint, checked
start, exact resume, adapter-only atomic checkpoints (:class:`RankwiseTrainer`), a NaN/Inf stop
(:class:`DivergenceGuard`).

Usage::

    import rankwise
    from rankwise.integrations import RankwiseCallback, RankwiseTrainer
    from transformers import Trainer, TrainingArguments

    model = rankwise.adapt(model, rankwise.LoRAConfig(r=8, alpha=16, targets=["query", "value"]))
    args = TrainingArguments(output_dir="out", save_steps=500, report_to=[])
    RankwiseTrainer(model=model, args=args, train_dataset=train).train()   # adds a RankwiseCallback
    # or a plain Trainer, whose checkpoints also hold the full model:
    # Trainer(model=model, args=args, train_dataset=train, callbacks=[RankwiseCallback()]).train()
    model = rankwise.load(fresh_base_model, "out/adapter")    # or "out/checkpoint-500/adapter"

What the callback writes (``rankwise.save``: ``adapter_config.json`` + ``adapter.safetensors``,
adapter and ``modules_to_save`` tensors only, each file written atomically)::

    <output_dir>/checkpoint-<global_step>/adapter/   at every checkpoint (Trainer's on_save)
    <output_dir>/adapter/                            when training ends (after load_best_model_at_end)

What it checks (``ValueError`` with the offending names and what to do):
    * at the start: the model carries a rankwise adapter; the trainable parameters are exactly
      adapter (and ``modules_to_save``) parameters, and at least one of them is trainable; the
      optimizer holds every one of them (an optimizer built before ``rankwise.adapt`` would not);
    * on resume (``Trainer.train(resume_from_checkpoint=...)``): the adapter the Trainer has just loaded
      is the one in ``checkpoint-<step>/adapter`` (same method, config and tensors). Trainer loads a
      checkpoint with ``load_state_dict(strict=False)`` and only logs missing keys, so resuming with a
      model adapted differently would otherwise restart from a fresh adapter without a word;
    * at the first optimizer step: some adapter parameter has a gradient (not the case, for example,
      under reentrant gradient checkpointing with frozen input embeddings, where the adapters would
      silently stay untrained). Adapter layers that got no gradient while others did are a warning.
    The gradient and optimizer checks are skipped under DeepSpeed and FSDP, whose optimizers and
    gradients live in flattened or partitioned copies.

How resume works (checked on transformers 5.24). With a plain ``Trainer`` no rankwise code is needed: a
rankwise-adapted ``PreTrainedModel`` is still that ``PreTrainedModel`` (rankwise wraps layers, not
the model), so each checkpoint's ``model.safetensors`` is its full state dict, written by
``save_pretrained``: frozen base, adapter tensors and buffers (SingLoRA's int64 ``singlora_step``
included), which makes every checkpoint as large as the model. :class:`RankwiseTrainer` writes and
reads ``checkpoint-<step>/adapter`` instead (the frozen base is never copied) and makes each checkpoint
appear atomically. No tensor is shared: an adapter keeps its base layer outside its own state dict. Resume
restores the model's tensors, the optimizer, the scheduler, the RNG states and the data position, so N steps
straight and N/2 steps then a resumed run to N give the same adapter (``tests/test_trainer.py``,
bit-identical on CPU). SingLoRA's ramp-up clock counts calls of ``torch.optim.Optimizer.step`` on
the optimizer that holds its A; Trainer's accelerate wrapper (``AcceleratedOptimizer``) does not
count a second time, so the clock equals ``state.global_step``, including under gradient accumulation.

Rank allocation (AdaLoRA): for a method with an allocator (``rankwise.allocator(model)``) the callback
calls ``allocator.step(state.global_step)`` at every optimizer step, after ``optimizer.step()`` and before
the gradients are zeroed (Trainer's ``on_optimizer_step``; the step index counts from 0, so set the
config's ``total_step`` to ``max_steps``). It adds ``allocator.regularizer()`` to ``outputs.loss`` with a
forward hook on the model in training mode, as PEFT's ``AdaLoraModel.forward`` does (PEFT also adds it to
the evaluation loss; we leave that one the task's loss). A loss computed outside the model, e.g. by a
label smoother, gets no regulariser, as in PEFT. The allocator's state
is saved with every checkpoint's adapter and restored on resume. The callback gives the allocator the
Trainer's optimizer (``allocator.attach_optimizer``): ElaLoRA resizes its state with the adapter's
tensors (resume ElaLoRA on a model built by ``rankwise.load`` from the checkpoint's adapter, whose
layers have that step's ranks). At the end of training the callback
calls ``allocator.finalize()`` before the final save (ARD-LoRA shrinks its adapters there). An allocator
that starts from data (GoRA's gradient init, ``allocator.batches_before_training()`` > 0) gets its
``before_training`` call at the start, on the first batches of the Trainer's train dataloader and the
model's own loss (``outputs.loss``); it runs once: a model initialised by the user, or loaded from a
checkpoint's adapter to resume, already has its ranks. In a multi-process (DDP) Trainer run the callback
refuses ElaLoRA and an uninitialised GoRA: both replace or resize the adapter's tensors, and the Trainer's
DDP wrapper, built before any callback runs, cannot be rebuilt from one. A run that ends without the allocator
ever having allocated (``max_steps`` too short for ``tinit``/``deltaT``) raises ``ValueError`` once the
final adapter is written: it trained a fixed-rank adapter, which is what PEFT does silently.

The callback writes files on the process with ``args.should_save`` only. Under hyper-parameter
search checkpoints live in ``<output_dir>/run-<id>/``; the callback finds ``checkpoint-<step>`` there.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..core.inject import adapted_layers, adapter_config, check_merge, is_adapted, unload
from ..core.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_state,
    check_loadable,
    load,
    read_json,
    read_tensors,
    save,
    save_json,
)
from ..core.rank import Allocator, allocator, load_allocator
from . import TrainingDiverged

ADAPTER_SUBDIR = "adapter"
#: A checkpoint's record of the run that wrote it (``RankwiseTrainer(run_record=...)``), which a resume can check.
RUN_FILE = "run.json"


def load_checkpoint_adapter(base_model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> nn.Module:
    """Adapt ``base_model`` with the adapter saved by :class:`RankwiseCallback` in ``checkpoint_dir``.

    ``checkpoint_dir`` may be a Trainer checkpoint (``out/checkpoint-500``), the run's output directory
    (``out``, for the final adapter) or the adapter folder itself; this is ``rankwise.load`` on
    ``<checkpoint_dir>/adapter``. To continue training, use ``Trainer.train(resume_from_checkpoint=...)``
    on an adapted model instead: it also restores the optimizer, the scheduler and the data position.
    """
    directory = Path(checkpoint_dir)
    if (directory / CONFIG_FILE).is_file():
        return load(base_model, directory)
    if (directory / ADAPTER_SUBDIR / CONFIG_FILE).is_file():
        return load(base_model, directory / ADAPTER_SUBDIR)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_checkpoint_adapter: {directory} does not exist")
    raise FileNotFoundError(
        f"load_checkpoint_adapter: neither {directory} nor {directory / ADAPTER_SUBDIR} holds a rankwise adapter "
        f"({CONFIG_FILE}); was the run trained with RankwiseCallback? Trainer's own model.safetensors there holds "
        "the full adapted model: adapt a base model with the same config and load it with model.load_state_dict"
    )


class RankwiseCallback(TrainerCallback):
    """Save the rankwise adapter with every Trainer checkpoint and at the end, and check the setup.

    Args:
        merge_at_end: when training ends, after the final adapter is written, fold the adapter into
            the base weights and remove it (``rankwise.unload(model, merge=True)``); a model that could not be
            merged (a weight tied to another part of the model, an update with no merged form) is refused when
            training begins, not after it (``rankwise.core.inject.check_merge``). The Trainer's model
            is then the plain architecture, and ``trainer.save_model()`` writes a standard checkpoint
            that ``from_pretrained`` loads. (A merged model that kept its adapter modules would be a
            trap: its full state dict holds the merged weights *and* the adapter, and loading it into
            an adapted model would add the update twice.)
        save_final: write ``<output_dir>/adapter`` when training ends.
        checks: run the start, resume and first-step checks described in the module docstring.
    """

    def __init__(self, merge_at_end: bool = False, save_final: bool = True, checks: bool = True) -> None:
        self.merge_at_end = merge_at_end
        self.save_final = save_final
        self.checks = checks
        self._gradient_checked = False
        self._allocator: Allocator | None = None
        self._regularizer_hook: Any = None

    # -- events ---------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        self._gradient_checked = not self.checks or _sharded(args)
        merged = [name for name, layer in adapted_layers(_adapted(model)) if layer.merged] if model is not None else []
        if merged:
            raise ValueError(
                f"the adapter is merged into the base weights of {len(merged)} layer(s) (first {merged[0]!r}), so its "
                "forward skips the adapter and training could never update it; rankwise.unmerge(model) before training"
            )
        if self.merge_at_end and model is not None:
            check_merge(_adapted(model))  # a merge that would refuse at the end is refused before training
        self._start_allocation(args, state, _adapted(model), optimizer, kwargs.get("train_dataloader"))
        if not self.checks:
            return
        check_trainable(model)
        if optimizer is not None and not _sharded(args):
            check_optimizer(model, optimizer)
        if state.global_step > 0:
            checkpoint = _checkpoint_dir(args, state)
            if checkpoint is not None and (checkpoint / ADAPTER_SUBDIR / CONFIG_FILE).is_file():
                check_resumed(model, checkpoint / ADAPTER_SUBDIR)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._gradient_checked:
            return
        self._gradient_checked = True
        check_gradients(model)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        if self._allocator is not None:
            self._allocator.step(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        if not args.should_save:
            return
        checkpoint = _checkpoint_dir(args, state)
        if checkpoint is None:
            warnings.warn(
                f"RankwiseCallback: no {PREFIX_CHECKPOINT_DIR}-{state.global_step} folder under {args.output_dir}; "
                "the adapter of this checkpoint was not written",
                stacklevel=2,
            )
            return
        save(_adapted(model), checkpoint / ADAPTER_SUBDIR)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        model = _adapted(model)
        if self._allocator is not None:
            self._allocator.finalize()  # before the final save: ARD-LoRA shrinks to its final ranks here
        if self.save_final and args.should_save:
            save(model, Path(args.output_dir) / ADAPTER_SUBDIR)
        held, self._allocator = self._allocator, None
        if self._regularizer_hook is not None:
            self._regularizer_hook.remove()
            self._regularizer_hook = None
        if held is not None and held.allocations == 0:
            raise ValueError(
                f"RankwiseCallback: training ended after {state.global_step} steps but the "
                f"{adapter_config(model).method} allocator never allocated, so the adapter kept its initial rank "
                "everywhere. Set the config's total_step to max_steps and tinit / tfinal / deltaT so that the budget "
                "phase falls inside the run"
            )
        if self.merge_at_end:
            unload(model, merge=True)

    # -- rank allocation -------------------------------------------------------------------------

    def _start_allocation(self, args: TrainingArguments, state: TrainerState, model: nn.Module,
                          optimizer: Any, train_dataloader: Any) -> None:
        """Take the model's allocator (restoring its state on resume), run its data-driven start, give it the
        optimizer, and hook its regulariser into the loss."""
        self._allocator = allocator(model)
        if self._allocator is None:
            return
        method = adapter_config(model).method
        if self._allocator.resizes and args.world_size > 1:
            raise ValueError(
                f"RankwiseCallback: {method} resizes the adapter's tensors during training, but transformers.Trainer "
                f"wraps the model in DistributedDataParallel once, inside its training loop, where a callback cannot "
                f"rebuild it; the stale wrapper would stop all-reducing the resized gradients and the "
                f"{args.world_size} processes would drift apart. Train {method} in one process, or in your own loop "
                "with ddp = rankwise.allocation.rewrap_ddp(ddp) after every allocator.step, or use adalora (it masks "
                "components without resizing)"
            )
        _before_training(self._allocator, args, state, model, optimizer, train_dataloader, method)
        if optimizer is not None:
            self._allocator.attach_optimizer(optimizer)  # ElaLoRA resizes the optimizer's state with the adapter
        if state.global_step > 0:
            checkpoint = _checkpoint_dir(args, state)
            if checkpoint is not None:
                load_allocator(model, checkpoint / ADAPTER_SUBDIR)
        held = self._allocator

        def add_regularizer(module: nn.Module, inputs: Any, outputs: Any) -> Any:
            term = held.regularizer()
            if term is not None and module.training and isinstance(getattr(outputs, "loss", None), torch.Tensor):
                outputs.loss = outputs.loss + term  # ModelOutput keeps its "loss" key in step
            return outputs

        if self._regularizer_hook is None:
            self._regularizer_hook = model.register_forward_hook(add_regularizer)


def _before_training(held: Allocator, args: TrainingArguments, state: TrainerState, model: nn.Module,
                     optimizer: Any, train_dataloader: Any, method: str) -> None:
    """``allocator.before_training`` (GoRA's gradient init) on the first ``allocator.batches_before_training()``
    batches of the Trainer's train dataloader, with the model's own loss (``outputs.loss``).

    Nothing to do once the allocator has its start (a model initialised by the user, or loaded from a
    checkpoint's adapter, which holds the allocated ranks). It runs with torch's random state forked (the
    dataloader's shuffle, GoRA's draws of A, dropout), so the training loop sees the random state it would have
    seen without it, and its first epoch starts with the same batches. Parameters the start
    replaces (GoRA builds new adapters) take the place of the old ones in the optimizer's parameter groups:
    the Trainer built its optimizer, and its learning-rate schedule, before ``on_train_begin``.
    """
    count = held.batches_before_training()
    if count == 0:
        return
    if state.global_step > 0:
        raise ValueError(
            f"RankwiseCallback: resuming at step {state.global_step} with a {method} model that never ran its "
            "allocation before training; the checkpoint's adapter holds the allocated ranks: build the model with "
            "rankwise.load(base_model, '<checkpoint>/adapter') (or load_checkpoint_adapter) before resuming"
        )
    if args.world_size > 1:
        raise ValueError(
            f"RankwiseCallback: {method} allocates from data before training, which replaces the adapter's "
            "parameters, but transformers.Trainer has already wrapped the model in DistributedDataParallel and "
            "a callback cannot rebuild that wrapper. Run the allocation before building the Trainer, on every "
            "process (e.g. rankwise.allocation.gora.initialize(model, batches, loss_fn); it all-reduces the "
            "gradients)"
        )
    if train_dataloader is None:
        raise ValueError(f"RankwiseCallback: {method} needs {count} training batches before training, but the "
                         "Trainer passed no train_dataloader to on_train_begin; run the allocation yourself first")
    before = dict(model.named_parameters())
    devices = sorted({p.device.index or 0 for p in before.values() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the training loop then sees the random state it would have
        held.before_training(_first_batches(train_dataloader, count), _model_loss)
    if optimizer is not None:
        _follow_replaced_parameters(optimizer, before, dict(model.named_parameters()))


def _first_batches(dataloader: Any, count: int) -> list[Any]:
    """The first ``count`` batches of ``dataloader`` (fewer if it is shorter).

    An accelerate ``DataLoaderShard`` registers itself with accelerate's gradient state while it is iterated
    and leaves only at the end of a full pass; it is told it ended (``end()``) after the partial pass."""
    iterator = iter(dataloader)
    batches = list(itertools.islice(iterator, count))
    close = getattr(iterator, "close", None)
    if callable(close):
        close()
    end = getattr(dataloader, "end", None)
    if callable(end):
        end()
    return batches


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss the model computes itself, ``model(**batch).loss``."""
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("RankwiseCallback: the model returned no loss for a training batch, so the allocation "
                         "before training has no gradient; the batches must hold the labels (as Trainer's do)")
    return loss


def _follow_replaced_parameters(optimizer: Any, before: dict[str, nn.Parameter],
                                after: dict[str, nn.Parameter]) -> None:
    """Put every parameter of ``after`` in the place its name held in ``before`` in ``optimizer``'s groups."""
    if set(before) != set(after):
        changed = sorted(set(before) ^ set(after))
        raise ValueError(f"RankwiseCallback: the allocation before training added or removed parameters "
                         f"({_limited(changed)}), which the Trainer's optimizer cannot follow")
    replaced = {id(old): after[name] for name, old in before.items() if old is not after[name]}
    for name, old in before.items():
        if old is not after[name]:
            optimizer.state.pop(old, None)  # none before the first step; it would have the old shape
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]


# ----------------------------------------------------------------------------------------------
# The checks (public so that custom training loops can run them too)
# ----------------------------------------------------------------------------------------------


def _adapted(model: nn.Module | None) -> nn.Module:
    if model is None or not is_adapted(model):
        name = type(model).__name__
        raise ValueError(
            f"RankwiseCallback: the Trainer's model ({name}) carries no rankwise adapter. Adapt it before building "
            "the Trainer: model = rankwise.adapt(model, rankwise.LoRAConfig(...)); Trainer(model=model, ...)"
        )
    adapter_config(model)  # a model whose adapter config was lost raises its own clear error
    return model


def _limited(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_trainable(model: nn.Module | None) -> None:
    """``ValueError`` unless the model is adapted and exactly its adapter (and ``modules_to_save``)
    parameters, at least one of them, require gradients."""
    model = _adapted(model)
    allowed = {id(tensor) for tensor in adapter_state(model, keep_vars=True).values()}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    extra = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in allowed]
    if extra:
        raise ValueError(
            f"RankwiseCallback: parameters outside the rankwise adapter are trainable: {_limited(extra)}. "
            "rankwise.adapt freezes the base model; something unfroze these afterwards (e.g. "
            "model.requires_grad_(True)). Freeze them again, or "
            "list their modules in the config's modules_to_save to train and save them with the adapter"
        )
    if not trainable:
        raise ValueError(
            "RankwiseCallback: the model has a rankwise adapter but no parameter requires gradients, so "
            "training would change nothing; do not freeze the adapter (rankwise.adapt leaves it trainable)"
        )


def check_optimizer(model: nn.Module, optimizer: Any) -> None:
    """``ValueError`` if a trainable adapter parameter is missing from ``optimizer``'s parameter groups."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"RankwiseCallback: the optimizer does not hold the trainable parameter(s) {_limited(missing)}, so they "
            "would never be updated. Build the optimizer after rankwise.adapt (or let the Trainer build it)"
        )


def check_gradients(model: nn.Module | None) -> None:
    """After a backward pass: ``ValueError`` if no trainable adapter parameter has a gradient, a warning
    naming the adapted layers that have none while others do."""
    model = _adapted(model)
    without: list[str] = []
    with_grad = 0
    for name, layer in adapted_layers(model):
        params = [p for p in layer.adapter.parameters() if p.requires_grad]
        if not params:
            continue
        if any(p.grad is not None for p in params):
            with_grad += 1
        else:
            without.append(name)
    if without and not with_grad:
        raise ValueError(
            "RankwiseCallback: after the first backward pass no adapter parameter has a gradient, so training "
            "would not change the adapter. The usual cause is gradient checkpointing (use_reentrant=True) with "
            "frozen input embeddings: call model.enable_input_require_grads(), or pass {'use_reentrant': False} "
            "as TrainingArguments' activation_checkpointing_kwargs (gradient_checkpointing_kwargs before "
            "transformers 5)"
        )
    if without:
        warnings.warn(
            f"RankwiseCallback: the adapters of {_limited(without)} got no gradient at the first step (layers "
            "that the forward pass does not use?); they will not be trained",
            stacklevel=2,
        )


def check_resumed(model: nn.Module, saved: Path) -> None:
    """``ValueError`` unless the model's adapter equals the one saved in ``saved`` (config and tensors)."""
    model = _adapted(model)
    payload = read_json(saved / CONFIG_FILE, "RankwiseCallback")
    config = adapter_config(model)
    ours = json.loads(json.dumps(config.to_dict()))
    if payload.get("method") != config.method or payload.get("config") != ours:
        raise ValueError(
            f"RankwiseCallback: resuming from {saved.parent}, whose adapter is {payload.get('method')!r} with "
            f"{payload.get('config')}, but the model is adapted with {config.method!r} and {ours}. Adapt the "
            "base model with the checkpoint's config before resuming"
        )
    tensors = read_tensors(saved / WEIGHTS_FILE, "RankwiseCallback")
    state = adapter_state(model)
    differ = sorted(set(tensors) ^ set(state))
    differ += [k for k in sorted(set(tensors) & set(state))
               if not torch.equal(state[k].detach().to("cpu", tensors[k].dtype), tensors[k])]
    if differ:
        raise ValueError(
            f"RankwiseCallback: after Trainer loaded {saved.parent}, the model's adapter differs from the one "
            f"saved there ({_limited(differ)}): Trainer loads checkpoints with strict=False, so tensors that do "
            "not match are skipped and stay at their fresh values. Adapt the same base model with the same "
            "config before resuming (or pass checks=False if this checkpoint folder belongs to another run)"
        )


def _sharded(args: TrainingArguments) -> bool:
    """DeepSpeed or FSDP: parameters, gradients and optimizer state live in other tensors."""
    return bool(getattr(args, "deepspeed", None)) or bool(getattr(args, "fsdp", None))


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path | None:
    """The folder Trainer wrote for ``state.global_step``: ``<output_dir>/checkpoint-<step>``, or under a
    hyper-parameter-search run folder (the newest one)."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    root = Path(args.output_dir)
    if (root / name).is_dir():
        return root / name
    found = [p for p in root.glob(f"*/{name}") if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ----------------------------------------------------------------------------------------------
# Adapter-only, atomic checkpoints; a guard against divergence
# ----------------------------------------------------------------------------------------------


def load_adapter_tensors(model: nn.Module, directory: Path) -> None:
    """Copy the adapter tensors saved in ``directory`` (``rankwise.save``) into the already adapted ``model``.

    ``ValueError`` naming the tensors when the keys or shapes differ from the model's adapter (the
    checkpoint belongs to another method, config or base model), before any tensor is copied."""
    model = _adapted(model)
    tensors = read_tensors(directory / WEIGHTS_FILE, "RankwiseTrainer")
    state = adapter_state(model, keep_vars=True)
    differ = sorted(set(tensors) ^ set(state))
    differ += [k for k in sorted(set(tensors) & set(state)) if tuple(tensors[k].shape) != tuple(state[k].shape)]
    if differ:
        raise ValueError(
            f"RankwiseTrainer: the adapter in {directory} does not fit the model's adapter ({_limited(differ)} "
            "differ in name or shape). Adapt the same base model with the checkpoint's config before resuming "
            "(ElaLoRA changes ranks while training: resume it on rankwise.load(base, <checkpoint>/adapter))"
        )
    for key, value in tensors.items():
        check_loadable(key, value, state[key], str(directory))
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)


class RankwiseTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints hold the adapter only and appear atomically.

    * Every checkpoint and ``save_model`` writes ``rankwise.save(model, <dir>/adapter)`` (adapter and
      ``modules_to_save`` tensors, allocator state) instead of ``save_pretrained``'s full
      ``model.safetensors``: the frozen base model is never copied into a checkpoint. The optimizer,
      scheduler, RNG states and ``trainer_state.json`` (data position) are Trainer's own files.
    * A checkpoint is written in full under ``<run dir>/.partial-checkpoint-<step>/`` and renamed to
      ``checkpoint-<step>`` only when every file (every rank's RNG state included) is there, so a process
      killed while saving leaves the previous checkpoints intact and the partial folder is never taken
      for a checkpoint (Trainer resumes only from ``checkpoint-<digits>``). The rename is atomic on one
      file system; files are not fsync'ed, so this protects against a killed process, not a power loss.
    * Resume (``train(resume_from_checkpoint=...)``) copies the checkpoint's adapter tensors into the
      model (strict: names and shapes must match) and ``load_best_model_at_end`` does the same with the
      best checkpoint; a checkpoint written by a plain Trainer (``model.safetensors``) still loads the
      plain way.

    * ``run_record``: a JSON object (what shapes the run: method options, learning rate, ...) written as
      ``run.json`` (:data:`RUN_FILE`) into every checkpoint before it is renamed, so a checkpoint always says
      which run it belongs to and a resume can refuse other options (``rankwise finetune --resume``).

    A :class:`RankwiseCallback` is added unless ``callbacks`` holds one (it writes the final adapter,
    steps allocators and runs the checks).
    """

    def __init__(self, *args: Any, run_record: dict[str, Any] | None = None, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, RankwiseCallback) or c is RankwiseCallback for c in callbacks):
            callbacks.append(RankwiseCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._staging: str | None = None
        self.run_record = run_record

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save(_adapted(self.accelerator.unwrap_model(self.model)), Path(output_dir or self.args.output_dir) / ADAPTER_SUBDIR)

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return run_dir if self._staging is None else os.path.join(run_dir, self._staging)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".partial-{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a process killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging = staging.name
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's RNG file is in the staging folder
        if self.args.should_save:
            if self.run_record is not None:
                save_json(staging / name / RUN_FILE, self.run_record)
            final = run_dir / name
            if self.state.best_model_checkpoint == str(staging / name):
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
            if final.exists():
                shutil.rmtree(final)  # the same step saved again (a resumed run that re-saves its start)
            os.replace(staging / name, final)
            staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        saved = Path(resume_from_checkpoint) / ADAPTER_SUBDIR
        if not (saved / CONFIG_FILE).is_file():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_adapter_tensors(self.accelerator.unwrap_model(model if model is not None else self.model), saved)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not (Path(best) / ADAPTER_SUBDIR / CONFIG_FILE).is_file():
            super()._load_best_model()
            return
        load_adapter_tensors(self.accelerator.unwrap_model(self.model), Path(best) / ADAPTER_SUBDIR)


class DivergenceGuard(TrainerCallback):
    """Stop training at the first NaN or Inf training loss or gradient, before the optimizer applies it.

    A forward hook notes a non-finite ``outputs.loss`` of the model in training mode; before every
    optimizer step the gradients of the trainable parameters are checked. Either raises
    :class:`TrainingDiverged` naming the optimizer step (1-based, the number of the checkpoint it would
    have produced) and the parameters whose gradient is not finite. Nothing is saved after the raise,
    so the last checkpoint on disk is the last good one. Under DDP the gradients are averaged over the
    ranks before the check, so a NaN on one rank stops every rank at the same step.
    """

    def __init__(self) -> None:
        self._bad_loss: float | None = None
        self._hook: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self._bad_loss = None

        def note(module: nn.Module, inputs: Any, outputs: Any) -> None:
            loss = getattr(outputs, "loss", None)
            if (module.training and self._bad_loss is None and isinstance(loss, torch.Tensor)
                    and not bool(torch.isfinite(loss.detach()).all())):
                self._bad_loss = float(loss.detach().float().sum())

        if self._hook is None and model is not None:
            self._hook = model.register_forward_hook(note)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        bad = [name for name, p in model.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if self._bad_loss is None and not bad:
            return
        self._remove()
        step = state.global_step + 1
        loss = "" if self._bad_loss is None else f"the training loss was {self._bad_loss}"
        grads = f"the gradient of {_limited(bad)} is not finite" if bad else ""
        raise TrainingDiverged(
            f"training diverged at optimizer step {step}: {' and '.join(p for p in (loss, grads) if p)}. The step "
            f"was not applied and nothing was saved after it; the last checkpoint (if any) is step "
            f"{_last_saved(args, state)}. Lower the learning rate (or add warm-up) and resume from it"
        )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _last_saved(args: TrainingArguments, state: TrainerState) -> int | str:
    """The step of the newest complete checkpoint under ``args.output_dir``, or ``none``."""
    root = Path(args.output_dir)
    steps = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()] if root.is_dir() else []
    return max(steps) if steps else "none"


__all__ = ["DivergenceGuard", "RankwiseCallback", "RankwiseTrainer", "TrainingDiverged", "load_adapter_tensors",
           "load_checkpoint_adapter"]
