"""SURM: structured unrestricted-rank matrices as LoRA replacements (circulant, symmetric
Toeplitz product, Kronecker, general circulant × skew-circulant LDR).

Paper: "Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning", Sehanobish,
Dubey, Choromanski, Basu Roy Chowdhury, Jain, Sindhwani, Chaturvedi, NeurIPS 2024,
arXiv:2406.17740. Official code: arijitthegame/structured-matrices-PEFT (``src/lora/*_lora.py``);
the square formulas below are its LoRA-style layers, the rectangular ones the paper's §3
definitions of m×n structured matrices.

One method, ``"surm"``, with ``structure=`` choosing the family. Notation (W ∈ R^{m×n},
y = x Wᵀ + b): C_col(v) is the circulant with first column v (C[t, s] = v[(t − s) mod g], so
C_col(v) u = v ⊛ u); T(v) the symmetric Toeplitz matrix T[t, s] = v[|t − s|]; S(s) the
skew-circulant with first row s (S[t, u] = s[u − t] for u ≥ t, −s[u − t + g] for u < t).

Square layers (m = n = g), exactly the official layers, with scale α::

    circulant   ΔW = α C_col(a ⊙ b)                 (``use_prod=False``: α C_col(a))
    toeplitz    ΔW = α T(b) T(a)                    (x ΔWᵀ = α x T(a) T(b), official order)
    ldr         ΔW = α Σ_{k<K} C_col(c_k) S(s_k)ᵀ   (K = ``displacement_rank``)
    kronecker   ΔW = (α / r) B ⊗ A,  A ∈ R^{r×(n/r)}, B ∈ R^{(m/r)×r}   (r | m, n; any m, n)

Rectangular layers (m ≠ n). The official circulant / Toeplitz / LDR layers assert m = n and every
experiment of the paper adapts square matrices, so ``rectangular`` makes the choice explicit:
    * ``"error"`` (default): such a layer raises a ValueError that names the two options below.
    * ``"native"``: the paper's §3 rectangular matrices. Circulant: ΔWᵀ ∈ R^{n×m} (the matrix the
      official code applies as x·ΔWᵀ) is the §3 n×m circulant with first row v ∈ R^m, every next
      row the one above shifted right by one, cyclically: ΔW[i, j] = α v[(i − j) mod m], v = a ⊙ b
      (or a), i.e. the first n columns of C_col(v) when n ≤ m, columns repeating every m when
      n > m; for m = n it is the square layer. Toeplitz: the §3 general m×n Toeplitz matrix,
      ΔW[i, j] = α t[i − j + n − 1] with t ∈ R^{m+n−1} (first column and first row), one matrix
      rather than the square layer's product of two symmetric ones (which has no m×n form). LDR
      has no rectangular form in the paper and refuses ``"native"``.
    * ``"tile"``: rankwise's own block tiling (not in the paper or the code): ΔW is a grid of g×g
      blocks, g = gcd(m, n), each block (i, j) its own square structured matrix as above.
``block_size=g`` tiles every layer, square ones included, with g×g blocks (g must divide m and n).
Whenever a layer's adapter ends up with more trainable parameters than the dense m×n update
(e.g. tiling with g = 1, or g < 2K for LDR), a warning names the layer and both counts.

Forward, never building ΔW: circulant blocks act through one rfft / batched complex matmul /
irfft (the same kernel as C3A, O(N((m + n) log g + m n / g)) for N tokens); T(v) u is the first g
entries of a length-2g circulant convolution (two FFT products per block, O(N m n / g · log g));
S(s)ᵀ u is the negacyclic convolution s ⊛₋ u = Re(η̄ ⊙ ifft(fft(η ⊙ s) ⊙ fft(η ⊙ u))),
η_t = e^{iπt/g}, followed by a circular convolution with c (O(N K m n / g · log g)); Kronecker is
B X Aᵀ on x reshaped to X ∈ R^{r×(n/r)} (O(N r (m + n))). The native rectangular circulant folds
x into its m residues mod m and convolves once (O(N(n + m log m))); the native Toeplitz is one
linear convolution, FFT length the power of two ≥ m + n − 1 (O(N (m + n) log(m + n))). For square
layers every FFT family costs O(N n log n). All backward passes are autograd through torch.fft
(gradcheck-tested).

Closed-form trainable parameters per layer:
    square (g = n) or tiled (g = block_size or gcd(m, n)): circulant 2·m·n/g (m·n/g with
    use_prod=False); toeplitz 2·m·n/g; ldr 2·K·m·n/g.
    native rectangular: circulant 2·m (m with use_prod=False); toeplitz m + n − 1.
    kronecker: m + n.

Init (official code): circulant a ~ N(0, 1), b = 0 (use_prod=False: a = 0); toeplitz
a ~ N(0, 0.02²), b = 0; ldr c = 0, s ~ N(0, 0.02²); kronecker A ~ kaiming_uniform(a=√5), B = 0;
native rectangular Toeplitz t = 0 (a single linear factor, so a zero start still trains). Every
family starts with ΔW = 0. α defaults to 1 (official ``circ_alpha``). Dropout acts on the
adapter branch's input only (official ``lora_dropout``): y = x Wᵀ + b + dropout(x) ΔWᵀ.

Where we differ from the official code, on purpose:
    * Rectangular layers: an explicit ``rectangular`` choice (above) instead of an assertion.
    * The LDR layer applies α (the official layer accepts ``circ_alpha`` and ignores it, i.e. α = 1,
      our default) and uses the correct root η = e^{iπ/g} (the official fallback uses a root of
      x^{g+1} + 1, though it is unreachable there).
    * irfft always gets n=, so odd widths work (the official ``circulant_multiply`` breaks).
    * Kronecker applies B X Aᵀ instead of materialising B ⊗ A in every forward.
    * Circulant a ~ N(0, 1) follows the code, not its "std .02" comment.
    * Only the LoRA-style (mergeable) variants; the adapter-style SURM (activation inside, not
      mergeable) and the square general 2n−1 Toeplitz are not implemented.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import (
    AdapterConfig,
    check_choice,
    check_dropout,
    check_positive_int,
    check_positive_number,
    config_field,
)
from ..core.layer import Adapter, add_into_output
from ..core.registry import register
from .c3a import assemble_blocks, block_spectral_matvec, check_block_divides, circulant_index

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr")
RECTANGULAR = ("error", "native", "tile")


# ----------------------------------------------------------------------------------------------
# Structured matrix-vector products (x: (..., n) -> (..., m)) and their dense matrices
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


def rectangular_circulant_matvec(x: Tensor, v: Tensor) -> Tensor:
    """x ΔWᵀ for the m×n ΔW[i, j] = v[(i − j) mod m]; v: (m,).

    Inputs j ≡ k (mod m) share every weight, so x folds into its m residue sums (zero-padded to
    a multiple of m), then one circular convolution of length m.
    """
    m, n = v.shape[-1], x.shape[-1]
    folds = -(-n // m)
    folded = F.pad(x, (0, folds * m - n)).reshape(*x.shape[:-1], folds, m).sum(dim=-2)
    return torch.fft.irfft(torch.fft.rfft(folded, dim=-1) * torch.fft.rfft(v), n=m, dim=-1)


def rectangular_toeplitz_matvec(x: Tensor, t: Tensor) -> Tensor:
    """x ΔWᵀ for the m×n ΔW[i, j] = t[i − j + n − 1]; t: (m + n − 1,).

    Output i is entry i + n − 1 of the linear convolution t ∗ x; a circular one of any length
    L ≥ m + n − 1 never wraps onto those entries. L is the next power of two, as in the official
    ``toeplitz_multiplication`` (m + n − 1 itself may be prime, a slow FFT size).
    """
    n = x.shape[-1]
    m = t.shape[-1] - n + 1
    length = 1 << (t.shape[-1] - 1).bit_length()
    spectrum = torch.fft.rfft(x, n=length, dim=-1) * torch.fft.rfft(t, n=length)
    return torch.fft.irfft(spectrum, n=length, dim=-1)[..., n - 1: n - 1 + m]


def index_differences(m: int, n: int, device: torch.device) -> Tensor:
    """(m, n) matrix of i − j."""
    return torch.arange(m, device=device)[:, None] - torch.arange(n, device=device)[None, :]


def circulant_dense(v: Tensor) -> Tensor:
    """Blocks C_col(v[i, j]) assembled: (p, q, g) -> (p·g, q·g)."""
    return assemble_blocks(v[:, :, circulant_index(v.shape[-1], v.device).T])


def symmetric_toeplitz_blocks(v: Tensor) -> Tensor:
    """T(v) for every leading index: (..., g) -> (..., g, g)."""
    g = v.shape[-1]
    return v[..., index_differences(g, g, v.device).abs()]


def skew_circulant_blocks(s: Tensor) -> Tensor:
    """S(s) (first row s, wrapped entries negated) for every leading index: (..., g) -> (..., g, g)."""
    g = s.shape[-1]
    sign = torch.where(index_differences(g, g, s.device) <= 0, 1.0, -1.0).to(s.dtype)
    return s[..., circulant_index(g, s.device)] * sign


def toeplitz_dense(a: Tensor, b: Tensor) -> Tensor:
    return assemble_blocks(symmetric_toeplitz_blocks(b) @ symmetric_toeplitz_blocks(a))


def ldr_dense(c: Tensor, s: Tensor) -> Tensor:
    circ = c[..., circulant_index(c.shape[-1], c.device).T]  # C_col(c): (p, q, K, g, g)
    return assemble_blocks((circ @ skew_circulant_blocks(s).transpose(-1, -2)).sum(dim=2))


def rectangular_circulant_dense(v: Tensor, in_features: int) -> Tensor:
    """ΔW[i, j] = v[(i − j) mod m]: (m,) -> (m, n)."""
    return v[index_differences(v.shape[-1], in_features, v.device) % v.shape[-1]]


def rectangular_toeplitz_dense(t: Tensor, out_features: int) -> Tensor:
    """ΔW[i, j] = t[i − j + n − 1]: (m + n − 1,) -> (m, n)."""
    n = t.shape[-1] - out_features + 1
    return t[index_differences(out_features, n, t.device) + n - 1]


# ----------------------------------------------------------------------------------------------
# Config and adapter
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SURMConfig(AdapterConfig):
    """SURM hyper-parameters; ``structure`` picks the matrix family (see the module docstring)."""

    method = "surm"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)
    comparison_defaults: ClassVar[dict[str, Any]] = {"rectangular": "native"}

    structure: str = config_field("circulant", "structured family of ΔW: circulant, toeplitz, kronecker or ldr")
    alpha: float = config_field(1.0, "scale of ΔW (kronecker: alpha / r)")
    rectangular: str = config_field(
        "error",
        "circulant/toeplitz/ldr layers with out != in: 'error' refuses them; 'native' uses the paper's m x n "
        "circulant (out params, 2*out with use_prod) or Toeplitz (out+in-1 params); 'tile' tiles gcd(out, in) blocks (rankwise's own)",
    )
    block_size: int | None = config_field(
        None,
        "circulant/toeplitz/ldr: tile every layer with g x g blocks (g must divide both widths); None: square "
        "layers are one block, rectangular ones follow `rectangular` ('tile': g = gcd(out, in))",
    )
    use_prod: bool = config_field(True, "circulant: parametrise the kernel as a ⊙ b (official default)")
    displacement_rank: int = config_field(1, "ldr: number K of circulant × skew-circulant products")
    r: int = config_field(16, "kronecker: A is r × (in/r), B is (out/r) × r; r must divide both widths")
    dropout: float = config_field(0.0, "dropout probability on the adapter branch's input")

    def validate(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "structure", self.structure, STRUCTURES)
        check_choice(owner, "rectangular", self.rectangular, RECTANGULAR)
        check_positive_number(owner, "alpha", self.alpha)
        check_choice(owner, "use_prod", self.use_prod, [True, False])
        check_positive_int(owner, "displacement_rank", self.displacement_rank)
        check_positive_int(owner, "r", self.r)
        check_dropout(owner, self.dropout)
        if self.structure == "kronecker" and (self.block_size is not None or self.rectangular != "error"):
            raise ValueError(
                f"{owner}: structure='kronecker' is rectangular by construction (r divides both widths); "
                "leave block_size None and rectangular at its default"
            )
        if self.block_size is not None:
            check_positive_int(owner, "block_size", self.block_size)
            if self.rectangular == "native":
                raise ValueError(
                    f"{owner}: block_size tiles every layer, rectangular='native' asks for untiled m x n matrices; "
                    "drop block_size, or use rectangular='tile'"
                )
        if self.structure == "ldr" and self.rectangular == "native":
            raise ValueError(
                f"{owner}: the paper defines no rectangular LDR matrix; use rectangular='tile' (gcd blocks), or "
                "structure='circulant' / 'toeplitz' with rectangular='native'"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Files written before ``rectangular`` existed tiled rectangular layers: they keep loading as ``"tile"``."""
        if "rectangular" not in values and values.get("structure", "circulant") != "kronecker":
            values = {**values, "rectangular": "tile"}
        return super().from_dict(values)


def tile_size(out_features: int, in_features: int, config: SURMConfig) -> int | None:
    """g of a circulant/Toeplitz/LDR layer's g×g blocks; None for an untiled rectangular layer
    (the native form with ``rectangular="native"``, refused with ``"error"``)."""
    if config.block_size is not None:
        return config.block_size
    if out_features == in_features:
        return in_features
    return math.gcd(out_features, in_features) if config.rectangular == "tile" else None


def tiled_num_params(out_features: int, in_features: int, g: int, config: SURMConfig) -> int:
    """Trainable parameters of a layer tiled with g×g blocks (a square layer is one block)."""
    per_tile = {"circulant": 2 if config.use_prod else 1, "toeplitz": 2, "ldr": 2 * config.displacement_rank}
    return per_tile[config.structure] * out_features * in_features // g


def native_num_params(out_features: int, in_features: int, config: SURMConfig) -> int:
    """Trainable parameters of the paper's m×n circulant (m, or 2m with use_prod) or Toeplitz (m + n − 1)."""
    if config.structure == "circulant":
        return out_features * (2 if config.use_prod else 1)
    return out_features + in_features - 1


class SURMAdapter(Adapter):
    """ΔW from one structured family, applied by its fast matvec; dense only for merging."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: SURMConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.structure = config.structure
        self.alpha = config.alpha
        self.surm_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.native = False
        m, n = self.out_features, self.in_features
        if self.structure == "kronecker":
            self._build_kronecker(config.r)
        elif (g := tile_size(m, n, config)) is not None:
            self._build_tiled(g, config)
        elif config.rectangular == "native":
            self._build_native(config)
        else:
            raise self._rectangular_error(config)
        self._warn_if_denser_than_dense()

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

    def _build_tiled(self, g: int, config: SURMConfig) -> None:
        check_block_divides(self, g, "block_size")
        self.block_size = g
        tiles = (self.out_features // g, self.in_features // g)
        if self.structure == "circulant":
            self._build_circulant((*tiles, g), config.use_prod)
        elif self.structure == "toeplitz":
            self.surm_a = nn.Parameter(torch.randn(*tiles, g) * 0.02)
            self.surm_b = nn.Parameter(torch.zeros(*tiles, g))
        else:  # ldr
            self.surm_c = nn.Parameter(torch.zeros(*tiles, config.displacement_rank, g))
            self.surm_s = nn.Parameter(torch.randn(*tiles, config.displacement_rank, g) * 0.02)

    def _build_native(self, config: SURMConfig) -> None:
        self.native = True
        if self.structure == "circulant":
            self._build_circulant((self.out_features,), config.use_prod)
        else:  # toeplitz
            self.surm_t = nn.Parameter(torch.zeros(self.out_features + self.in_features - 1))

    def _build_circulant(self, shape: tuple[int, ...], use_prod: bool) -> None:
        self.surm_a = nn.Parameter(torch.randn(shape) if use_prod else torch.zeros(shape))
        self.surm_b = nn.Parameter(torch.zeros(shape)) if use_prod else None

    def _rectangular_error(self, config: SURMConfig) -> ValueError:
        m, n = self.out_features, self.in_features
        g = math.gcd(m, n)
        tile = f"rectangular='tile' (g×g blocks, g = gcd = {g}: {tiled_num_params(m, n, g, config):,} parameters)"
        native = (
            "" if self.structure == "ldr" else
            f"rectangular='native' (the paper's §3 m×n {self.structure}: "
            f"{native_num_params(m, n, config):,} parameters) or "
        )
        value = "tile" if self.structure == "ldr" else "native"
        return self.fail(
            f"the official {self.structure} layer is square only, and rectangular='error' refuses m ≠ n",
            f"Set {native}{tile}, or leave this layer out of targets (e.g. only the square attention "
            f"projections); on the command line: rankwise finetune --method surm --rectangular {value}, "
            f"rankwise compare/bench --set surm.rectangular={value}",
        )

    def _warn_if_denser_than_dense(self) -> None:
        count = sum(p.numel() for p in self.parameters())
        dense = self.out_features * self.in_features
        if count > dense:
            warnings.warn(
                f"SURM layer '{self.layer_name}' ({self.out_features}×{self.in_features}, {self.describe()}) has "
                f"{count:,} trainable parameters, more than the {dense:,} of a dense update of the layer; use a "
                "larger block_size, rectangular='native', another structure, or exclude the layer",
                stacklevel=2,
            )

    def _kernel(self) -> Tensor:
        """Circulant first column (per block): a ⊙ b, or a."""
        return self.surm_a if self.surm_b is None else self.surm_a * self.surm_b

    def _scale(self) -> float:
        return self.alpha / self.r if self.structure == "kronecker" else self.alpha

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        x = self.surm_dropout(x)
        if self.structure == "kronecker":
            delta = kronecker_matvec(x, self.surm_A, self.surm_B)
        elif self.native:
            delta = (rectangular_circulant_matvec(x, self._kernel()) if self.structure == "circulant"
                     else rectangular_toeplitz_matvec(x, self.surm_t))
        elif self.structure == "circulant":
            delta = circulant_matvec(x, self._kernel())
        elif self.structure == "toeplitz":
            delta = toeplitz_matvec(x, self.surm_a, self.surm_b)
        else:
            delta = ldr_matvec(x, self.surm_c, self.surm_s)
        return add_into_output(base_out, delta, alpha=self._scale())

    def delta_weight(self) -> Tensor:
        if self.structure == "kronecker":
            dense = torch.kron(self.surm_B, self.surm_A)
        elif self.native:
            dense = (rectangular_circulant_dense(self._kernel(), self.in_features) if self.structure == "circulant"
                     else rectangular_toeplitz_dense(self.surm_t, self.out_features))
        elif self.structure == "circulant":
            dense = circulant_dense(self._kernel())
        elif self.structure == "toeplitz":
            dense = toeplitz_dense(self.surm_a, self.surm_b)
        else:
            dense = ldr_dense(self.surm_c, self.surm_s)
        return self._scale() * dense

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: SURMConfig) -> int:
        if config.structure == "kronecker":
            return out_features + in_features
        g = tile_size(out_features, in_features, config)
        if g is not None:
            return tiled_num_params(out_features, in_features, g, config)
        if config.rectangular == "native":
            return native_num_params(out_features, in_features, config)
        raise ValueError(f"SURM refuses the {out_features}×{in_features} layer with rectangular='error'")

    def describe(self) -> str:
        if self.structure == "kronecker":
            return f"kronecker r={self.r}"
        return f"{self.structure} native" if self.native else f"{self.structure} g={self.block_size}"


register("surm", SURMConfig, SURMAdapter)
