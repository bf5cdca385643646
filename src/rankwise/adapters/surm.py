"""SURM: structured unrestricted-rank matrices as LoRA replacements (circulant, symmetric
Toeplitz product, Kronecker, general circulant × skew-circulant LDR).

Paper: "Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning", Sehanobish,
Dubey, Choromanski, Basu Roy Chowdhury, Jain, Sindhwani, Chaturvedi, NeurIPS 2024,
arXiv:2406.17740. Official code: arijitthegame/structured-matrices-PEFT (``src/lora/*_lora.py``);
the formulas below are the official LoRA-style layers (surm.md §2a–2d), which the paper's body
could not be read to confirm.

One method, ``"surm"``, with ``structure=`` choosing the family. Notation (W ∈ R^{m×n},
y = x Wᵀ + b): C_col(v) is the circulant with first column v (C[t, s] = v[(t − s) mod g], so
C_col(v) u = v ⊛ u); T(v) the symmetric Toeplitz matrix T[t, s] = v[|t − s|]; S(s) the
skew-circulant with first row s (S[t, u] = s[u − t] for u ≥ t, −s[u − t + g] for u < t).

Rectangular layers (the official circulant / Toeplitz / LDR layers assert m = n): ΔW is tiled with
g×g blocks, g = ``block_size`` or, by default, g = gcd(m, n); every block (i, j) has its own
structured parameters. A square layer is one block, i.e. exactly the official layer; MiniLM's
384→1536 layers get 4 circulant blocks of size 384. Per block (i, j), with scale α:

    circulant   ΔW_ij = α C_col(a_ij ⊙ b_ij)       (``use_prod=False``: α C_col(a_ij))
    toeplitz    ΔW_ij = α T(b_ij) T(a_ij)           (x ΔWᵀ = α x T(a) T(b), official order)
    ldr         ΔW_ij = α Σ_{k<K} C_col(c_ijk) S(s_ijk)ᵀ   (K = ``displacement_rank``)
    kronecker   ΔW    = (α / r) B ⊗ A,  A ∈ R^{r×(n/r)}, B ∈ R^{(m/r)×r}   (no tiling; r | m, n)

Forward, never building ΔW: circulant blocks act through one rfft / batched complex matmul /
irfft (the same kernel as C3A, O(N((m + n) log g + m n / g)) for N tokens); T(v) u is the first g
entries of a length-2g circulant convolution (two FFT products per block, O(N m n / g · log g));
S(s)ᵀ u is the negacyclic convolution s ⊛₋ u = Re(η̄ ⊙ ifft(fft(η ⊙ s) ⊙ fft(η ⊙ u))),
η_t = e^{iπt/g}, followed by a circular convolution with c (O(N K m n / g · log g)); Kronecker is
B X Aᵀ on x reshaped to X ∈ R^{r×(n/r)} (O(N r (m + n))). For square layers every FFT family
costs O(N n log n). All backward passes are autograd through torch.fft (gradcheck-tested).

Closed-form trainable parameters per layer (g as above):
    circulant 2·m·n/g (m·n/g with use_prod=False); toeplitz 2·m·n/g; ldr 2·K·m·n/g; kronecker m + n.

Init (official code): circulant a ~ N(0, 1), b = 0 (use_prod=False: a = 0); toeplitz
a ~ N(0, 0.02²), b = 0; ldr c = 0, s ~ N(0, 0.02²); kronecker A ~ kaiming_uniform(a=√5), B = 0.
Every family starts with ΔW = 0. α defaults to 1 (official ``circ_alpha``).

Where we differ from the official code, on purpose (surm.md §2, §4, §7):
    * Rectangular layers are tiled (rule above) instead of refused; square layers are unchanged.
    * The LDR layer applies α (the official layer accepts ``circ_alpha`` and ignores it, i.e. α = 1,
      our default) and uses the correct root η = e^{iπ/g} (the official fallback uses a root of
      x^{g+1} + 1, though it is unreachable there).
    * irfft always gets n=, so odd widths work (the official ``circulant_multiply`` breaks).
    * Kronecker applies B X Aᵀ instead of materialising B ⊗ A in every forward.
    * Circulant a ~ N(0, 1) follows the code, not its "std .02" comment.
    * Only the LoRA-style (mergeable) variants; the adapter-style SURM (activation inside, not
      mergeable) and the general 2n−1 Toeplitz are not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.config import (
    AdapterConfig,
    check_choice,
    check_dropout,
    check_positive_int,
    check_positive_number,
    config_field,
)
from ..core.layer import Adapter
from ..core.registry import register
from .c3a import assemble_blocks, block_spectral_matvec, check_block_divides, circulant_index

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr")


# ----------------------------------------------------------------------------------------------
# Structured matrix-vector products (x: (..., q·g) -> (..., p·g)) and their dense blocks
# ----------------------------------------------------------------------------------------------


def circulant_matvec(x: Tensor, v: Tensor) -> Tensor:
    """x ΔWᵀ for ΔW with blocks C_col(v[i, j]); v: (p, q, g)."""
    return block_spectral_matvec(x, torch.fft.rfft(v, dim=-1), v.shape[-1])


def _toeplitz_generator(v: Tensor) -> Tensor:
    """Length-2g first column of the circulant whose leading g×g block is T(v): [v, 0, v_{g−1..1}]."""
    return torch.cat([v, torch.zeros_like(v[..., :1]), v[..., 1:].flip(-1)], dim=-1)


def toeplitz_matvec(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x ΔWᵀ for ΔW with blocks T(b[i, j]) T(a[i, j]); a, b: (p, q, g)."""
    p, q, g = a.shape
    lead = x.shape[:-1]
    length = 2 * g
    x_hat = torch.fft.rfft(x.reshape(-1, 1, q, g), n=length, dim=-1)  # (N, 1, q, F)
    a_hat = torch.fft.rfft(_toeplitz_generator(a), dim=-1)  # (p, q, F)
    b_hat = torch.fft.rfft(_toeplitz_generator(b), dim=-1)
    inner = torch.fft.irfft(x_hat * a_hat, n=length, dim=-1)[..., :g]  # T(a_ij) x_j: (N, p, q, g)
    outer = (torch.fft.rfft(inner, n=length, dim=-1) * b_hat).sum(dim=-2)  # Σ_j over (N, p, F)
    return torch.fft.irfft(outer, n=length, dim=-1)[..., :g].reshape(*lead, p * g)


def _negacyclic_twist(g: int, like: Tensor) -> Tensor:
    """η_t = e^{iπt/g}, t < g: diagonal scaling that turns negacyclic into cyclic convolution."""
    angle = torch.arange(g, dtype=like.dtype, device=like.device) * (math.pi / g)
    return torch.polar(torch.ones_like(angle), angle)


def ldr_matvec(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """x ΔWᵀ for ΔW with blocks Σ_k C_col(c[i, j, k]) S(s[i, j, k])ᵀ; c, s: (p, q, K, g)."""
    p, q, _, g = c.shape
    lead = x.shape[:-1]
    eta = _negacyclic_twist(g, x)
    x_twisted = torch.fft.fft(eta * x.reshape(-1, 1, q, 1, g), dim=-1)  # (N, 1, q, 1, g)
    s_twisted = torch.fft.fft(eta * s, dim=-1)  # (p, q, K, g)
    negacyclic = (eta.conj() * torch.fft.ifft(x_twisted * s_twisted, dim=-1)).real  # S(s)ᵀ x_j
    mixed = (torch.fft.rfft(negacyclic, dim=-1) * torch.fft.rfft(c, dim=-1)).sum(dim=(-3, -2))
    return torch.fft.irfft(mixed, n=g, dim=-1).reshape(*lead, p * g)


def kronecker_matvec(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """x (B ⊗ A)ᵀ as B X Aᵀ with X = x reshaped to (r, n/r); A: (r, n/r), B: (m/r, r)."""
    lead = x.shape[:-1]
    X = x.reshape(-1, A.shape[0], A.shape[1])
    return (B @ X @ A.T).reshape(*lead, B.shape[0] * A.shape[0])


def circulant_dense(v: Tensor) -> Tensor:
    """Blocks C_col(v[i, j]) assembled: (p, q, g) -> (p·g, q·g)."""
    return assemble_blocks(v[:, :, circulant_index(v.shape[-1], v.device).T])


def symmetric_toeplitz_blocks(v: Tensor) -> Tensor:
    """T(v) for every leading index: (..., g) -> (..., g, g)."""
    steps = torch.arange(v.shape[-1], device=v.device)
    return v[..., (steps[:, None] - steps[None, :]).abs()]


def skew_circulant_blocks(s: Tensor) -> Tensor:
    """S(s) (first row s, wrapped entries negated) for every leading index: (..., g) -> (..., g, g)."""
    g = s.shape[-1]
    steps = torch.arange(g, device=s.device)
    sign = torch.where(steps[None, :] >= steps[:, None], 1.0, -1.0).to(s.dtype)
    return s[..., circulant_index(g, s.device)] * sign


def toeplitz_dense(a: Tensor, b: Tensor) -> Tensor:
    return assemble_blocks(symmetric_toeplitz_blocks(b) @ symmetric_toeplitz_blocks(a))


def ldr_dense(c: Tensor, s: Tensor) -> Tensor:
    circ = c[..., circulant_index(c.shape[-1], c.device).T]  # C_col(c): (p, q, K, g, g)
    return assemble_blocks((circ @ skew_circulant_blocks(s).transpose(-1, -2)).sum(dim=2))


# ----------------------------------------------------------------------------------------------
# Config and adapter
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SURMConfig(AdapterConfig):
    """SURM hyper-parameters; ``structure`` picks the matrix family (see the module docstring)."""

    method = "surm"

    structure: str = config_field("circulant", "structured family of ΔW: circulant, toeplitz, kronecker or ldr")
    alpha: float = config_field(1.0, "scale of ΔW (kronecker: alpha / r)")
    block_size: int | None = config_field(
        None, "circulant/toeplitz/ldr tile size g (must divide both widths); None: g = gcd(out, in)"
    )
    use_prod: bool = config_field(True, "circulant: parametrise the kernel as a ⊙ b (official default)")
    displacement_rank: int = config_field(1, "ldr: number K of circulant × skew-circulant products")
    r: int = config_field(16, "kronecker: A is r × (in/r), B is (out/r) × r; r must divide both widths")
    dropout: float = config_field(0.0, "dropout probability on the adapter branch's input")

    def validate(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "structure", self.structure, STRUCTURES)
        check_positive_number(owner, "alpha", self.alpha)
        check_positive_int(owner, "displacement_rank", self.displacement_rank)
        check_positive_int(owner, "r", self.r)
        check_dropout(owner, self.dropout)
        if self.block_size is not None:
            check_positive_int(owner, "block_size", self.block_size)
            if self.structure == "kronecker":
                raise ValueError(f"{owner}: block_size does not apply to structure='kronecker'; leave it None")


class SURMAdapter(Adapter):
    """ΔW from one structured family, applied by its fast matvec; dense only for merging."""

    def __init__(self, base: nn.Module, config: SURMConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.structure = config.structure
        self.alpha = config.alpha
        self.surm_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        m, n = self.out_features, self.in_features
        if self.structure == "kronecker":
            self._build_kronecker(config.r)
            return
        g = config.block_size or math.gcd(m, n)
        check_block_divides(self, g, "block_size")
        self.block_size = g
        tiles = (m // g, n // g)
        if self.structure == "circulant":
            self.surm_a = nn.Parameter(torch.zeros(*tiles, g))
            self.surm_b = nn.Parameter(torch.zeros(*tiles, g)) if config.use_prod else None
            if config.use_prod:
                nn.init.normal_(self.surm_a, std=1.0)
        elif self.structure == "toeplitz":
            self.surm_a = nn.Parameter(torch.randn(*tiles, g) * 0.02)
            self.surm_b = nn.Parameter(torch.zeros(*tiles, g))
        else:  # ldr
            self.surm_c = nn.Parameter(torch.zeros(*tiles, config.displacement_rank, g))
            self.surm_s = nn.Parameter(torch.randn(*tiles, config.displacement_rank, g) * 0.02)

    def _build_kronecker(self, r: int) -> None:
        m, n = self.out_features, self.in_features
        if m % r or n % r:
            raise self.fail(
                f"kronecker r={r} does not divide both widths {m} and {n}",
                f"Use an r dividing gcd({m}, {n}) = {math.gcd(m, n)}, or exclude this layer from targets",
            )
        self.r = r
        self.surm_A = nn.Parameter(torch.empty(r, n // r))
        self.surm_B = nn.Parameter(torch.zeros(m // r, r))
        nn.init.kaiming_uniform_(self.surm_A, a=math.sqrt(5))

    def _kernel(self) -> Tensor:
        """Circulant first column per block: a ⊙ b, or a."""
        return self.surm_a if self.surm_b is None else self.surm_a * self.surm_b

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        x = self.surm_dropout(x)
        if self.structure == "circulant":
            delta = circulant_matvec(x, self._kernel())
        elif self.structure == "toeplitz":
            delta = toeplitz_matvec(x, self.surm_a, self.surm_b)
        elif self.structure == "ldr":
            delta = ldr_matvec(x, self.surm_c, self.surm_s)
        else:
            return base_out + kronecker_matvec(x, self.surm_A, self.surm_B) * (self.alpha / self.r)
        return base_out + self.alpha * delta

    def delta_weight(self) -> Tensor:
        if self.structure == "circulant":
            return self.alpha * circulant_dense(self._kernel())
        if self.structure == "toeplitz":
            return self.alpha * toeplitz_dense(self.surm_a, self.surm_b)
        if self.structure == "ldr":
            return self.alpha * ldr_dense(self.surm_c, self.surm_s)
        return (self.alpha / self.r) * torch.kron(self.surm_B, self.surm_A)

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: SURMConfig) -> int:
        if config.structure == "kronecker":
            return out_features + in_features
        tiles = out_features * in_features // (config.block_size or math.gcd(out_features, in_features))
        per_tile = {"circulant": 2 if config.use_prod else 1, "toeplitz": 2, "ldr": 2 * config.displacement_rank}
        return per_tile[config.structure] * tiles

    def describe(self) -> str:
        if self.structure == "kronecker":
            return f"kronecker r={self.r}"
        return f"{self.structure} g={self.block_size}"


register("surm", SURMConfig, SURMAdapter)
