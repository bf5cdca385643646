"""Recognise quantised layers; dequantise, re-quantise and check bitsandbytes layers for the adapters.

Quantisation libraries replace ``nn.Linear`` by layers that subclass it or look like it:
bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (``Int8Params`` / ``Params4bit`` weights, quantised when
moved to a device), optimum-quanto's ``QLinear``, torchao's ``nn.Linear`` whose weight becomes an
``AffineQuantizedTensor``, GPTQ / AWQ layers with a packed ``qweight``, HQQ's ``W_q``. Treated as a
float ``nn.Linear`` such a layer is adapted wrongly without a word (a packed 4-bit weight reads as
(out·in/2, 1); merging into an int8 weight corrupts it), so every entry that wraps or factorises
layers asks :func:`check_not_quantised` (compression) or :func:`check_adaptable` (adapters) first,
before it changes the model.

Adapters (QLoRA, "QLoRA: Efficient Finetuning of Quantized LLMs", Dettmers et al., arXiv:2305.14314) also
wrap bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double quantisation, any compute dtype) and
``Linear8bitLt`` layers once their weight is quantised: the layer's own forward gives the base output, a
method that needs W reads :func:`dequantised_weight` (float, never stored), and a merge dequantises, adds
the update and re-quantises with the layer's settings (:func:`merge_into_quantised`, which warns with the
rounding error). Every other quantised class (torchao, GPTQ, AWQ, HQQ, quanto, float8, ...) is refused.
"""

from __future__ import annotations

import copy
import sys
import warnings

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
    "(float16, bfloat16, float32, float64); its adapters (not its compression) also wrap quantised bitsandbytes "
    "Linear4bit / Linear8bitLt layers, and no other quantised layers. Dequantise the model or load it in floating "
    "point (or with bitsandbytes' load_in_4bit / load_in_8bit, for adapters), or leave this layer out (exclude=...)"
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


def check_adaptable(name: str, module: nn.Module) -> None:
    """:func:`check_not_quantised`, except that a quantised bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` passes
    (a ``ValueError`` naming the layer and the fix if its weight is not quantised yet)."""
    if bnb_kind(module) is None:
        check_not_quantised(name, module)
        return
    problem = bnb_unready(module)
    if problem is not None:
        raise ValueError(f"layer '{name}' ({type(module).__name__}) cannot be adapted: {problem}.")


# ----------------------------------------------------------------------------------------------
# bitsandbytes Linear4bit / Linear8bitLt: the quantised layers rankwise's adapters wrap (QLoRA)
# ----------------------------------------------------------------------------------------------


class QuantisedMergeWarning(UserWarning):
    """Merging into a quantised layer re-quantised its weight, so the merged model is off the exact merge."""


def bnb_kind(module: nn.Module) -> str | None:
    """``"4-bit"`` for a bitsandbytes ``Linear4bit`` (NF4 / FP4, subclasses included), ``"8-bit"`` for a
    ``Linear8bitLt``, else None. bitsandbytes is never imported here: without it loaded no such layer exists."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4-bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8-bit"
    return None


def bnb_settings(module: nn.Module) -> str:
    """The layer's quantisation in words, e.g. ``4-bit nf4, double quant, compute float32``."""
    kind = bnb_kind(module)
    if kind == "8-bit":
        return f"8-bit int8 (threshold {module.state.threshold:g})"
    weight = module.weight
    double = "double quant" if weight.compress_statistics else "no double quant"
    compute = module.compute_dtype or "input dtype"
    return f"4-bit {weight.quant_type}, blocksize {weight.blocksize}, {double}, compute {compute}"


def bnb_unready(module: nn.Module) -> str | None:
    """Why a bitsandbytes layer cannot be adapted as it is (a phrase), or None when it can."""
    weight = module.weight
    if bnb_kind(module) == "4-bit":
        ready = getattr(weight, "bnb_quantized", False)
    else:
        if module.state.has_fp16_weights:
            return ("it keeps trainable float16 weights (has_fp16_weights=True), so it is not a frozen quantised "
                    "base; build it with has_fp16_weights=False (load_in_8bit does)")
        ready = weight.dtype == torch.int8
    if ready:
        return None
    return ("its weight is not quantised yet (bitsandbytes quantises it when the layer moves to a device); call "
            "model.to(device) (e.g. .to('cpu') or .cuda()) before adapting")


def _int8_scales(module: nn.Module) -> Tensor:
    """Row scales of an 8-bit weight: on the weight until the first forward, on the layer's state after it."""
    weight = module.weight
    return weight.SCB if weight.SCB is not None else module.state.SCB


def dequantised_weight(module: nn.Module) -> Tensor:
    """The (out, in) float weight a bitsandbytes layer computes with (a fresh tensor, no gradient).

    4-bit: ``bitsandbytes.functional.dequantize_4bit(data, quant_state)``, in the dtype the layer was quantised
    from (``quant_state.dtype``). A weight that bitsandbytes repacked for its CPU kernel (an eval forward
    without gradients on a CPU with AVX512-BF16 does so) is unpacked on a copy first; the layer stays as it is.
    8-bit: ``int8_vectorwise_dequant`` = int8 row × (row scale / 127), in float32. PEFT's
    ``dequantize_bnb_weight`` computes the same two formulas.
    """
    import bitsandbytes.functional as bnb_functional

    with torch.no_grad():
        weight = module.weight
        if bnb_kind(module) == "8-bit":
            return bnb_functional.int8_vectorwise_dequant(weight.data, _int8_scales(module).to(weight.device))
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb_functional.dequantize_4bit(data, state)


def quantise_like(module: nn.Module, weight: Tensor) -> nn.Parameter:
    """``weight`` (out, in) as a new quantised parameter of ``module``'s kind and settings, on its device.

    4-bit: a ``Params4bit`` with the layer's block size, quant type (NF4 / FP4), double quantisation and
    storage dtype, from ``weight`` cast to the dtype the layer was quantised from. 8-bit: an ``Int8Params``
    (``has_fp16_weights=False``; bitsandbytes rounds through float16 before its row-wise absmax int8).
    """
    import bitsandbytes as bnb

    old = module.weight
    data = weight.detach().to("cpu")
    if bnb_kind(module) == "8-bit":
        return bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False).to(old.device)
    state = old.quant_state
    return bnb.nn.Params4bit(
        data.to(state.dtype), requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
        quant_type=old.quant_type, quant_storage=old.quant_storage, module=module,
    ).to(old.device)


def kept_weight(module: nn.Module) -> tuple[nn.Parameter, Tensor | None]:
    """What :func:`restore_weight` needs to put the layer's current quantised weight back bit for bit."""
    return module.weight, (_int8_scales(module) if bnb_kind(module) == "8-bit" else None)


def set_weight(module: nn.Module, weight: nn.Parameter, scales: Tensor | None = None) -> None:
    """Install a quantised weight. An 8-bit weight carries its int8 matrix and row scales (``CB`` / ``SCB``) so
    that the next forward moves them into the layer's state (bitsandbytes' ``init_8bit_state``), replacing the
    old weight's."""
    if bnb_kind(module) == "8-bit":
        weight.CB, weight.SCB = weight.data, (scales if scales is not None else weight.SCB)
    else:
        module.quant_state = weight.quant_state
    module.weight = weight


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F in float64 (0 for an all-zero ``exact`` equal to ``approx``)."""
    exact = exact.detach().to(torch.float64)
    scale = torch.linalg.matrix_norm(exact)
    diff = torch.linalg.matrix_norm(approx.detach().to(torch.float64) - exact)
    return float(diff / scale) if scale > 0 else float(diff)


def merge_into_quantised(module: nn.Module, weight: Tensor, layer_name: str, method: str) -> float:
    """Re-quantise the merged float ``weight`` into ``module`` and warn with the rounding error it costs.

    The error is e = ‖deq(quant(W')) − W'‖_F / ‖W'‖_F, W' the exact float merged weight: the merged
    model computes with deq(quant(W')), not W'. Returns e.
    """
    set_weight(module, quantise_like(module, weight))
    error = relative_error(dequantised_weight(module), weight)
    warnings.warn(
        f"merging {method} into layer '{layer_name}' ({type(module).__name__}, {bnb_settings(module)}) re-quantised "
        f"its weight: relative rounding error ‖W_merged,quantised − W_merged‖_F / ‖W_merged‖_F = {error:.3e}, so "
        "the merged model's outputs differ from the unmerged adapter's by about that much. unmerge restores the "
        "original quantised weight exactly",
        QuantisedMergeWarning,
        stacklevel=4,
    )
    return error
