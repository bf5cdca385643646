"""The default recipe of ``rankwise finetune``, measured: test accuracy over seeds on finetune's own task.

Each seed is one full ``rankwise.experiment.finetune`` run (its own split, head initialisation and data
order), without the probe. By default it measures the CLI's defaults (LoRA r 8, α 8, the default lr,
schedule and warm-up of ``TrainSettings``); ``--lr``, ``--schedule``, ``--warmup`` and ``--alpha``
measure another recipe, e.g. PEFT's usual one: ``--alpha 16 --lr 5e-4 --schedule constant --warmup 0``.
The runs are sequential, with ``rankwise finetune``'s default thread count (``--threads`` changes it; export
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine, see results/threads.md); ``--out`` writes the table under results/.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/recipe.py --out recipe.md     # about 3 x 4 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

from common import publish

from rankwise.experiment.pipeline import RunConfig, finetune
from rankwise.experiment.threads import default_threads
from rankwise.experiment.train import TrainSettings


def measure(seed: int, settings: TrainSettings, alpha: float | None, threads: int | None) -> tuple[float, float, float]:
    """Test accuracy, macro-F1 and wall seconds of one default run at ``seed``."""
    options = {} if alpha is None else {"alpha": alpha}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output:
        config = RunConfig(options=options, settings=dataclasses.replace(settings, seed=seed), probe=False,
                           threads=threads, output_dir=output)
        result = finetune(config, log=lambda line: print(line, file=sys.stderr))
    return result.adapted.test.accuracy, result.adapted.test.macro_f1, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainSettings()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--schedule", default=defaults.schedule)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the config's, = r)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: rankwise finetune's)")
    parser.add_argument("--out", default="", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(defaults, lr=args.lr, schedule=args.schedule, warmup=args.warmup)
    threads = args.threads or default_threads()
    rows, accuracies = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        accuracy, macro_f1, seconds = measure(seed, settings, args.alpha, threads)
        accuracies.append(accuracy)
        rows.append(f"| {seed} | {accuracy:.4f} | {macro_f1:.4f} | {seconds:.0f} |")
        print(rows[-1], file=sys.stderr)
    mean = statistics.mean(accuracies)
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    alpha = "α = r (8)" if args.alpha is None else f"α {args.alpha:g}"
    command = " ".join(["python benchmarks/recipe.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        (f"# rankwise finetune recipe: LoRA r 8, {alpha}, lr {settings.lr:g} {settings.schedule} after "
        f"{settings.warmup:g} warm-up, {settings.epochs:g} epochs of batch {settings.batch_size}"),
        "",
        f"Regenerate: `OMP_WAIT_POLICY=PASSIVE {command}` (movie-reviews, 3,000 training examples, test split of finetune).",
        "",
        "| seed | test accuracy | macro-F1 | wall s |",
        "|---:|---:|---:|---:|",
        *rows,
        "",
        (f"mean test accuracy {mean:.4f} ± {spread:.4f} (sample standard deviation over {len(accuracies)} seeds), "
        f"range {min(accuracies):.4f} to {max(accuracies):.4f}"),
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
