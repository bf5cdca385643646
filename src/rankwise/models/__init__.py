"""Whole models whose training is itself a low-rank method (not adapters of an existing layer).

* :mod:`rankwise.models.lorae` — LoRAE, the low-rank autoencoder (arXiv:2310.16194).
"""

from .lorae import (
    LatentBlock,
    LatentGMM,
    LoRAEConfig,
    LowRankAutoencoder,
    code_covariance,
    effective_rank,
    generate,
    linear_flops,
    mlp_autoencoder,
    nuclear_norm,
    numerical_rank,
    parameter_count,
    train_autoencoder,
)

__all__ = [
    "LatentBlock",
    "LatentGMM",
    "LoRAEConfig",
    "LowRankAutoencoder",
    "code_covariance",
    "effective_rank",
    "generate",
    "linear_flops",
    "mlp_autoencoder",
    "nuclear_norm",
    "numerical_rank",
    "parameter_count",
    "train_autoencoder",
]
