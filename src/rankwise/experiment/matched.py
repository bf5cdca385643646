"""``rankwise compare`` at a matched budget over several seeds, as a resumable sweep:
``compare_matched(CompareConfig(budget_like="lora:r=8", seeds=3, workers=2, ...))``.

1. Budget (:mod:`rankwise.experiment.budget`): with ``budget=N`` or ``budget_like="lora:r=8"`` every method's
   size knob is set by :func:`~rankwise.experiment.budget.match_budget` on the chosen targets (given ``--set``
   options are kept; the knob's value overrides them); its achieved count / target is the row's ``budget_ratio``,
   and a method more than 10 % off or without a knob keeps the ``reason`` as its ``budget_note`` (marked †).
2. Learning rate (``lrs``): tuned ONCE per method, on seed 0's validation macro-F1, and used for every seed.
   Tuning per seed would multiply the cost by the number of seeds while the paired seeds are meant to vary
   only the split, head initialisation and example order; the chosen lr is printed in the table.
3. Runs: each method × seed (and the majority-class and linear-probe baselines per seed) is one run of a
   :mod:`rankwise.experiment.sweep` sweep file in the output folder (``sweep.json``; tuning runs in
   ``tune.json``), sharing the result folder ``results/``: a finished run is never redone on restart, the
   tuning run at the chosen lr is seed 0's final run, and ``workers`` runs them in that many processes.
   Seed ``s`` draws the split, the head initialisation and the example order, so runs with one seed are paired.
   Progress (tqdm, on stderr): one bar per sweep file (runs finished / total) and, in one process, one bar for the
   current run's optimizer steps; under ``workers`` the runs stay quiet and only the parent's sweep bar shows.
   Each run records its peak memory (:func:`run`) for the memory column and plot.
4. Outputs (:func:`rankwise.experiment.plots.write_comparison`): ``comparison.json``, ``comparison.csv``, the
   PNG plots and ``report.md``; mean ± sample standard deviation per method and the tie marks of
   :mod:`rankwise.experiment.stats`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import plots, sweep
from .budget import Match, match_budget
from .comparison import CompareConfig
from .pipeline import (
    DataConfig,
    Log,
    adapted_classifier,
    linear_probe,
    load_classifier,
    prepare,
    setup_torch,
    train_method,
)
from .timing import peak_rss_growth, reset_peak_rss
from .train import Trained, TrainSettings, majority_metrics

RUN_FUNCTION = "rankwise.experiment.matched:run"
SWEEP_FILE = "sweep.json"
TUNE_FILE = "tune.json"
MAJORITY = "majority class"
PROBE = "linear probe"


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


def _record(spec: dict[str, Any], trained: Trained, peak_memory: int | None) -> dict[str, Any]:
    validation = [{"step": step, "accuracy": m.accuracy, "macro_f1": m.macro_f1} for step, m in trained.history.evaluations]
    return {"method": spec["method"], "seed": spec["seed"], "kind": spec["kind"], "trainable": trained.trainable,
            "accuracy": trained.test.accuracy, "macro_f1": trained.test.macro_f1, "lr": spec["lr"],
            "budget_ratio": spec.get("budget_ratio"), "budget_note": spec.get("budget_note"),
            "train_loss": list(trained.history.losses), "validation": validation,
            "step_seconds": trained.seconds_per_step, "peak_memory_bytes": peak_memory, "error": None}


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The sweep's run function: one method (or baseline) at one seed and lr; returns a
    :class:`~rankwise.experiment.plots.RunRecord` as a dict. A method that fails returns a record with its error
    (its result file is written, so a restart does not retry it).

    ``peak_memory_bytes`` is the growth of the process's resident-set high-water mark while the adapted model (or
    the probe) is built, trained and tested, above the resident set just before: the high-water mark is reset
    per run (``/proc/self/clear_refs``), so runs that share a process (one after the other, or in one
    ``--workers`` worker) each get their own peak. Memory the allocator kept from an earlier run in the same
    process can be reused without growth, so the figure is a lower bound on the run's own need. None off Linux."""
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
        model, _ = adapted_classifier(prepared, spec["method"], spec["options"], setup["targets"], seed,
                                      settings.total_steps(len(prepared.train)))
        trained = train_method(model, prepared, dataclasses.replace(settings, lr=spec["lr"]), workdir,
                               callbacks=_step_bars(spec))
        return _record(spec, trained, peak_rss_growth(before))
    except Exception as error:  # noqa: BLE001 -- one method failing must not end the comparison of the others
        return {"method": spec["method"], "seed": seed, "kind": "method", "lr": spec["lr"],
                "budget_ratio": spec.get("budget_ratio"), "budget_note": spec.get("budget_note"),
                "error": f"{type(error).__name__}: {error}"}


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def _run_name(spec: dict[str, Any]) -> str:
    lr = "" if spec["lr"] is None else f",lr={spec['lr']:g}"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"{spec['method']},seed={spec['seed']}{lr}")


def matched_options(config: CompareConfig, prepared_model: Any) -> dict[str, Match] | None:
    """Each method's :class:`~rankwise.experiment.budget.Match` under the config's budget (None without one)."""
    if config.budget is None and config.budget_like is None:
        return None
    given = {m: {k: v for k, v in config.options.get(m, {}).items() if k != "lr"} for m in config.methods}
    return match_budget(prepared_model, config.methods, budget=config.budget, budget_like=config.budget_like,
                        targets=config.targets, options=given)


def _method_specs(config: CompareConfig, matches: dict[str, Match] | None, setup: dict[str, Any], seed: int,
                  lr_of: Callable[[str], list[float]]) -> list[dict[str, Any]]:
    specs = []
    for method in config.methods:
        match = matches[method] if matches is not None else None
        options = match.options if match is not None else {k: v for k, v in config.options.get(method, {}).items()
                                                           if k != "lr"}
        for lr in lr_of(method):
            specs.append({"method": method, "kind": "method", "seed": seed, "lr": lr, "options": options,
                          "budget_ratio": None if match is None else match.ratio,
                          "budget_note": None if match is None else match.reason, "setup": setup})
    return specs


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
    return [r["result"] for r in results]


def _rates(config: CompareConfig) -> Callable[[str], list[float]]:
    def rates(method: str) -> list[float]:
        given = config.options.get(method, {}).get("lr")
        return [float(given)] if given is not None else list(config.lrs or [config.settings.lr])
    return rates


def choose_lrs(tuning: list[dict[str, Any]]) -> dict[str, float]:
    """Each method's lr with the best final validation macro-F1 among its tuning runs (the first, in the grid's
    order, among equals; a run without validation, e.g. a failed one, counts as the worst)."""
    best: dict[str, tuple[float, float]] = {}
    for record in tuning:
        score = record["validation"][-1]["macro_f1"] if record.get("validation") else float("-inf")
        if record["method"] not in best or score > best[record["method"]][1]:
            best[record["method"]] = (record["lr"], score)
    return {method: lr for method, (lr, _) in best.items()}


def compare_matched(config: CompareConfig, log: Log = print) -> dict[str, Any]:
    """Run the comparison of ``config`` as a sweep (module docstring) and write its outputs; return
    ``{"rows": ..., "notes": ..., "paths": ..., "table": ..., "output_dir": ...}``."""
    setup_torch(config.threads)
    directory = Path(config.output_dir or f"runs/compare-{config.data.data or config.data.task}")
    directory.mkdir(parents=True, exist_ok=True)
    prepared = prepare(config.data, config.model, config.settings.seed, log)
    matches = matched_options(config, load_classifier(prepared.model_path, prepared.splits.train.label_names))
    setup = {"data": dataclasses.asdict(config.data), "model": config.model, "targets": config.targets,
             "settings": dataclasses.asdict(config.settings)}
    seeds = [config.settings.seed + i for i in range(config.seeds)]
    rates = _rates(config)
    chosen: dict[str, float] = {}
    if any(len(rates(m)) > 1 for m in config.methods):
        chosen = choose_lrs(_execute(directory, TUNE_FILE, _method_specs(config, matches, setup, seeds[0], rates),
                                     config.workers, config.threads, log))
    specs = []
    for seed in seeds:
        specs.append({"method": MAJORITY, "kind": "baseline", "seed": seed, "lr": None, "setup": setup})
        if config.probe:
            specs.append({"method": PROBE, "kind": "baseline", "seed": seed, "lr": config.probe_lr, "setup": setup})
        specs += _method_specs(config, matches, setup, seed,
                               lambda m: [chosen[m]] if m in chosen else rates(m))
    records = _execute(directory, SWEEP_FILE, specs, config.workers, config.threads, log)
    context = {"task": config.data.data or config.data.task, "model": config.model, "targets": str(config.targets),
               "budget": config.budget if config.budget is not None else config.budget_like,
               "seeds": ",".join(map(str, seeds)), "steps": config.settings.total_steps(len(prepared.train)),
               "lr": "tuned once per method on seed " + str(seeds[0]) + "'s validation macro-F1 from "
                     + ",".join(f"{r:g}" for r in config.lrs) if config.lrs else f"{config.settings.lr:g}"}
    paths = plots.write_comparison(records, directory, title=f"rankwise compare: {context['task']}", context=context)
    rows, notes = plots.comparison_rows([plots.RunRecord.from_dict(r) for r in records])
    return {"rows": rows, "notes": notes, "paths": paths, "table": plots.table(rows), "output_dir": str(directory),
            "matches": {m: match.to_dict() for m, match in (matches or {}).items()}}
