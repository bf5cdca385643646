"""Compression and low-rank training: layers become two thin factors.

* One-shot compression of trained Linear layers into :class:`FactorizedLinear`:
  ``rankwise.compress(model, ratio=0.5, method="svd" | "whitened", calibration=...)`` (LoRD and
  SVD-LLM whitening, see :mod:`rankwise.compress.svd`); ``save_compressed`` / ``load_compressed`` /
  ``decompress``.
* Low-rank training of Linear and Conv2d layers: :class:`TRP` (Trained Rank Pruning) and
  :class:`Cuttlefish`, which end in :class:`FactorizedLinear` / :class:`FactorizedConv2d` pairs.
* The matrix decompositions of "Low-Rank Approximation, Adaptation, and Other Tales"
  (:mod:`rankwise.compress.decompositions`).

The package module itself is callable (``rankwise.compress(...)``) so that the package and the
function of the same name are interchangeable wherever ``rankwise.compress`` resolves to either.
"""

import sys
import types
from typing import Any

from .cuttlefish import Cuttlefish, CuttlefishConfig
from .decompositions import (
    FitInfo,
    als_low_rank,
    hadamard_decomposition,
    khatri_rao,
    khatri_rao_decomposition,
    kronecker_decomposition,
)
from .factorized import FactorizedLinear, break_even_rank
from .lowrank_conv import FactorizedConv2d, factorize_layer
from .storage import load_compressed, save_compressed
from .svd import CompressionReport, compress, compression_report, decompress
from .trp import TRP, TRPConfig


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "TRP",
    "CompressionReport",
    "Cuttlefish",
    "CuttlefishConfig",
    "FactorizedConv2d",
    "FactorizedLinear",
    "FitInfo",
    "TRPConfig",
    "als_low_rank",
    "break_even_rank",
    "compress",
    "compression_report",
    "decompress",
    "factorize_layer",
    "hadamard_decomposition",
    "khatri_rao",
    "khatri_rao_decomposition",
    "kronecker_decomposition",
    "load_compressed",
    "save_compressed",
]
