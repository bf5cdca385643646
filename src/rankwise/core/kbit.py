"""Prepare a k-bit (bitsandbytes 4-/8-bit) model for adapter training: PEFT's ``prepare_model_for_kbit_training``.

QLoRA ("QLoRA: Efficient Finetuning of Quantized LLMs", Dettmers et al., arXiv:2305.14314) trains float adapters
on a frozen quantised base. Before :func:`rankwise.adapt`, :func:`prepare_for_kbit_training` does what PEFT 0.21.2's
``prepare_model_for_kbit_training`` does, in the same order:

1. Freeze every parameter (the adapters that ``adapt`` adds afterwards are the only trainable tensors).
2. Cast every float16 / bfloat16 parameter that is a plain ``nn.Parameter`` to float32: the layer norms, the
   embeddings, the biases (of quantised layers too), the output head; never a quantised weight (bitsandbytes'
   ``Params4bit`` / ``Int8Params`` are ``nn.Parameter`` subclasses, left as they are). Why: the adapters'
   gradients flow back through these frozen layers, and layer-norm statistics, softmax inputs and the logits
   lose precision (or overflow) in half precision; float32 keeps that path stable, at 2 extra bytes per cast
   element (``benchmarks/qlora.py`` measures it). The quantised weights, the bulk of the model, do not grow.
3. With ``use_gradient_checkpointing`` on a model that holds a quantised layer or says it was loaded in k-bit
   (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``), as PEFT: make the input embeddings' output require grad
   (transformers' ``enable_input_require_grads``; needed by re-entrant checkpointing, which only back-propagates
   into a block whose inputs require grad, and the frozen embeddings' output does not) and turn on the model's
   activation checkpointing with ``gradient_checkpointing_kwargs`` (``activation_checkpointing_enable``, the
   transformers 5 name of the ``gradient_checkpointing_enable`` PEFT calls, which is used where the new one is
   missing). With ``use_reentrant=False`` in the kwargs the first step is skipped (not needed), as in PEFT.
   ``use_reentrant`` defaults to True, which is what PEFT's empty kwargs amount to in torch (with a warning that
   asks for the argument to be passed explicitly).

Bad input (an adapted model, checkpointing asked of a model without a checkpointing switch) raises
``ValueError`` before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .inject import is_adapted
from .quantised import bnb_kind

HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_kbit_model(model: nn.Module) -> bool:
    """True when the model holds a bitsandbytes 4-/8-bit layer or says it was loaded in 4 / 8 bits."""
    flagged = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    return bool(flagged) or any(bnb_kind(module) is not None for module in model.modules())


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze ``model``, cast its half-precision float parameters to float32 and, for a k-bit model, enable
    gradient checkpointing with input gradients (module docstring). Returns the model, changed in place.

    Call it before :func:`rankwise.adapt`, as PEFT's ``prepare_model_for_kbit_training`` before ``get_peft_model``.
    """
    if is_adapted(model):
        raise ValueError(
            f"prepare_for_kbit_training: {type(model).__name__} already carries a rankwise adapter, whose parameters "
            "it would freeze; call prepare_for_kbit_training(model) first, then rankwise.adapt(model, config)"
        )
    # PEFT passes {} and gets torch's re-entrant default with a warning (an error in later torch): say it outright
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
    checkpointing = use_gradient_checkpointing and is_kbit_model(model)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5's name
    legacy = getattr(model, "gradient_checkpointing_enable", None)  # the name PEFT 0.21.2 calls (deprecated)
    if checkpointing and not (callable(enable) or callable(legacy)):
        raise ValueError(
            f"prepare_for_kbit_training: {type(model).__name__} has no activation_checkpointing_enable / "
            "gradient_checkpointing_enable (it is not a transformers PreTrainedModel); pass "
            "use_gradient_checkpointing=False, or checkpoint it yourself"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in model.parameters():
        if type(parameter) is nn.Parameter and parameter.dtype in HALF_DTYPES:  # never a quantised weight
            parameter.data = parameter.data.to(torch.float32)
    if checkpointing:
        if kwargs["use_reentrant"]:
            model.enable_input_require_grads()
        if callable(enable):
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            legacy(gradient_checkpointing_kwargs=kwargs)
    return model
