"""LoRAE: the low-rank autoencoder (a nuclear-norm-regularised linear latent block).

Paper: "Learning Low-Rank Latent Spaces with Simple Deterministic Autoencoder: Theoretical and
Empirical Insights", Mazumder, Baruah, Kumar, Sharma, Pattanaik, Rathore, WACV 2024,
arXiv:2310.16194. Official code: tirthajit/LoRAE_WACV24 (model.py, train.py, generation.py; train.py read at
commit 3159f3e: loss = net(x) + λ·torch.linalg.norm(net.mlp.hidden[0].weight, ord='nuc')).
It is the explicit-penalty version of IRMAE (Jing, Zbontar, LeCun, arXiv:2010.00679).

Model (E: encoder to R^n, D: decoder, M_1..M_l: bias-free n×n Linears, no activation between)::

    z     = E(x) ∈ R^n
    z̄     = M_l ⋯ M_1 z                      (the "latent block"; l = 1 by default)
    x̂     = D(z̄)
    L     = mean((x̂ − x)²) + λ · ‖M‖_*        ‖M‖_* = Σ_i σ_i(M)  (nuclear norm)

Decisions and their sources (the paper's PDF tables were not retrievable here; see
/work/shared/methods/lorae.md):

* Reconstruction is the *mean* squared error over batch and features (official train.py uses
  ``mse_loss`` with its default mean reduction), so λ is relative to a per-feature MSE.
* Which matrix is penalised (``penalise``): ``"first"`` (default) is ‖M_1‖_*, what the official
  train.py does (it indexes layer 0); ``"product"`` is ‖M_l⋯M_1‖_*, the quantity that bounds
  rank(z̄); ``"each"`` is Σ_k ‖M_k‖_*. With l = 1 the three coincide.
* The sub-gradient of ‖M‖_* is U Vᵀ from the thin SVD M = U Σ Vᵀ (exact where M has full rank
  and distinct singular values). We let autograd differentiate ``torch.linalg.matrix_norm(ord=
  'nuc')``, which uses that formula; the tests check it against the SVD formula. The SVD runs in
  float32 at least (half-precision SVDs are unstable), O(n³) per step.
* ``encode`` returns z̄ (M applied), as the official ``encode``; density models are fitted on z̄
  and their samples go straight to ``decode`` (D only).
* The baseline really is λ = 0: :meth:`LoRAEConfig.vanilla` returns the same architecture with
  ``lam=0.0`` and the loss then contains no penalty term at all (no SVD, no gradient from it).
  The official ``--vanilla`` flag only renames the checkpoint and keeps the penalty on.
* ``latent_layers=0`` is a plain autoencoder (the official train.py crashes on ``-l 0``); it
  cannot carry a penalty, so λ > 0 with l = 0 is an error rather than a silent no-op.
* The GMM sampler follows generation.py: sklearn ``GaussianMixture(n_components=4,
  covariance_type='full')`` fitted on the codes z̄ of a data split.

Parameters added by the latent block: l·n² (no bias). FLOPs per example: 2·l·n² (one
multiply-add per weight). It adds parameters; it removes none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import check_choice, check_positive_int, check_positive_number

Penalise = Literal["first", "product", "each"]
_PENALISE = ("first", "product", "each")


@dataclass(frozen=True, kw_only=True)
class LoRAEConfig:
    """Hyper-parameters of the latent block and its penalty.

    Args:
        latent_dim: n, the width of the code and of every square latent layer.
        latent_layers: l, the number of bias-free n×n Linears between encoder and decoder
            (official default 1; 0 gives a plain autoencoder).
        lam: λ, the weight of the nuclear norm (official train.py default 1e-5, relative to a
            mean-reduced MSE). 0 is the unregularised baseline (IRMAE with l layers).
        penalise: which nuclear norm: ``"first"`` (‖M_1‖_*, the official code), ``"product"``
            (‖M_l⋯M_1‖_*) or ``"each"`` (Σ_k ‖M_k‖_*).
    """

    latent_dim: int
    latent_layers: int = 1
    lam: float = 1e-5
    penalise: Penalise = "first"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "latent_dim", self.latent_dim)
        if isinstance(self.latent_layers, bool) or not isinstance(self.latent_layers, int) or self.latent_layers < 0:
            raise ValueError(f"{owner}: latent_layers must be an integer >= 0 (0 = plain AE), got {self.latent_layers!r}")
        if isinstance(self.lam, bool) or self.lam != 0:  # 0 = no penalty; otherwise finite and > 0
            check_positive_number(owner, "lam", self.lam)
        check_choice(owner, "penalise", self.penalise, _PENALISE)
        if self.lam > 0 and self.latent_layers == 0:
            raise ValueError(
                f"{owner}: lam={self.lam} needs a latent layer to penalise, but latent_layers=0; "
                "set latent_layers >= 1, or lam=0 for a plain autoencoder"
            )

    def vanilla(self) -> LoRAEConfig:
        """The baseline at the same budget: the same architecture with λ = 0 (no penalty term)."""
        return dataclasses.replace(self, lam=0.0)


def nuclear_norm(matrix: Tensor) -> Tensor:
    """‖M‖_* = Σ σ_i(M), computed in float32 or wider; differentiable (sub-gradient U Vᵀ)."""
    if matrix.dim() != 2:
        raise ValueError(f"nuclear_norm expects a matrix, got a tensor of shape {tuple(matrix.shape)}")
    wide = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    return torch.linalg.matrix_norm(wide, ord="nuc")


class LatentBlock(nn.Module):
    """z̄ = M_l ⋯ M_1 z with ``layers[k]`` = M_{k+1}, each ``nn.Linear(n, n, bias=False)``."""

    def __init__(self, latent_dim: int, num_layers: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.layers = nn.ModuleList(nn.Linear(latent_dim, latent_dim, bias=False) for _ in range(num_layers))
        # an empty, unsaved buffer that follows .to() / .double(): the device and dtype of a block without layers
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        for layer in self.layers:
            z = layer(z)
        return z

    def matrix(self) -> Tensor:
        """The end-to-end n×n map M_l ⋯ M_1 (the identity, on the block's device and dtype, when there are no layers)."""
        if not self.layers:
            return torch.eye(self.latent_dim, device=self._anchor.device, dtype=self._anchor.dtype)
        product = self.layers[0].weight
        for layer in self.layers[1:]:
            product = layer.weight @ product
        return product

    def penalty(self, penalise: Penalise) -> Tensor:
        """The nuclear norm selected by ``penalise`` (see :class:`LoRAEConfig`)."""
        if not self.layers:
            raise ValueError("LatentBlock.penalty: there is no latent layer to penalise (latent_layers=0)")
        if penalise == "first":
            return nuclear_norm(self.layers[0].weight)
        if penalise == "product":
            return nuclear_norm(self.matrix())
        return torch.stack([nuclear_norm(layer.weight) for layer in self.layers]).sum()


class LowRankAutoencoder(nn.Module):
    """x̂ = D(M_l ⋯ M_1 E(x)) trained with ``mean((x̂ − x)²) + λ‖M‖_*`` (see the module docstring).

    Args:
        encoder: maps a batch of inputs to codes of shape (batch, latent_dim).
        decoder: maps codes of shape (batch, latent_dim) back to the input's shape.
        config: the latent block and its penalty.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, config: LoRAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.latent = LatentBlock(config.latent_dim, config.latent_layers)
        self.decoder = decoder

    def encode(self, x: Tensor) -> Tensor:
        """z̄ = M E(x), the code the decoder and the density model see."""
        z = self.encoder(x)
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"LowRankAutoencoder: the encoder maps input {tuple(x.shape)} to {tuple(z.shape)}, but the latent "
                f"block expects (batch, {self.config.latent_dim}); make the encoder end in a Linear to latent_dim"
            )
        return self.latent(z)

    def decode(self, codes: Tensor) -> Tensor:
        """x̂ = D(z̄); codes are z̄, i.e. already through the latent block."""
        if codes.dim() != 2 or codes.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"LowRankAutoencoder.decode: codes must have shape (batch, {self.config.latent_dim}), "
                f"got {tuple(codes.shape)}"
            )
        return self.decoder(codes)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def penalty(self) -> Tensor:
        """‖M‖_* as selected by ``config.penalise`` (needs latent_layers >= 1)."""
        return self.latent.penalty(self.config.penalise)

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(total loss, reconstruction MSE). With λ = 0 the total *is* the MSE: no penalty is built."""
        reconstruction = self(x)
        if reconstruction.shape != x.shape:
            raise ValueError(
                f"LowRankAutoencoder: the decoder returns {tuple(reconstruction.shape)} for input {tuple(x.shape)}; "
                "it must reproduce the input's shape"
            )
        mse = F.mse_loss(reconstruction, x)
        if self.config.lam == 0:
            return mse, mse
        return mse + self.config.lam * self.penalty(), mse


def mlp_autoencoder(input_dim: int, hidden_dim: int, config: LoRAEConfig) -> LowRankAutoencoder:
    """A small MLP autoencoder for flat inputs in [0, 1]: input→hidden→n, block, n→hidden→input (sigmoid)."""
    for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"mlp_autoencoder: {name} must be a positive integer, got {value!r}")
    n = config.latent_dim
    encoder = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, n))
    decoder = nn.Sequential(nn.Linear(n, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, input_dim), nn.Sigmoid())
    return LowRankAutoencoder(encoder, decoder, config)


# ----------------------------------------------------------------------------------------------
# Training and measurement helpers
# ----------------------------------------------------------------------------------------------


def _check_training_input(model: LowRankAutoencoder, data: Tensor, epochs: int, batch_size: int, lr: float) -> None:
    """ValueError for arguments that would corrupt or crash the training, before any parameter moves.

    An infinite lr or NaN / inf data train to non-finite parameters behind a normal-looking (or NaN) history;
    float epochs / batch_size, integer data and data the model cannot read used to fail with a TypeError or
    RuntimeError from deep inside the loop. The model must read ``data``: one example goes through ``model.loss``
    (eval mode, no gradient, the training flag restored), so a wrong width or dtype is reported with its shapes.
    """
    check_positive_int("train_autoencoder", "epochs", epochs)
    check_positive_int("train_autoencoder", "batch_size", batch_size)
    check_positive_number("train_autoencoder", "lr", lr)
    if not isinstance(data, Tensor) or data.dim() < 2 or data.shape[0] == 0:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"train_autoencoder: data must be a non-empty batch (N, ...), got shape {shape}")
    if not data.is_floating_point():
        raise ValueError(f"train_autoencoder: data has dtype {data.dtype}; pass floating-point data "
                         "(e.g. data.float()), the model reconstructs it with a mean squared error")
    if not bool(torch.isfinite(data).all()):
        rows = (~torch.isfinite(data.reshape(data.shape[0], -1))).any(1).nonzero().flatten().tolist()
        raise ValueError(f"train_autoencoder: data rows {rows[:10]}{'...' if len(rows) > 10 else ''} of {data.shape[0]} "
                         "have NaN or inf entries; clean or drop them")
    parameter = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.loss(data[:1])
    except RuntimeError as error:
        first = next((m for m in model.encoder.modules() if isinstance(m, nn.Linear)), None)
        reads = "" if first is None else f"its first Linear reads {first.in_features} features, "
        expects = "" if parameter is None else f" ({reads}its parameters are {parameter.dtype} on {parameter.device})"
        raise ValueError(f"train_autoencoder: the model cannot read data of shape {tuple(data.shape)}, dtype {data.dtype}, "
                         f"on {data.device}{expects}: {error}; pass data of the width, dtype and device the encoder "
                         "expects") from error
    finally:
        model.train(was_training)


def train_autoencoder(
    model: LowRankAutoencoder,
    data: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Adam on the LoRAE loss over shuffled mini-batches; returns the mean total loss of each epoch.

    Bad arguments are a ValueError before the optimizer is built, so the model is left unchanged
    (see :func:`_check_training_input`).
    """
    _check_training_input(model, data, epochs, batch_size, lr)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(data.shape[0], generator=generator)
        total, batches = 0.0, 0
        for start in range(0, data.shape[0], batch_size):
            loss, _ = model.loss(data[order[start : start + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history.append(total / batches)
    model.eval()
    return history


def effective_rank(matrix: Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = σ_i / Σσ (EUSIPCO 2007); 0 for a zero matrix."""
    singular = torch.linalg.svdvals(matrix.detach().double())
    total = singular.sum()
    if total == 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(matrix: Tensor, rtol: float = 1e-2) -> int:
    """Number of singular values above ``rtol`` times the largest."""
    singular = torch.linalg.svdvals(matrix.detach().double())
    if singular.numel() == 0 or singular[0] == 0:
        return 0
    return int((singular > rtol * singular[0]).sum())


def code_covariance(codes: Tensor) -> Tensor:
    """Covariance of a (N, n) batch of codes (the matrix whose spectrum the paper plots)."""
    if codes.dim() != 2 or codes.shape[0] < 2:
        raise ValueError(f"code_covariance: codes must be (N >= 2, n), got {tuple(codes.shape)}")
    centred = codes.detach().double() - codes.detach().double().mean(dim=0)
    return centred.T @ centred / (codes.shape[0] - 1)


def parameter_count(model: nn.Module) -> int:
    """All parameters of the model (the autoencoder is trained in full)."""
    return sum(p.numel() for p in model.parameters())


def linear_flops(model: nn.Module) -> int:
    """Forward FLOPs per example of the model's Linear layers: 2·in·out (+ out for a bias).

    Activations and the loss are not counted; the models here are MLPs, so Linears are the cost.
    """
    return sum(
        2 * m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


# ----------------------------------------------------------------------------------------------
# Sampling: a Gaussian mixture fitted on the codes (official generation.py, ``gmm``)
# ----------------------------------------------------------------------------------------------


class LatentGMM:
    """sklearn ``GaussianMixture(n_components, covariance_type='full')`` over codes z̄."""

    def __init__(self, n_components: int = 4, seed: int = 0) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components <= 0:
            raise ValueError(f"LatentGMM: n_components must be a positive integer, got {n_components!r}")
        from sklearn.mixture import GaussianMixture

        self.mixture = GaussianMixture(n_components=n_components, covariance_type="full", random_state=seed)
        self.latent_dim: int | None = None

    def fit(self, codes: Tensor) -> LatentGMM:
        """Fit on a (N, n) batch of codes; N must be at least the number of components."""
        if codes.dim() != 2 or codes.shape[0] < self.mixture.n_components:
            raise ValueError(
                f"LatentGMM.fit: codes must be (N, n) with N >= n_components={self.mixture.n_components}, "
                f"got {tuple(codes.shape)}"
            )
        self.mixture.fit(codes.detach().double().cpu().numpy())
        self.latent_dim = codes.shape[1]
        return self

    def sample(self, count: int) -> Tensor:
        """``count`` codes drawn from the fitted mixture, as float32 (feed them to ``decode``)."""
        if self.latent_dim is None:
            raise ValueError("LatentGMM.sample: call fit(codes) first")
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"LatentGMM.sample: count must be a positive integer, got {count!r}")
        samples, _ = self.mixture.sample(count)
        return torch.from_numpy(np.asarray(samples, dtype=np.float32))


@torch.no_grad()
def generate(model: LowRankAutoencoder, sampler: LatentGMM, count: int) -> Tensor:
    """Decode ``count`` codes drawn from a sampler fitted on this model's codes."""
    if sampler.latent_dim != model.config.latent_dim:
        raise ValueError(
            f"generate: the sampler was fitted on {sampler.latent_dim}-dimensional codes, the model's codes "
            f"are {model.config.latent_dim}-dimensional; fit it on model.encode(data)"
        )
    model.eval()
    return model.decode(sampler.sample(count))
