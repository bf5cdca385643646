"""A Linear layer stored as two thin factors: y = (x Vᵀ) Uᵀ + b with U (out, r), V (r, in).

This is what every compression method in rankwise produces (LoRD/SVD, TRP, Cuttlefish): it costs
r·(m + n) weights and r·(m + n) multiply-adds per token instead of m·n, and so it only pays off
while r < m·n / (m + n) (see :func:`break_even_rank`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank at which two factors hold as many weights as the dense matrix: mn / (m + n)."""
    return out_features * in_features / (out_features + in_features)


class FactorizedLinear(nn.Module):
    """``up(down(x))``: ``down`` is a bias-free Linear(in, r), ``up`` a Linear(r, out) holding the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"FactorizedLinear({in_features} -> {out_features}): rank {rank} must be in [1, {min(in_features, out_features)}]"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, left: Tensor, right: Tensor, bias: Tensor | None = None) -> FactorizedLinear:
        """The layer with W = left @ right (left (out, r), right (r, in)) and the given bias."""
        out_features, rank = left.shape
        layer = cls(right.shape[1], out_features, rank, bias=bias is not None)
        layer.to(device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(left)
            layer.down.weight.copy_(right)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def replacing(cls, dense: nn.Module, left: Tensor, right: Tensor) -> FactorizedLinear:
        """The layer W = left @ right standing in for ``dense``: its dtype, device and bias."""
        weight, bias = dense.weight, dense.bias
        return cls.from_factors(left.to(device=weight.device, dtype=weight.dtype),
                                right.to(device=weight.device, dtype=weight.dtype),
                                None if bias is None else bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> Tensor:
        """The (out, in) matrix this layer applies."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def to_linear(self) -> nn.Linear:
        """Merge back into a plain nn.Linear with the same function."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None)
        layer.to(device=self.up.weight.device, dtype=self.up.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if self.up.bias is not None:
                layer.bias.copy_(self.up.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
