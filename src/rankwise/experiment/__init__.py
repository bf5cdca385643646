"""The main job as a library: tasks and data, runs on the training engine, reports and plots.

    from rankwise.experiment import DataConfig, RunConfig, TrainSettings, finetune

    result = finetune(RunConfig(method="dora", data=DataConfig(task="tweets"), settings=TrainSettings(epochs=1)))
    result.metrics["test"], result.output_dir

``compare(CompareConfig(...))`` runs every method at a matched budget over paired seeds, as a resumable sweep. The command line (:mod:`rankwise.cli`)
parses its options into these dataclasses and prints what they return.
"""

from .comparison import CompareConfig, compare
from .pipeline import DataConfig, FinetuneResult, RunConfig, finetune
from .train import TrainSettings

__all__ = ["CompareConfig", "DataConfig", "FinetuneResult", "RunConfig", "TrainSettings", "compare", "finetune"]
