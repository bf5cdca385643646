"""How torch's CPU threads behave when another process is busy on the same cores: the default of ``--threads``.

One training step of ``./run demo`` (the shipped MiniLM classifier with LoRA r 8 on query/value, a batch of
32 x 64 tokens, AdamW) is timed in a fresh process per configuration (thread count and OpenMP wait policy
are fixed before torch starts): the median of ``--steps`` steps after one warm-up step. Each configuration
runs twice: as the machine is, and beside one extra busy process (a single-threaded matmul loop, like a
second training job). The machine's 1-minute load average is printed with each row: on a shared machine
"as the machine is" already has other programs running.

    python benchmarks/threads.py --out threads.md      # about 5 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import publish

CONFIGS = [  # (label, threads, OMP_WAIT_POLICY)
    ("2 threads (torch's default on 2 cores)", 2, None),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, "PASSIVE"),
    ("1 thread", 1, None),
]

STEP = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForSequenceClassification
import rankwise
from rankwise.experiment.pipeline import SHIPPED_MODEL, model_path

steps = int(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(model_path(SHIPPED_MODEL), num_labels=2)
model = rankwise.adapt(model, rankwise.LoRAConfig(r=8, targets=["query", "value"], modules_to_save=["classifier"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(1000, 2000, (32, 64))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (32,))}
times = []
for _ in range(steps + 1):
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps({"median": statistics.median(times[1:]), "threads": torch.get_num_threads()}))
"""

BUSY = r"""
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def measure(threads: int, policy: str | None, steps: int) -> float:
    """Median seconds per training step in a fresh process with ``threads`` threads and ``policy``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([sys.executable, "-c", STEP, str(steps)], env=env, capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["median"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--out", default="", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    rows = []
    for scenario in ("as the machine is", "beside one busy process"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if scenario != "as the machine is" else None
        try:
            time.sleep(2 if busy else 0)
            for label, threads, policy in CONFIGS:
                seconds = measure(threads, policy, args.steps)
                rows.append(f"| {scenario} | {label} | {seconds:.2f} | {os.getloadavg()[0]:.1f} |")
                print(rows[-1], file=sys.stderr)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    cores = len(os.sched_getaffinity(0))
    text = "\n".join([
        f"# Threads under contention: one `./run demo` training step, {cores} cores",
        "",
        (f"Regenerate: `python benchmarks/threads.py{' --out ' + args.out if args.out else ''}` "
        f"(median of {args.steps} steps after one warm-up, a fresh process per row, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})."),
        "",
        "| machine | configuration | s / step | load average |",
        "|---|---|---:|---:|",
        *rows,
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
