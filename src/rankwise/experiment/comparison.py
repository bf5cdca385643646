"""``rankwise compare``: every method on one task at a matched budget over paired seeds, as a resumable sweep:
``compare(CompareConfig(methods=["lora", "dora"], seeds=3, lrs=[1e-3, 2e-3], workers=2, ...))``.

1. Entries: the registered methods, plus ``lorapro`` (LoRA trained with the LoRA-Pro optimizer,
   :class:`rankwise.optim.LoRAPro`; :data:`VARIANTS`). Every entry gets the same split, examples, schedule, batch
   size and targets; its own hyper-parameters are its registry defaults under its ``comparison_defaults`` and
   ``options`` (``--set METHOD.KEY=VALUE``).
2. Budget (:mod:`rankwise.experiment.budget`): with ``budget=N`` or ``budget_like="lora:r=8"`` (the default) every
   entry's size knob is set by :func:`~rankwise.experiment.budget.match_budget` on the chosen targets (the knob's
   value overrides a given option); the row's ``budget_ratio`` is the trained adapter's parameter count / target
   (:func:`achieved_budget`; the matched count, unless the method moves rank before training), and an entry more
   than 10 % off or without a knob keeps the ``reason`` as its ``budget_note`` (marked †). ``budget_like=None``
   and ``budget=None``: every entry at its own size.
3. Learning rate (``lrs``): tuned ONCE per entry, on the first seed's validation macro-F1, and used for every seed.
   Tuning per seed would multiply the cost by the number of seeds while the paired seeds are meant to vary only
   the split, head initialisation and example order; the chosen lr is printed in the table. Full fine-tuning is
   tuned the same way over its own grid (``full_lrs``): an encoder trained in full wants a rate two orders of
   magnitude below an adapter's.
4. Baselines, per seed, in the same table and not ranked: the majority class, the linear probe (head only, at
   ``probe_lr``) and full fine-tuning of the same classifier (every weight trained, ``full_finetune``) as the
   upper reference where it fits in memory: a run whose weights, gradients and AdamW moments
   (16 bytes per parameter) exceed the memory available is skipped with that reason.
5. Runs: each entry × seed (and the baselines per seed) is one run of a :mod:`rankwise.experiment.sweep` sweep file
   in the output folder (``sweep.json``; tuning runs in ``tune.json``) sharing the result folder ``results/``: a
   finished run is never redone on restart, the tuning run at the chosen lr is the first seed's final run, and
   ``workers`` runs them in that many processes. Seed ``s`` draws the split, the head initialisation and the
   example order, so runs with one seed are paired; one seed is a sweep of one. Progress (tqdm, on stderr): one
   bar per sweep file (runs finished / total) and, in one process, one bar for the current run's optimizer steps;
   under ``workers`` the runs stay quiet and only the parent's sweep bar shows.
6. Outputs (:func:`rankwise.experiment.plots.write_comparison`): ``comparison.json``, ``comparison.csv``, the PNG
   plots, ``claims.md`` (each paper's headline claim over LoRA against this run: :mod:`rankwise.experiment.claims`)
   and ``report.md``; mean ± sample standard deviation per entry and the tie marks of
   :mod:`rankwise.experiment.stats`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..core.io import atomic_write, save
from ..core.registry import get_method, methods
from . import claims, plots, sweep
from .budget import Match, match_budget, reference_count
from .pipeline import (
    COMMON_FIELDS,
    SHIPPED_MODEL,
    DataConfig,
    Log,
    adapted_classifier,
    final_ranks,
    full_classifier,
    head_modules,
    linear_probe,
    load_classifier,
    prepare,
    setup_torch,
    train_method,
)
from .timing import available_memory, peak_rss_growth, reset_peak_rss
from .train import Trained, TrainSettings, majority_metrics

RUN_FUNCTION = "rankwise.experiment.comparison:run"
SWEEP_FILE = "sweep.json"
TUNE_FILE = "tune.json"
CLAIMS_FILE = "claims.md"
MAJORITY = "majority class"
PROBE = "linear probe"
FULL = "full fine-tuning"
BASELINES = (MAJORITY, PROBE, FULL)
#: How the error of a run that was not attempted begins (full fine-tuning that does not fit in memory).
SKIPPED = "skipped:"

#: Entries that are a registered method trained with another optimizer: name -> (method, optimizer).
VARIANTS: dict[str, tuple[str, str]] = {"lorapro": ("lora", "lorapro")}

#: Weights, gradients and AdamW's two moments in float32: what full fine-tuning holds per parameter.
FULL_FINETUNE_BYTES_PER_PARAMETER = 16


def entries() -> list[str]:
    """Everything ``compare`` ranks by default: every registered method, then the :data:`VARIANTS` of registered
    methods."""
    registered = methods()
    return [*registered, *(name for name, (method, _) in VARIANTS.items() if method in registered)]


def entry_method(name: str) -> str:
    """The registered method an entry trains (``lorapro`` -> ``lora``); raises for an unknown name."""
    method = VARIANTS[name][0] if name in VARIANTS else name
    get_method(method)
    return method


@dataclass(frozen=True)
class CompareConfig:
    """One ``compare`` sweep (module docstring).

    Args:
        methods: entries (registered methods and :data:`VARIANTS`).
        options: ``{entry: {config field: value, "lr": its own peak lr}}``.
        targets: the layers every entry adapts.
        data, model, settings: the shared task, classifier and training settings (``settings.seed`` is the
            first seed).
        lrs: the grid each entry's lr is tuned over (None: ``settings.lr``).
        probe, probe_lr: the linear-probe baseline and its lr.
        full_finetune, full_lrs: the full fine-tuning baseline and its lr grid.
        budget, budget_like: the matched budget (trainable adapter parameters, or a reference configuration);
            both None: every entry at its own size.
        seeds: paired seeds ``settings.seed, settings.seed + 1, ...``.
        workers: processes running the sweep's runs, each with ``threads`` torch threads.
        save_adapters: save each trained adapter to ``results/<run>/adapter``.
    """

    methods: list[str] = field(default_factory=entries)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[str] | str = "all-linear"
    data: DataConfig = field(default_factory=DataConfig)
    model: str = SHIPPED_MODEL
    settings: TrainSettings = field(default_factory=TrainSettings)
    lrs: list[float] | None = None
    probe: bool = True
    probe_lr: float = 5e-3
    full_finetune: bool = True
    full_lrs: list[float] = field(default_factory=lambda: [1e-4])
    threads: int | None = None
    output_dir: str | None = None
    save_adapters: bool = False
    budget: int | None = None
    budget_like: str | None = "lora:r=8"
    seeds: int = 3
    workers: int = 1


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class _StepBar(TrainerCallback):
    """A tqdm bar over the current run's optimizer steps (below the sweep's bar, removed when the run ends)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: tqdm | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.name, unit="step", position=1,
                        leave=False, dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _step_bars(spec: dict[str, Any]) -> list[TrainerCallback]:
    """The current run's step bar, in the main process only: the runs of ``--workers`` stay quiet (the parent
    shows the sweep's bar)."""
    return [_StepBar(_run_name(spec))] if multiprocessing.parent_process() is None else []


def _quiet(_: str) -> None:
    """A log that drops the line (a run in a worker repeats the data summary the parent printed)."""


# ----------------------------------------------------------------------------------------------
# One run (in this process or a sweep worker)
# ----------------------------------------------------------------------------------------------


def config_summary(values: dict[str, Any]) -> str:
    """An adapter config's own hyper-parameters as ``k=v`` (shared fields, None and flags left out)."""
    own = {key: value for key, value in values.items()
           if key not in COMMON_FIELDS and value is not None and not isinstance(value, (bool, dict, list))}
    return plots.options_text(own) if own else ""


def _record(spec: dict[str, Any], trained: Trained, peak_memory: int | None, **extra: Any) -> dict[str, Any]:
    validation = [{"step": step, "accuracy": m.accuracy, "macro_f1": m.macro_f1} for step, m in trained.history.evaluations]
    return {"method": spec["method"], "seed": spec["seed"], "kind": spec["kind"], "trainable": trained.trainable,
            "accuracy": trained.test.accuracy, "macro_f1": trained.test.macro_f1, "lr": spec["lr"],
            "budget_ratio": spec.get("budget_ratio"), "budget_note": spec.get("budget_note"),
            "train_loss": list(trained.history.losses), "validation": validation, "steps": trained.steps,
            "train_seconds": trained.train_seconds, "step_seconds": trained.seconds_per_step,
            "peak_memory_bytes": peak_memory, "error": None, **extra}


def _failed(spec: dict[str, Any], message: str) -> dict[str, Any]:
    return {"method": spec["method"], "seed": spec["seed"], "kind": spec["kind"], "lr": spec["lr"],
            "budget_ratio": spec.get("budget_ratio"), "budget_note": spec.get("budget_note"), "error": message}


def full_finetune_fits(model: nn.Module) -> str | None:
    """Why full fine-tuning of ``model`` would not fit in the memory available (None when it does, or when the
    available memory is unknown): weights, gradients and AdamW's moments in float32."""
    needed = FULL_FINETUNE_BYTES_PER_PARAMETER * sum(p.numel() for p in model.parameters())
    available = available_memory(next(model.parameters()).device)
    if available is None or needed <= available:
        return None
    return (f"{SKIPPED} full fine-tuning needs about {needed / 2**30:.1f} GiB (weights, gradients and AdamW moments, "
            f"{FULL_FINETUNE_BYTES_PER_PARAMETER} bytes per parameter), {available / 2**30:.1f} GiB available")


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The sweep's run function: one entry (or baseline) at one seed and lr; returns a
    :class:`~rankwise.experiment.plots.RunRecord` as a dict. A run that fails returns a record with its error
    (its result file is written, so a restart does not retry it).

    ``peak_memory_bytes`` is the growth of the process's resident-set high-water mark while the model is built,
    trained and tested, above the resident set just before: the high-water mark is reset per run
    (``/proc/self/clear_refs``), so runs that share a process (one after the other, or in one ``--workers``
    worker) each get their own peak. Memory the allocator kept from an earlier run in the same process can be
    reused without growth, so the figure is a lower bound on the run's own need. None off Linux."""
    setup = spec["setup"]
    seed = spec["seed"]
    settings = dataclasses.replace(TrainSettings(**setup["settings"]), seed=seed)
    setup_torch(None)
    prepared = prepare(DataConfig(**setup["data"]), setup["model"], seed, _quiet)
    if spec["method"] == MAJORITY:
        metrics = majority_metrics(prepared.splits.train.labels, prepared.test.labels, prepared.num_labels)
        return {"method": MAJORITY, "seed": seed, "kind": "baseline", "trainable": 0, "accuracy": metrics.accuracy,
                "macro_f1": metrics.macro_f1}
    before = reset_peak_rss()
    if spec["method"] == PROBE:
        trained = linear_probe(prepared, settings, spec["lr"], workdir, callbacks=_step_bars(spec))
        return _record(spec, trained, peak_rss_growth(before))
    try:
        if spec["method"] == FULL:
            model = full_classifier(prepared, seed)
            if (reason := full_finetune_fits(model)) is not None:
                return _failed(spec, reason)
            trained = train_method(model, prepared, dataclasses.replace(settings, lr=spec["lr"]), workdir,
                                   callbacks=_step_bars(spec), adapter=False)
            return _record(spec, trained, peak_rss_growth(before))
        method = entry_method(spec["method"])
        optimizer = VARIANTS[spec["method"]][1] if spec["method"] in VARIANTS else settings.optimizer
        model, adapter = adapted_classifier(prepared, method, spec["options"], setup["targets"], seed,
                                            settings.total_steps(len(prepared.train)))
        trained = train_method(model, prepared, dataclasses.replace(settings, lr=spec["lr"], optimizer=optimizer),
                               workdir, callbacks=_step_bars(spec))
        if spec.get("save_adapter"):
            save(model, workdir / "adapter")
        return _record(spec, trained, peak_rss_growth(before), config=config_summary(adapter.to_dict()),
                       ranks=final_ranks(model), optimizer=optimizer)
    except Exception as error:  # noqa: BLE001 -- one method failing must not end the comparison of the others
        return _failed(spec, f"{type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def _run_name(spec: dict[str, Any]) -> str:
    lr = "" if spec["lr"] is None else f",lr={spec['lr']:g}"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"{spec['method']},seed={spec['seed']}{lr}")


def _given(config: CompareConfig, name: str) -> dict[str, Any]:
    return {k: v for k, v in config.options.get(name, {}).items() if k != "lr"}


def matched_options(config: CompareConfig, prepared_model: nn.Module) -> dict[str, Match] | None:
    """Each entry's :class:`~rankwise.experiment.budget.Match` under the config's budget (None without one); a
    variant is matched as its method."""
    if config.budget is None and config.budget_like is None:
        return None
    matches = {}
    for name in config.methods:
        method = entry_method(name)
        matches[name] = match_budget(prepared_model, [method], budget=config.budget, budget_like=config.budget_like,
                                     targets=config.targets, options={method: _given(config, name)})[method]
    return matches


def budget_target(config: CompareConfig, classifier: nn.Module) -> int:
    """The budget the entries are matched to: ``config.budget``, or the count of ``budget_like`` on the targets."""
    if config.budget is not None:
        return config.budget
    return reference_count(classifier, config.budget_like, config.targets)


def head_parameters(classifier: nn.Module) -> int:
    """Parameters of the classification head every adapted run trains beside its adapter (``modules_to_save``)."""
    return sum(p.numel() for name in head_modules(classifier) for p in classifier.get_submodule(name).parameters())


def achieved_budget(records: list[plots.RunRecord], target: int, head: int) -> list[plots.RunRecord]:
    """``records`` with each finished entry run's ``budget_ratio`` measured on the model it trained: (its trainable
    parameters − the head's) / ``target``. The matcher's ratio, which the run carries, is the size the entry was
    built at; a method that moves rank before training (GoRA's gradient allocation) trains at another size, which
    this reports."""
    return [dataclasses.replace(r, budget_ratio=(r.trainable - head) / target)
            if r.kind == "method" and r.error is None and r.trainable is not None else r for r in records]


def _method_specs(config: CompareConfig, matches: dict[str, Match] | None, setup: dict[str, Any], seed: int,
                  lr_of: Callable[[str], list[float]]) -> list[dict[str, Any]]:
    specs = []
    for name in config.methods:
        match = matches[name] if matches is not None else None
        options = match.options if match is not None else _given(config, name)
        for lr in lr_of(name):
            spec = {"method": name, "kind": "method", "seed": seed, "lr": lr, "options": options,
                    "budget_ratio": None if match is None else match.ratio,
                    "budget_note": None if match is None else match.reason, "setup": setup}
            if config.save_adapters:
                spec["save_adapter"] = True
            specs.append(spec)
    return specs


def _full_specs(config: CompareConfig, setup: dict[str, Any], seed: int,
                lr_of: Callable[[str], list[float]]) -> list[dict[str, Any]]:
    if not config.full_finetune:
        return []
    return [{"method": FULL, "kind": "baseline", "seed": seed, "lr": lr, "setup": setup} for lr in lr_of(FULL)]


def _execute(directory: Path, name: str, specs: list[dict[str, Any]], workers: int, threads: int | None,
             log: Log) -> list[dict[str, Any]]:
    planned = sweep.write_sweep(directory / name, RUN_FUNCTION, specs, ids=[_run_name(s) for s in specs])
    left = len(sweep.pending(planned))
    log(f"{name}: {len(specs)} runs, {len(specs) - left} already finished")
    with tqdm(total=len(specs), initial=len(specs) - left, desc=name, unit="run", position=0,
              dynamic_ncols=True) as bar:

        def progress(result: dict[str, Any], done: int, total: int) -> None:
            bar.set_postfix_str(f"{result['id']} {result['seconds']:.1f} s", refresh=False)
            bar.update(done - bar.n)

        results = sweep.run_sweep(planned, workers=workers, threads=threads, on_result=progress)
    return [{**r["result"], "options": r["spec"].get("options")} for r in results]


def _rates(config: CompareConfig) -> Callable[[str], list[float]]:
    def rates(name: str) -> list[float]:
        if name == FULL:
            return list(config.full_lrs)
        given = config.options.get(name, {}).get("lr")
        return [float(given)] if given is not None else list(config.lrs or [config.settings.lr])
    return rates


def choose_lrs(tuning: list[dict[str, Any]]) -> dict[str, float]:
    """Each entry's lr with the best final validation macro-F1 among its tuning runs (the first, in the grid's
    order, among equals; a run without validation, e.g. a failed one, counts as the worst)."""
    best: dict[str, tuple[float, float]] = {}
    for record in tuning:
        score = record["validation"][-1]["macro_f1"] if record.get("validation") else float("-inf")
        if record["method"] not in best or score > best[record["method"]][1]:
            best[record["method"]] = (record["lr"], score)
    return {method: lr for method, (lr, _) in best.items()}


def _lr_text(config: CompareConfig, first_seed: int) -> str:
    text = (f"tuned once per entry on seed {first_seed}'s validation macro-F1 from {','.join(f'{r:g}' for r in config.lrs)}"
            if config.lrs else f"{config.settings.lr:g}")
    if config.full_finetune:
        text += f"; full fine-tuning {','.join(f'{r:g}' for r in config.full_lrs)}"
    return text


def compare(config: CompareConfig, log: Log = print) -> dict[str, Any]:
    """Run the comparison of ``config`` as a sweep (module docstring) and write its outputs; return
    ``{"rows", "notes", "claims", "paths", "table", "output_dir", "matches"}``."""
    for name in config.methods:
        entry_method(name)
    setup_torch(config.threads)
    directory = Path(config.output_dir or f"runs/compare-{config.data.name}")
    prepared = prepare(config.data, config.model, config.settings.seed, log)
    classifier = load_classifier(prepared.model_path, prepared.splits.train.label_names)
    matches = matched_options(config, classifier)
    directory.mkdir(parents=True, exist_ok=True)
    setup = {"data": dataclasses.asdict(config.data), "model": config.model, "targets": config.targets,
             "settings": dataclasses.asdict(config.settings)}
    seeds = [config.settings.seed + i for i in range(config.seeds)]
    rates = _rates(config)
    chosen: dict[str, float] = {}
    tuned = [*config.methods, *([FULL] if config.full_finetune else [])]
    if any(len(rates(name)) > 1 for name in tuned):
        tuning = [*_full_specs(config, setup, seeds[0], rates), *_method_specs(config, matches, setup, seeds[0], rates)]
        chosen = choose_lrs(_execute(directory, TUNE_FILE, tuning, config.workers, config.threads, log))

    def final(name: str) -> list[float]:
        return [chosen[name]] if name in chosen else rates(name)

    specs = []
    for seed in seeds:
        specs.append({"method": MAJORITY, "kind": "baseline", "seed": seed, "lr": None, "setup": setup})
        if config.probe:
            specs.append({"method": PROBE, "kind": "baseline", "seed": seed, "lr": config.probe_lr, "setup": setup})
        specs += [*_full_specs(config, setup, seed, final), *_method_specs(config, matches, setup, seed, final)]
    records = _execute(directory, SWEEP_FILE, specs, config.workers, config.threads, log)
    context = {"task": config.data.data or config.data.task, "model": config.model, "targets": str(config.targets),
               "budget": config.budget if config.budget is not None else (config.budget_like or "each method's own"),
               "seeds": ",".join(map(str, seeds)), "train examples": len(prepared.train.labels),
               "steps": config.settings.total_steps(len(prepared.train)), "batch size": config.settings.batch_size,
               "max length": config.data.max_length, "lr": _lr_text(config, seeds[0])}
    loaded = [plots.RunRecord.from_dict(r) for r in records]
    if matches is not None:
        loaded = achieved_budget(loaded, budget_target(config, classifier), head_parameters(classifier))
    found = claims.verdicts(loaded)
    text = claims.claims_markdown(found, context)
    atomic_write(directory / CLAIMS_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    paths = plots.write_comparison(loaded, directory, title=f"rankwise compare: {context['task']}", context=context,
                                   links={CLAIMS_FILE: "each paper's headline claim over LoRA against this run"})
    paths[CLAIMS_FILE] = directory / CLAIMS_FILE
    rows, notes = plots.comparison_rows(loaded)
    return {"rows": rows, "notes": notes, "claims": [v.line() for v in found], "paths": paths,
            "table": plots.table(rows), "output_dir": str(directory),
            "matches": {name: match.to_dict() for name, match in (matches or {}).items()}}


__all__ = [
    "BASELINES",
    "FULL",
    "MAJORITY",
    "PROBE",
    "SKIPPED",
    "VARIANTS",
    "CompareConfig",
    "achieved_budget",
    "budget_target",
    "choose_lrs",
    "compare",
    "config_summary",
    "entries",
    "entry_method",
    "full_finetune_fits",
    "head_parameters",
    "run",
]
