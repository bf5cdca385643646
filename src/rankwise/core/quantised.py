"""Recognise quantised layers, which rankwise does not wrap or factorise (yet).

Quantisation libraries replace ``nn.Linear`` by layers that subclass it or look like it:
bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (``Int8Params`` / ``Params4bit`` weights, quantised when
moved to a device), optimum-quanto's ``QLinear``, torchao's ``nn.Linear`` whose weight becomes an
``AffineQuantizedTensor``, GPTQ / AWQ layers with a packed ``qweight``, HQQ's ``W_q``. Treated as a
float ``nn.Linear`` such a layer is adapted wrongly without a word (a packed 4-bit weight reads as
(out·in/2, 1); merging into an int8 weight corrupts it), so every entry that wraps or factorises
layers asks :func:`check_not_quantised` first, before it changes the model.

A weight sharded by FSDP2's ``fully_shard`` is a ``DTensor``, a tensor subclass too, but not a
quantised one: it is judged by the shard it holds (:func:`local_tensor`), so a DTensor of float
shards passes and a DTensor holding int8 or a quantised subclass does not. Adapting or compressing
a sharded layer is still refused, by :func:`check_not_sharded`: the adapter must exist before
``fully_shard`` so that FSDP shards and synchronises its parameters too, and compression needs the
whole weight.
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


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None in a torch build without distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """True for a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard``, or otherwise distributed)."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The shard a ``DTensor`` holds on this process (what its dtype and class really are), else ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def quantisation_reason(module: nn.Module) -> str | None:
    """Why ``module`` looks quantised (a phrase for an error message), or None when it does not.

    A module is quantised when its class comes from a quantisation package, when it holds a
    ``qweight`` / ``W_q``, or when its ``weight`` is a tensor subclass other than ``nn.Parameter``
    or has a dtype outside :data:`FLOAT_DTYPES` (int8, packed uint8, float8, ...). A sharded
    weight (``DTensor``) is judged by its local shard.
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
        weight = local_tensor(weight)
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


def check_not_sharded(name: str, module: nn.Module, fix: str) -> None:
    """``ValueError`` naming the layer and ``fix`` if its weight is already sharded (``fully_shard`` ran first).

    rankwise adapts and compresses whole layers: adapter parameters added to a module FSDP already manages
    would be neither sharded nor gradient-synchronised (every process would train its own adapter on its own
    data, silently), and a factorisation of a shard is not one of the weight.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and is_sharded(weight):
        raise ValueError(
            f"layer '{name}' ({type(module).__name__}) has a sharded weight (a DTensor: FSDP2's fully_shard already "
            f"ran on the model). {fix}"
        )
