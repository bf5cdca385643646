"""LoRAE against its λ = 0 baseline on sklearn's 8×8 digits, at the same parameter and FLOP budget.

Both models are the same MLP autoencoder (64 → hidden → n, one bias-free n×n latent layer M,
n → hidden → 64, sigmoid), trained with Adam on the same split and seeds. LoRAE adds λ‖M‖_* to
the mean-squared reconstruction error; the baseline has λ = 0 (no penalty term at all). A plain
autoencoder without M (l = 0) is listed too, for reference.

Reported per model (test split, mean over seeds): parameters, forward FLOPs per example
(Linear layers), reconstruction MSE, the effective rank (Roy & Vetterli) and numerical rank
(σ > 1% of σ_max) of the test codes' covariance, and the mean squared distance of GMM samples
(4 full-covariance components, as the official generation.py) to their nearest test image,
a rough sample-quality proxy (no FID on 8×8 digits).

Run:  python examples/digits_lorae.py [--epochs 30] [--lam 1e-3] [--seeds 0] [--out DIR]
With --out, a PNG of decoded GMM samples per model is written there.

Measured (2026-11-25, defaults but --seeds 0 1 2, shared 2-core CPU, about 4.5 minutes)::

    model               params  FLOPs/ex  test MSE eff.rank num.rank   GMM→NN
    LoRAE (λ=0.001)      25952     51552   0.02493     4.28      5.0  0.02362
    vanilla (λ=0)        25952     51552   0.01442     7.16     10.3  0.02834
    plain AE (no M)      24928     49504   0.01103     9.60     14.0  0.03039

The penalty halves the codes' rank at the same budget. Reconstruction is worse, and the
GMM samples land closer to real test digits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rankwise.models import (
    LatentGMM,
    LoRAEConfig,
    LowRankAutoencoder,
    code_covariance,
    effective_rank,
    generate,
    linear_flops,
    mlp_autoencoder,
    numerical_rank,
    parameter_count,
    train_autoencoder,
)


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/test images scaled to [0, 1], flattened to 64 features (80/20 split, stratified)."""
    digits = load_digits()
    train, test = train_test_split(digits.data / 16.0, test_size=0.2, random_state=seed, stratify=digits.target)
    return torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32)


@torch.no_grad()
def nearest_sample_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the per-pixel squared distance to the closest reference image."""
    return float((torch.cdist(samples, reference).min(dim=1).values ** 2 / samples.shape[1]).mean())


@torch.no_grad()
def evaluate(model: LowRankAutoencoder, test: torch.Tensor, train: torch.Tensor, seed: int) -> dict[str, float]:
    model.eval()
    codes = model.encode(test)
    covariance = code_covariance(codes)
    sampler = LatentGMM(n_components=4, seed=seed).fit(model.encode(train))
    samples = generate(model, sampler, 500)
    return {
        "mse": float(torch.mean((model(test) - test) ** 2)),
        "eff_rank": effective_rank(covariance),
        "num_rank": float(numerical_rank(covariance, rtol=1e-2)),
        "sample_nn": nearest_sample_distance(samples, test),
    }


def save_samples(model: LowRankAutoencoder, train: torch.Tensor, path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampler = LatentGMM(n_components=4, seed=seed).fit(model.encode(train).detach())
    images = generate(model, sampler, 64).reshape(64, 8, 8)
    figure, axes = plt.subplots(8, 8, figsize=(4, 4))
    for axis, image in zip(axes.flat, images):
        axis.imshow(image.numpy(), cmap="gray_r", vmin=0, vmax=1)
        axis.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matmuls: more threads only add contention

    train, test = digits_split()
    lorae = LoRAEConfig(latent_dim=args.latent_dim, lam=args.lam)
    variants = {
        f"LoRAE (λ={args.lam:g})": lorae,
        "vanilla (λ=0)": lorae.vanilla(),
        "plain AE (no M)": LoRAEConfig(latent_dim=args.latent_dim, latent_layers=0, lam=0.0),
    }
    print(f"digits: {len(train)} train / {len(test)} test, n={args.latent_dim}, hidden={args.hidden}, "
          f"{args.epochs} epochs, seeds {args.seeds}")
    header = f"{'model':<18} {'params':>7} {'FLOPs/ex':>9} {'test MSE':>9} {'eff.rank':>8} {'num.rank':>8} {'GMM→NN':>8} {'s':>5}"
    print(header)
    for name, config in variants.items():
        rows, started = [], time.perf_counter()
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = mlp_autoencoder(64, args.hidden, config)
            train_autoencoder(model, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
            rows.append(evaluate(model, test, train, seed))
            if args.out is not None and seed == args.seeds[0]:
                slug = name.split(" ")[0].lower()
                save_samples(model, train, args.out / f"digits_{slug}_samples.png", seed)
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        print(f"{name:<18} {parameter_count(model):>7} {linear_flops(model):>9} {mean['mse']:>9.5f} "
              f"{mean['eff_rank']:>8.2f} {mean['num_rank']:>8.1f} {mean['sample_nn']:>8.5f} "
              f"{time.perf_counter() - started:>5.0f}")


if __name__ == "__main__":
    main()
