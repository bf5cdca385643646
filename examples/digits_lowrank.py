"""TRP or Cuttlefish on scikit-learn's bundled digits (1,797 8×8 images), against same-budget baselines.

Run:  python examples/digits_lowrank.py --method trp          (or --method cuttlefish)

It trains (1) the dense small CNN, (2) the same CNN with the chosen method, factorised at the end
(TRP) or at the automatic switch (Cuttlefish), and (3) a narrower dense CNN with the parameter count
of the compressed model, trained directly. It prints parameters, MACs per image and test accuracy,
then saves the factorised model (``--output``, default a temporary directory) and loads it onto a fresh
dense CNN with ``load_compressed``.
Each run takes about a minute on 2 CPU cores.

Optimiser: SGD, momentum 0.9, weight decay 1e-4, as in both official codes, and with their split of
the decay. TRP (``cifar-TRP.py``) decays every parameter. Cuttlefish (``main.py`` with ``utils.py``'s
``add_weight_decay``) never decays 1-D parameters (biases), before or after the switch; after the
switch with Frobenius decay on, the factor weights get no weight decay either (the Frobenius term
replaces it), while the layers kept dense keep theirs. The dense baselines use plain SGD with decay on
every parameter.

Measured (seed 0, 360 test images, so one image = 0.28 points; dense width-16 CNN: 40,394 params,
616k MACs, 0.9861 after 20 or 30 epochs; torch 2.13 on CPU):

=====================================  ======  =====  ========  =====================
run                                    params  MACs   test acc  same-budget dense CNN
=====================================  ======  =====  ========  =====================
trp (e 0.9, m 1, λ 3e-4; code values)  4,714   84k    0.8417    4,160 / 0.9778
trp --period 5                         5,210   96k    0.9472    5,914 / 0.9778
trp --energy 0.98                      10,218  221k   0.9861    10,346 / 0.9778
cuttlefish (switch after epoch 12)     15,418  274k   0.9639    16,010 / 0.9806
cuttlefish --frobenius-decay 1e-4      15,418  274k   0.9778    16,010 / 0.9806
=====================================  ======  =====  ========  =====================

"code values": the official TRP code's defaults (the training energy 0.9 is hard-coded in
``cifar-TRP.py``, the period 1 is its argparse default, λ 3e-4 comes from the README commands); the
paper's own values could not be read (``methods/trp.md`` §3).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.nn import functional as F

from rankwise.compress.cuttlefish import Cuttlefish, CuttlefishConfig
from rankwise.compress.lowrank_conv import count_macs
from rankwise.compress.storage import load_compressed, save_compressed
from rankwise.compress.trp import TRP, TRPConfig


def small_cnn(width: int, hidden: int) -> nn.Sequential:
    """conv(1→w) conv(w→2w) pool conv(2w→4w) pool fc(16w→hidden) fc(hidden→10), ReLU between."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * width, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An 80/20 split of the digits, pixels scaled to [0, 1], shaped (N, 1, 8, 8)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD, momentum 0.9, weight decay 1e-4 on every parameter (TRP's code and the dense baselines)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def cuttlefish_sgd(model: nn.Module, lr: float, undecayed: tuple[nn.Module, ...] = ()) -> torch.optim.Optimizer:
    """SGD, momentum 0.9, weight decay 1e-4 except on 1-D parameters and on the weights of ``undecayed``
    (the official Cuttlefish ``add_weight_decay``; ``undecayed`` are the factorised pairs when Frobenius
    decay is on)."""
    skipped = {id(p) for module in undecayed for p in module.parameters()}
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for p in model.parameters():
        groups[p.dim() > 1 and id(p) not in skipped].append(p)
    return torch.optim.SGD([{"params": groups[True], "weight_decay": 1e-4}, {"params": groups[False], "weight_decay": 0.0}],
                           lr=lr, momentum=0.9)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor],
    generator: torch.Generator,
    before: Callable[[int], None] = lambda step: None,
    after_backward: Callable[[], None] = lambda: None,
    extra_loss: Callable[[], Tensor] = lambda: torch.zeros(()),
) -> None:
    """One epoch of mini-batches of 64; ``before(batch_index)`` / ``after_backward()`` hook the method in."""
    x, y = data
    model.train()
    for step, idx in enumerate(torch.randperm(len(y), generator=generator).split(64)):
        before(step)
        loss = F.cross_entropy(model(x[idx]), y[idx]) + extra_loss()
        optimizer.zero_grad()
        loss.backward()
        after_backward()
        optimizer.step()


def train_dense(width: int, hidden: int, data: tuple[Tensor, Tensor], epochs: int, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = small_cnn(width, hidden)
    optimizer, generator = sgd(model, lr), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        train_epoch(model, optimizer, data, generator)
    return model


def run_trp(model: nn.Module, data: tuple[Tensor, Tensor], args: argparse.Namespace, test: tuple[Tensor, Tensor]) -> dict:
    trp = TRP(model, TRPConfig(energy=args.energy, period=args.period, nuclear_weight=args.nuclear_weight,
                               scheme=args.scheme, include_linear=True))
    optimizer, generator = sgd(model, args.lr), torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        train_epoch(model, optimizer, data, generator, before=trp.before_forward, after_backward=trp.before_optimizer_step)
    before = accuracy(model, *test)
    return {"accuracy_before": before, "ranks": trp.factorize()}


def run_cuttlefish(model: nn.Module, data: tuple[Tensor, Tensor], args: argparse.Namespace, test: tuple[Tensor, Tensor]) -> dict:
    cf = Cuttlefish(model, CuttlefishConfig(window=args.window, points=args.points, tolerance=args.tolerance,
                                            frobenius_decay=args.frobenius_decay, max_warmup_points=args.epochs // 2))
    optimizer, generator = cuttlefish_sgd(model, args.lr), torch.Generator().manual_seed(args.seed)
    result: dict = {}
    for epoch in range(args.epochs):
        if cf.switched:
            train_epoch(model, optimizer, data, generator, extra_loss=cf.penalty)
            continue
        switch_now = cf.observe()
        train_epoch(model, optimizer, data, generator)
        if switch_now:
            result = {"switch_epoch": epoch + 1, "accuracy_before": accuracy(model, *test), "ranks": cf.switch(),
                      "srank_history": cf.history}
            # a new optimizer, as the official code builds; Frobenius decay replaces weight decay on the factors
            optimizer = cuttlefish_sgd(model, args.lr, tuple(cf.factorized) if args.frobenius_decay > 0 else ())
    return result


def same_budget_baseline(budget: int, data: tuple[Tensor, Tensor], args: argparse.Namespace) -> nn.Module:
    """The small CNN (width w, hidden 4w) whose parameter count is closest to ``budget``, trained directly."""
    width = min(range(1, 17), key=lambda w: abs(parameters(small_cnn(w, 4 * w)) - budget))
    return train_dense(width, 4 * width, data, args.epochs, args.lr, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["trp", "cuttlefish"], required=True)
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 for trp, 30 for cuttlefish")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--energy", type=float, default=0.9, help="TRP training energy threshold")
    parser.add_argument("--period", type=int, default=1, help="TRP period m")
    parser.add_argument("--nuclear-weight", type=float, default=3e-4)
    parser.add_argument("--scheme", choices=["channel", "spatial"], default="channel")
    parser.add_argument("--window", type=int, default=3, help="Cuttlefish w (epochs; the CIFAR code uses 15 of 300)")
    parser.add_argument("--points", type=int, default=3, help="Cuttlefish q (CIFAR code: 11)")
    parser.add_argument("--tolerance", type=float, default=0.1, help="Cuttlefish τ")
    parser.add_argument("--frobenius-decay", type=float, default=0.0)
    parser.add_argument("--output", default=None, help="save the factorised model here (default: a temporary dir)")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 20 if args.method == "trp" else 30
    torch.set_num_threads(1)
    start = time.time()
    x_train, y_train, x_test, y_test = digits(args.seed)
    data, test = (x_train, y_train), (x_test, y_test)
    example = x_test[:1]

    dense = train_dense(16, 64, data, args.epochs, args.lr, args.seed)
    torch.manual_seed(args.seed)
    model = small_cnn(16, 64)
    run = run_trp if args.method == "trp" else run_cuttlefish
    result = run(model, data, args, test)
    baseline = same_budget_baseline(parameters(model), data, args)

    print(f"method: {args.method}   ({time.time() - start:.0f} s on CPU)")
    for name, entry in result["ranks"].items():
        print(f"  layer {name:>3}: rank {entry['rank']:>3}  {'factorised' if entry['factorized'] else 'kept dense'}")
    if "switch_epoch" in result:
        print(f"  switch after epoch {result['switch_epoch']}; srank history {result['srank_history']}")
    print(f"{'model':<34}{'params':>9}{'MACs':>10}{'test acc':>10}")
    rows = [
        ("dense CNN (width 16)", dense, accuracy(dense, *test)),
        (f"{args.method}, dense before factorising", None, result["accuracy_before"]),
        (f"{args.method}, factorised", model, accuracy(model, *test)),
        ("same-budget dense CNN", baseline, accuracy(baseline, *test)),
    ]
    for label, net, acc in rows:
        counts = f"{parameters(net):>9}{count_macs(net, example):>10}" if net is not None else f"{'':>19}"
        print(f"{label:<34}{counts}{acc:>10.4f}")
    if not any(entry["factorized"] for entry in result["ranks"].values()):
        return  # every layer stayed dense: nothing compressed to save
    with tempfile.TemporaryDirectory() as tmp:  # safetensors + JSON; the skeleton is rebuilt on a fresh dense CNN
        saved = save_compressed(model, args.output or tmp)
        restored = load_compressed(small_cnn(16, 64), saved)
        print(f"saved to {saved}; reloaded onto a fresh CNN: test acc {accuracy(restored, *test):.4f}")


if __name__ == "__main__":
    main()
