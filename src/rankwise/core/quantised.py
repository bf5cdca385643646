"""Recognise quantised layers, which rankwise does not wrap or factorise (yet).

Quantisation libraries replace ``nn.Linear`` by layers that subclass it or look like it:
bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (``Int8Params`` / ``Params4bit`` weights, quantised when
moved to a device), optimum-quanto's ``QLinear``, torchao's ``nn.Linear`` whose weight becomes an
``AffineQuantizedTensor``, GPTQ / AWQ layers with a packed ``qweight``, HQQ's ``W_q``. Treated as a
float ``nn.Linear`` such a layer is adapted wrongly without a word (a packed 4-bit weight reads as
(out·in/2, 1); merging into an int8 weight corrupts it), so every entry that wraps or factorises
layers asks :func:`check_not_quantised` first, before it changes the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Packages (and their submodules) whose layer classes hold quantised weights.
QUANTISATION_PACKAGES = (
    "bitsandbytes", "torchao", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum.quanto", "quanto", "eetq", "aqlm",
    "vptq", "exllama", "exllamav2", "compressed_tensors", "fp_quant", "optimum.gptq",
)
#: Attributes that hold a quantised weight in GPTQ / AWQ (``qweight``) and HQQ (``W_q``) layers.
QUANTISED_WEIGHT_ATTRS = ("qweight", "W_q")
#: The weight dtypes rankwise adapts and factorises.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SUPPORTED = (
    "rankwise wraps and factorises nn.Linear and transformers Conv1D layers with floating-point weights "
    "(float16, bfloat16, float32, float64) only; quantised layers are not supported yet. Dequantise the model or "
    "load it in floating point (without a quantization_config / load_in_8bit / load_in_4bit), or leave this layer "
    "out (exclude=...)"
)


def quantisation_reason(module: nn.Module) -> str | None:
    """Why ``module`` looks quantised (a phrase for an error message), or None when it does not.

    A module is quantised when its class comes from a quantisation package, when it holds a
    ``qweight`` / ``W_q``, or when its ``weight`` is a tensor subclass other than ``nn.Parameter``
    or has a dtype outside :data:`FLOAT_DTYPES` (int8, packed uint8, float8, ...).
    """
    path = type(module).__module__
    package = next((p for p in QUANTISATION_PACKAGES if path == p or path.startswith(p + ".")), None)
    if package is not None:
        return f"its class comes from the quantisation package '{package}'"
    held = next((attr for attr in QUANTISED_WEIGHT_ATTRS if hasattr(module, attr)), None)
    if held is not None:
        return f"it holds a quantised weight '{held}'"
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        if type(weight) not in (Tensor, nn.Parameter):
            return f"its weight is a {type(weight).__name__}, a tensor subclass (a quantised tensor), not a plain Parameter"
        if weight.dtype not in FLOAT_DTYPES:
            return f"its weight has dtype {weight.dtype}"
    return None


def is_quantised_linear(module: nn.Module) -> bool:
    """A quantised layer that stands for a Linear (the ones ``targets="all-linear"`` must not skip)."""
    if quantisation_reason(module) is None:
        return False
    return (isinstance(module, nn.Linear) or any(hasattr(module, a) for a in QUANTISED_WEIGHT_ATTRS)
            or "linear" in type(module).__name__.lower())


def check_not_quantised(name: str, module: nn.Module) -> None:
    """``ValueError`` naming the layer, its class and what is supported, if ``module`` is quantised."""
    reason = quantisation_reason(module)
    if reason is not None:
        cls = type(module)
        raise ValueError(f"layer '{name}' is a quantised layer ({cls.__module__}.{cls.__qualname__}: {reason}). "
                         f"{SUPPORTED}.")
