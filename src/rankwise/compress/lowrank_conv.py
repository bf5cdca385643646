"""Shared low-rank helpers for TRP and Cuttlefish: matricisation, rank rules, two-layer factorisation.

Matricisation ("scheme") of a weight W, from the TRP spec (§2) and the official TRP code
(yuhuixu1993/Trained-Rank-Pruning, ``decompose.py``); Cuttlefish (arXiv 2305.02538) uses the channel
scheme only:

* ``linear``  — nn.Linear, M = W (out × in).
* ``channel`` — Conv2d W (N, C, kH, kW) → M = W.reshape(N, C·kH·kW). Factorised as
  Conv(C→r, kH×kW, the original stride/padding/dilation) with Σ_r^½ V_rᵀ, then Conv(r→N, 1×1, bias) with
  U_r Σ_r^½. This is a data-free weight SVD, not Zhang et al.'s response-based method (TRP issue #3).
* ``spatial`` — Conv2d W → permute to (C, kH, N, kW) → M ∈ R^{(C·kH)×(N·kW)} (Jaderberg et al. scheme 2).
  Factorised as Conv(C→r, kH×1, stride (s_h,1), padding (p_h,0), dilation (d_h,1)) with U_r Σ_r^½, then
  Conv(r→N, 1×kW, stride (1,s_w), padding (0,p_w), dilation (1,d_w), bias) with Σ_r^½ V_rᵀ. The official
  code puts all of Σ on the second layer; any split is exact, we split √σ as for the other schemes.

At full rank every pair reproduces the original layer exactly (no nonlinearity between the factors).

Rank rules (TRP ``decompose.py``): energy k(e) = min{k : Σ_{i≤k} σᵢ² / Σ σᵢ² ≥ e}, value k = #{σᵢ ≥ τ}.
Stable rank (Cuttlefish): srank(M) = ‖M‖_F² / ‖M‖₂² = Σσᵢ² / σ₁².

Counts: a factorised layer holds r·(a + b) weights for an (a × b) matricisation (plus the bias), against
a·b dense; MACs scale the same way by the output pixels, so factorising only pays below the break-even
rank a·b / (a + b) (:func:`break_even_rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.layer import AdaptedLayer, SavedModule
from ..core.quantised import check_not_quantised, check_not_sharded
from . import ranks
from .factorized import FactorizedLinear, break_even_rank

Scheme = Literal["channel", "spatial"]
SCHEMES: tuple[str, ...] = ("channel", "spatial")


def check_energy(energy: float, what: str) -> float:
    """Return ``energy`` if it lies in (0, 1], else raise a ValueError naming ``what``."""
    if not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise ValueError(f"{what}: energy threshold {energy!r} must lie in (0, 1]; e.g. 0.9 keeps 90% of Σσ²")
    return float(energy)


def check_scheme(scheme: str, what: str) -> None:
    """Raise a ValueError unless ``scheme`` is one of :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ValueError(f"{what}: scheme {scheme!r} is unknown; use one of {SCHEMES}")


#: the fix for compressing a model FSDP2 has sharded
UNSHARDED = "Compress the unsharded model (compression reads and replaces whole weights), then call fully_shard"


def check_layer(name: str, module: nn.Module) -> None:
    """Only float Linear and ungrouped Conv2d can be matricised; raise a ValueError naming the layer otherwise."""
    check_not_quantised(name, module)
    check_not_sharded(name, module, UNSHARDED)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"layer '{name}': Conv2d with groups={module.groups} (weight {tuple(module.weight.shape)}) cannot be "
                "matricised as one matrix; leave grouped/depthwise convs out of the targets"
            )
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"layer '{name}' is a {type(module).__name__}; only nn.Linear and nn.Conv2d can be factorised")


def check_not_adapted(model: nn.Module, names: Sequence[str], what: str) -> None:
    """Refuse target layers that are, or sit inside, a rankwise adapter wrapper (an adapted layer or a
    ``modules_to_save`` copy), with a ValueError naming them, before anything changes.

    Compression replaces a layer by a factorisation of one weight. For an adapted layer that weight is the
    base weight, so the adapter's update would be dropped (the compressed model would compute the base model)
    while the model still listed the adapter; a layer inside the wrapper (``base_layer``, an adapter's own
    factors, a saved copy) would be swapped under the adapter's feet. Merge the adapters first, or compress
    before adapting.
    """
    wrapped = [n for n, m in model.named_modules() if n and isinstance(m, (AdaptedLayer, SavedModule))]
    hits = [t for t in names if any(t == w or t.startswith(w + ".") for w in wrapped)]
    if hits:
        raise ValueError(
            f"{what}: the target layer(s) {hits[:8]} of {type(model).__name__} carry a rankwise adapter (or lie "
            "inside one); compressing them would factorise the base weight alone and drop the adapter's update. "
            "Call rankwise.unload(model, merge=True) first to fold the adapters into the weights, or compress "
            "before adapting"
        )


def resolve_targets(model: nn.Module, targets: Sequence[str] | None, default: list[str], what: str) -> dict[str, nn.Module]:
    """Map target names to modules, checking each (no layer of an adapter: :func:`check_not_adapted`); raise if
    none match."""
    modules = dict(model.named_modules())
    names = list(targets) if targets is not None else default
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{what}: target layers {missing[:5]} do not exist in {type(model).__name__}")
    check_not_adapted(model, names, what)
    if not names:
        raise ValueError(
            f"{what}: {type(model).__name__} has no matching layers (Linear / ungrouped Conv2d); "
            "pass explicit module names as targets"
        )
    for name in names:
        check_layer(name, modules[name])
    return {n: modules[n] for n in names}


def matricize(weight: Tensor, scheme: Scheme = "channel") -> Tensor:
    """The matrix M of a Linear (2-D) or Conv2d (4-D) weight under ``scheme`` (see the module docstring)."""
    if weight.dim() == 2:
        return weight
    n, c, kh, kw = weight.shape
    if scheme == "channel":
        return weight.reshape(n, c * kh * kw)
    return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def unmatricize(matrix: Tensor, shape: torch.Size | tuple[int, ...], scheme: Scheme = "channel") -> Tensor:
    """Inverse of :func:`matricize`: the weight of ``shape`` whose matrix is ``matrix``."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    n, c, kh, kw = shape
    if scheme == "channel":
        return matrix.reshape(n, c, kh, kw)
    return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3)


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """k(e) = min{k : Σ_{i≤k} σᵢ² / Σ σᵢ² ≥ e} for descending σ (1 for an all-zero spectrum); e must be in (0, 1]."""
    return ranks.energy_rank(singular_values, check_energy(energy, "energy_rank"))


def value_rank(singular_values: Tensor, threshold: float) -> int:
    """k = #{i : σᵢ ≥ τ}, at least 1 (TRP's final ``ValueThreshold``)."""
    if threshold < 0:
        raise ValueError(f"value_rank: threshold {threshold} must be >= 0")
    return max(1, int((singular_values >= threshold).sum().item()))


def stable_rank(matrix: Tensor, name: str = "matrix") -> float:
    """srank(M) = ‖M‖_F² / ‖M‖₂² = Σσᵢ² / σ₁² (real-valued; Cuttlefish floors it). ``name`` labels errors."""
    if not torch.isfinite(matrix).all():
        raise ValueError(f"stable_rank of {name}: the {tuple(matrix.shape)} weight holds NaN or Inf; training diverged")
    sigma = torch.linalg.svdvals(matrix.detach().double())
    if sigma[0] <= 0:
        raise ValueError(
            f"stable_rank of {name}: the {tuple(matrix.shape)} weight is all zero, so its stable rank is undefined; "
            "initialise the layer or leave it out of the targets"
        )
    return float((sigma**2).sum() / sigma[0] ** 2)


def rank_cap(weight_shape: torch.Size | tuple[int, ...], scheme: Scheme = "channel") -> int:
    """min of the matricised dimensions: the largest rank the layer can have."""
    if len(weight_shape) == 2:
        return min(weight_shape)
    n, c, kh, kw = weight_shape
    return min(n, c * kh * kw) if scheme == "channel" else min(c * kh, n * kw)


def layer_break_even(weight_shape: torch.Size | tuple[int, ...], scheme: Scheme = "channel") -> float:
    """The rank at which the factorised layer holds as many weights as the dense one."""
    if len(weight_shape) == 2:
        return break_even_rank(weight_shape[0], weight_shape[1])
    n, c, kh, kw = weight_shape
    rows, cols = (n, c * kh * kw) if scheme == "channel" else (c * kh, n * kw)
    return break_even_rank(rows, cols)


def split_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(L, R) with L = U_r Σ_r^½ (a×r) and R = Σ_r^½ V_rᵀ (r×b), so L R is the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def conv_signature(conv: nn.Conv2d) -> dict[str, Any]:
    """What :class:`FactorizedConv2d` takes from ``conv``, JSON-ready: convs with equal signatures factorise alike."""
    return {
        "weight_shape": list(conv.weight.shape),
        "stride": list(_pair(conv.stride)),
        "padding": conv.padding if isinstance(conv.padding, str) else list(_pair(conv.padding)),
        "dilation": list(_pair(conv.dilation)),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


class FactorizedConv2d(nn.Module):
    """``second(first(x))``: a Conv2d as two thin convs under the channel or spatial scheme (no bias on ``first``)."""

    def __init__(self, conv: nn.Conv2d, rank: int, scheme: Scheme = "channel") -> None:
        super().__init__()
        n, c = conv.out_channels, conv.in_channels
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, _pair(conv.stride), _pair(conv.dilation)
        padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        pad_h, pad_w = (padding, padding) if isinstance(padding, str) else ((padding[0], 0), (0, padding[1]))
        common = {"padding_mode": conv.padding_mode, "device": conv.weight.device, "dtype": conv.weight.dtype}
        if scheme == "channel":
            self.first = nn.Conv2d(c, rank, (kh, kw), (sh, sw), padding, (dh, dw), bias=False, **common)
            self.second = nn.Conv2d(rank, n, 1, bias=conv.bias is not None, **common)
        else:
            self.first = nn.Conv2d(c, rank, (kh, 1), (sh, 1), pad_h, (dh, 1), bias=False, **common)
            self.second = nn.Conv2d(rank, n, (1, kw), (1, sw), pad_w, (1, dw), bias=conv.bias is not None, **common)
        self.scheme = scheme
        self.rank = rank
        self.weight_shape = tuple(conv.weight.shape)
        self.conv_signature = conv_signature(conv)  # the original layer, for save_compressed / load_compressed

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        """(B, A) with B A = M, the matricised dense weight (views of the parameters, autograd-friendly)."""
        n, c, kh, kw = self.weight_shape
        if self.scheme == "channel":
            return self.second.weight.reshape(n, self.rank), self.first.weight.reshape(self.rank, c * kh * kw)
        # spatial: first (r, C, kH, 1) holds L (C·kH × r); second (N, r, 1, kW) holds R (r × N·kW)
        left = self.first.weight.reshape(self.rank, c * kh).T
        right = self.second.weight.reshape(n, self.rank, kw).permute(1, 0, 2).reshape(self.rank, n * kw)
        return left, right

    def dense_weight(self) -> Tensor:
        """The (N, C, kH, kW) kernel this pair applies."""
        left, right = self.factor_matrices()
        return unmatricize(left @ right, self.weight_shape, self.scheme)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, rank={self.rank}, scheme={self.scheme}"


def factorize_layer(name: str, module: nn.Module, rank: int, scheme: Scheme = "channel") -> nn.Module:
    """The two-layer replacement of ``module`` at ``rank`` from its truncated SVD (√σ on each factor).

    Linear → :class:`FactorizedLinear`; Conv2d → :class:`FactorizedConv2d` under ``scheme``.
    """
    check_layer(name, module)
    check_scheme(scheme, f"layer '{name}'")
    weight = module.weight.detach()
    cap = rank_cap(weight.shape, scheme)
    if not (isinstance(rank, int) and 1 <= rank <= cap):
        raise ValueError(
            f"layer '{name}': rank {rank!r} is outside [1, {cap}] for weight {tuple(weight.shape)} "
            f"({scheme if weight.dim() == 4 else 'linear'} matricisation); pick a rank <= {cap}"
        )
    left, right = split_svd(matricize(weight.double(), scheme), rank)
    left, right = left.to(weight.dtype), right.to(weight.dtype)
    bias = None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.Linear):
        return FactorizedLinear.from_factors(left, right, bias)
    pair = FactorizedConv2d(module, rank, scheme)
    n, c, kh, kw = weight.shape
    with torch.no_grad():
        if scheme == "channel":
            pair.first.weight.copy_(right.reshape(rank, c, kh, kw))
            pair.second.weight.copy_(left.reshape(n, rank, 1, 1))
        else:
            pair.first.weight.copy_(left.T.reshape(rank, c, kh, 1))
            pair.second.weight.copy_(right.reshape(rank, n, kw).permute(1, 0, 2).reshape(n, rank, 1, kw))
        if bias is not None:
            pair.second.bias.copy_(bias)
    return pair


def set_submodule(model: nn.Module, name: str, child: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``child``."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, child)


def frobenius_decay(modules: list[nn.Module], coefficient: float) -> Tensor:
    """(λ/2) Σ ‖B A‖_F² over factorised layers (Khodak et al., ICLR 2021), to be added to the loss.

    Its gradients are ∇_A = λ Bᵀ(BA) and ∇_B = λ (BA)Aᵀ, what the Cuttlefish code adds by hand.
    """
    terms = [
        (m.up.weight @ m.down.weight if isinstance(m, FactorizedLinear) else torch.matmul(*m.factor_matrices()))
        .pow(2)
        .sum()
        for m in modules
    ]
    if not terms:
        return torch.zeros(())
    return 0.5 * coefficient * torch.stack(terms).sum()


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass per sample, over Conv2d and Linear layers (biases ignored)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_pixel = module.in_channels // module.groups * kh * kw * module.out_channels
            total += per_pixel * output.shape[-1] * output.shape[-2]
        else:
            total += module.in_features * module.out_features * (output.numel() // output.shape[-1] // output.shape[0])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total


__all__ = [
    "FactorizedConv2d",
    "check_energy",
    "conv_signature",
    "count_macs",
    "energy_rank",
    "factorize_layer",
    "frobenius_decay",
    "matricize",
    "rank_cap",
    "stable_rank",
    "unmatricize",
    "value_rank",
]
