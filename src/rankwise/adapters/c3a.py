"""C3A: block-circular convolution adaptation, equal to Hugging Face PEFT 0.21.2's C3A in outputs,
merged weights and kernel gradients (and exact where PEFT's input gradient is not).

Paper: "Parameter-Efficient Fine-Tuning via Circular Convolution", Chen, Cheng, Liu, Gao, Tsung,
Li, Li, Findings of ACL 2025, arXiv:2407.19342. The authors' code is PEFT's ``tuners/c3a``.

Math (W ∈ R^{m×n}, y = x Wᵀ + b, block size b dividing m and n, p = m/b, q = n/b)::

    K ∈ R^{p×q×b}                               (c3a_kernel, PEFT's shape and name)
    C(w)[t, s] = w[(s − t) mod b]               (circulant with first ROW w, PEFT's convention)
    ΔW = C_blk(K) / n,   block (i, j) of C_blk(K) is C(K[i, j])   (the 1/n is PEFT's; the paper has none)
    y  = base(x) + x ΔWᵀ

The forward never builds ΔW: x is cut into q blocks of length b and, per frequency f,
Ŷ[i, f] = Σ_j conj(K̂[i, j, f]) X̂[j, f] with K̂, X̂ the real FFTs (rfft, b//2 + 1 frequencies),
one batched complex matmul over f, then an inverse rfft. Cost per token
O((m + n) log b + m n / b), memory O(tokens · (m + n)).

Trainable parameters per layer: m·n / b.

Init (PEFT ``init_weights``): ``"xavier_uniform"`` (default, also ``False``) U(±√(6/(m+n))),
``"kaiming_uniform"`` U(±1/√n), ``"gaussian"`` N(0, 1), ``True`` or ``"zeros"`` all zeros (the
only init that leaves the model unchanged at step 0). m and n are the layer's widths, not a
block's. Each is one draw on the (p, q, b) kernel, as in PEFT, so the same seed gives PEFT's kernel.

Oracle: PEFT 0.21.2 (outputs, ΔW, merged weights, kernel gradients, seeded init for every
``init_weights`` value, adapter files both ways) and a dense block-circulant built by explicit
rolls; input gradients against that dense reference and ``gradcheck`` (PEFT's are wrong, below).
Merge adds ΔW to W and unmerge subtracts it: W comes back up to float rounding, not bit for bit.

Where we differ from PEFT, on purpose (c3a.md §2, §4, §7):
    * The input gradient is exact. PEFT's custom backward returns Σ_l g_l K[(t + l) mod b]
      (the kernel's correlation with the output gradient, a missing transpose) instead of
      Σ_i C(K_ij)ᵀ g_i; our forward is plain torch.fft + matmul, so autograd differentiates it
      exactly (gradcheck-tested in float64). Kernel gradients equal PEFT's.
    * rfft/irfft instead of complex fft/ifft: half the transform work, same numbers.
    * ΔW for merging is gathered by index (C[t, s] = K[(s − t) mod b]) instead of pushing an
      identity matrix through the FFTs: exact and O(m n) instead of O(n (m + n) log b).
    * Float64 base layers keep a float64 kernel (PEFT always computes in float32); half-precision
      bases get a float32 kernel, as in PEFT.
    * Conv1D (GPT-2) layers work through rankwise's core; PEFT raises TypeError on them.
    * ``block_size`` defaults to 64 (PEFT: 256): 64 divides the widths of MiniLM (384, 1536), BERT,
      GPT-2 and Llama (11008 = 2⁸·43) and is the paper's ViT choice. There is no
      ``block_size_pattern``; importing a PEFT adapter that uses one is an error.
    * A single adapter per layer, so PEFT's multi-adapter bug (c3a.md §7) cannot arise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.config import AdapterConfig, check_choice, check_positive_int, config_field
from ..core.layer import Adapter, add_into_output
from ..core.registry import PeftFormat, register

INITS = (True, False, "zeros", "gaussian", "kaiming_uniform", "xavier_uniform")


# ----------------------------------------------------------------------------------------------
# Block-circulant algebra, shared with SURM's circulant family
# ----------------------------------------------------------------------------------------------


def block_spectral_matvec(x: Tensor, spectrum: Tensor, block: int) -> Tensor:
    """Apply a block-circulant matrix given by its kernels' spectra to the last axis of ``x``.

    ``x`` has shape (..., q·b); ``spectrum`` (p, q, b//2 + 1) complex holds, for block (i, j), the
    rfft eigenvalues λ of its circulant, so that block (i, j) acts as ``irfft(λ ⊙ rfft(u))``.
    Returns (..., p·b). No p·b × q·b matrix is built.
    """
    p, q, _freqs = spectrum.shape
    lead = x.shape[:-1]
    x_hat = torch.fft.rfft(x.reshape(-1, q, block), dim=-1)  # (N, q, F)
    if q == 1 and p == 1:
        y_hat = x_hat * spectrum[0]
    else:
        # (F, N, q) @ (F, q, p) -> (F, N, p): one batched complex matmul over the frequencies.
        y_hat = torch.matmul(x_hat.permute(2, 0, 1), spectrum.permute(2, 1, 0)).permute(1, 2, 0)
    y = torch.fft.irfft(y_hat, n=block, dim=-1)  # (N, p, b)
    return y.reshape(*lead, p * block)


def circulant_index(block: int, device: torch.device) -> Tensor:
    """(b, b) index with [t, s] = (s − t) mod b: ``v[index]`` is the circulant with first ROW v."""
    steps = torch.arange(block, device=device)
    return (steps[None, :] - steps[:, None]) % block


def assemble_blocks(blocks: Tensor) -> Tensor:
    """(p, q, b, b) blocks -> the (p·b, q·b) matrix whose block (i, j) is ``blocks[i, j]``."""
    p, q, b, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)


def circulant_rows(kernel: Tensor) -> Tensor:
    """Dense block-circulant matrix with first-ROW kernels: (p, q, b) -> (p·b, q·b)."""
    return assemble_blocks(kernel[:, :, circulant_index(kernel.shape[-1], kernel.device)])


def check_block_divides(adapter: Adapter, block: int, option: str) -> None:
    """Raise the layer-naming ValueError when ``block`` does not divide both widths."""
    m, n = adapter.out_features, adapter.in_features
    if m % block or n % block:
        divisors = [d for d in range(1, math.gcd(m, n) + 1) if math.gcd(m, n) % d == 0]
        raise adapter.fail(
            f"{option}={block} does not divide both widths {m} and {n}",
            f"Use an {option} dividing gcd({m}, {n}) = {math.gcd(m, n)}: one of {divisors[-8:]}, "
            "or exclude this layer from targets",
        )


# ----------------------------------------------------------------------------------------------
# Config and adapter
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class C3AConfig(AdapterConfig):
    """C3A hyper-parameters, named as in PEFT's ``C3AConfig``."""

    method = "c3a"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    block_size: int = config_field(
        64, "circulant block size b; must divide in and out width of every target (64 fits 384/768/1536/3072)"
    )
    init_weights: bool | str = config_field(
        "xavier_uniform",
        "'xavier_uniform' (default, PEFT's), 'kaiming_uniform', 'gaussian', or True/'zeros' for a zero "
        "kernel that leaves the model unchanged at step 0",
    )

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "block_size", self.block_size)
        check_choice(owner, "init_weights", self.init_weights, INITS)
        if self.block_size == 1:
            warnings.warn(
                f"{owner}: block_size=1 makes ΔW a dense m×n matrix (full fine-tuning of the layer, plus FFT "
                "overhead); use LoRA or a larger block size",
                stacklevel=3,
            )


class C3AAdapter(Adapter):
    """ΔW = C_blk(K)/n applied through FFTs; the dense ΔW is built only for merging."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: C3AConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        check_block_divides(self, config.block_size, "block_size")
        self.block_size = config.block_size
        b = self.block_size
        self.c3a_kernel = nn.Parameter(torch.zeros(self.out_features // b, self.in_features // b, b))
        self._init_kernel(config.init_weights)

    @torch.no_grad()
    def _init_kernel(self, init: bool | str) -> None:
        m, n = self.out_features, self.in_features
        if init in (True, "zeros"):
            return
        if init == "gaussian":
            nn.init.normal_(self.c3a_kernel)
        elif init == "kaiming_uniform":
            nn.init.uniform_(self.c3a_kernel, -1.0 / math.sqrt(n), 1.0 / math.sqrt(n))
        else:  # "xavier_uniform" or False, as in PEFT
            bound = math.sqrt(6.0 / (m + n))
            nn.init.uniform_(self.c3a_kernel, -bound, bound)

    def kernel_spectrum(self) -> Tensor:
        """rfft eigenvalues of every block: first-row circulants act by conj(K̂) (cross-correlation)."""
        return torch.fft.rfft(self.c3a_kernel, dim=-1).conj()

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        spectrum = self.kernel_spectrum()
        if torch.is_grad_enabled() and (x.requires_grad or spectrum.requires_grad):
            # Keep only x (already alive) for the backward and recompute its rfft there, as PEFT's
            # hand-written backward does, instead of holding a complex copy of x per layer.
            delta = checkpoint(block_spectral_matvec, x, spectrum, self.block_size, use_reentrant=False,
                               preserve_rng_state=False)
        else:
            delta = block_spectral_matvec(x, spectrum, self.block_size)
        return add_into_output(base_out, delta, alpha=1.0 / self.in_features)

    def delta_weight(self) -> Tensor:
        return circulant_rows(self.c3a_kernel) / self.in_features

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: C3AConfig) -> int:
        return out_features * in_features // config.block_size

    def describe(self) -> str:
        return f"b={self.block_size}"


# ----------------------------------------------------------------------------------------------
# PEFT's C3AConfig <-> ours
# ----------------------------------------------------------------------------------------------


def _to_peft(config: C3AConfig) -> dict[str, Any]:
    init = True if config.init_weights == "zeros" else config.init_weights
    return {"block_size": config.block_size, "init_weights": init}


def _from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "block_size": peft_config.get("block_size", 256),
        "init_weights": peft_config.get("init_weights", "xavier_uniform"),
    }


register("c3a", C3AConfig, C3AAdapter, peft=PeftFormat("C3A", lambda c: True, _to_peft, _from_peft, {}))
