"""The adapter contract and the wrapper that puts an adapter beside a frozen layer.

Every method implements :class:`Adapter`. rankwise wraps each targeted layer as
``AdaptedLayer(base_layer, adapter)``: the base module is kept as it is (same class, same
parameters, frozen) under ``base_layer``, so its state-dict keys read ``<path>.base_layer.weight``
like PEFT's, and the adapter's tensors read ``<path>.adapter.<name>``. A layer may hold several named
adapters (:mod:`rankwise.core.multi`); the one named ``"default"`` keeps those keys, the others read
``<path>.extra_adapters.<adapter name>.<name>``, and the forward runs the active one. A ``modules_to_save`` module is
wrapped as ``SavedModule(original)``: the forward runs a trainable copy, the original stays frozen and
unchanged, so disabling or unloading the adapter gives the base model back.

Adapters see every supported base layer as a linear map ``y = x Wᵀ + b`` with ``W`` of shape
``(out_features, in_features)``: :func:`weight_matrix` hides the transposed storage of
transformers' ``Conv1D`` (GPT-2 style, ``fan_in_fan_out``), so a method written for ``nn.Linear``
works on ``Conv1D`` without a line of its own, and hands over the dequantised weight of a
bitsandbytes 4-/8-bit layer (:mod:`rankwise.core.quantised`), so a method that reads W works on a
quantised base too.

Two more layer kinds can be targeted by name (``"all-linear"`` never selects them): convolutions
(``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``), seen as the (C_out, C_in/groups·∏kernel) matrix of their
flattened kernel (the map from one input patch to one output pixel), and ``nn.Embedding``, seen as the
(embedding_dim, num_embeddings) matrix Wᵀ that maps a one-hot token to its vector (the stored weight is
(num_embeddings, embedding_dim), Conv1D's transposed layout). :func:`layer_kind` names the kind; a method
adapts the kinds its adapter class lists in ``Adapter.layer_kinds`` and refuses the others with a
``ValueError`` (LoRA and DoRA adapt all three, :mod:`rankwise.adapters.lora`). A linear method that sets
``Adapter.conv_as_patches`` also adapts an ungrouped convolution through that matrix: the wrapper cuts the
input into patches (:func:`conv_patches`, the im2col of the convolution), so the adapter sees the linear
layer y = patch · Wᵀ + b it was written for, one row per output pixel, and merging writes the flattened
kernel back (:func:`stored_weight`).
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig
from .quantised import bnb_kind, dequantised_weight, is_sharded, kept_weight, merge_into_quantised, set_weight


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D``, or None while transformers (optional for the core) has not imported it, in
    which case no layer can be one. A plain ``sys.modules`` lookup: ``torch.compile`` traces it without the
    warning a cached import gives."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for layers that store their weight as (in_features, out_features), i.e. ``Conv1D``."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_supported_layer(module: nn.Module) -> bool:
    """Layers rankwise adapters can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_fan_in_fan_out(module)


#: What each layer kind covers, for error messages.
LAYER_KINDS = {
    "linear": "nn.Linear / transformers Conv1D",
    "conv": "nn.Conv1d / nn.Conv2d / nn.Conv3d",
    "embedding": "nn.Embedding",
}


def is_conv_layer(module: nn.Module) -> bool:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (transposed convolutions are not included)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` (nn.Linear, Conv1D), ``"conv"``, ``"embedding"``, or None for a layer no adapter wraps."""
    if is_supported_layer(module):
        return "linear"
    if is_conv_layer(module):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def is_adaptable_layer(module: nn.Module) -> bool:
    """A layer some method can adapt when a target names it: a linear, convolution or embedding layer."""
    return layer_kind(module) is not None


def _stored_transposed(module: nn.Module) -> bool:
    """True when the stored weight is (in_features, out_features): Conv1D and nn.Embedding."""
    return is_fan_in_fan_out(module) or isinstance(module, nn.Embedding)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an adaptable layer: of its weight matrix (:func:`weight_matrix`)."""
    if bnb_kind(module) is not None:  # a packed 4-bit weight is (out·in/2, 1): the layer knows its shape
        return module.out_features, module.in_features
    weight = module.weight
    if _stored_transposed(module):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight[0].numel()


def layer_geometry(module: nn.Module) -> dict[str, Any]:
    """What a saved adapter records of its base layer: ``out_features`` and ``in_features`` (:func:`linear_shape`)
    and, for a convolution, ``kernel_size`` and ``groups``, on which an adapter's size can depend (LoHa / LoKr
    Tucker cores, LoKr's factor split, LoRA's grouped B)."""
    out_features, in_features = linear_shape(module)
    record: dict[str, Any] = {"out_features": out_features, "in_features": in_features}
    if is_conv_layer(module):
        record.update(kernel_size=list(module.kernel_size), groups=module.groups)
    return record


_CONV_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def meta_stand_in(record: dict[str, Any]) -> nn.Module:
    """A layer on the meta device (no memory, no values) with the geometry of ``record`` (:func:`layer_geometry`):
    an ``nn.Linear``, or the ``nn.Conv1d/2d/3d`` when it has a kernel. Adapters built on it have the real
    layer's parameter shapes, so counting their parameters needs neither the model nor its weights."""
    out_features, in_features = record["out_features"], record["in_features"]
    kernel = record.get("kernel_size")
    if kernel is None:
        return nn.Linear(in_features, out_features, device="meta")
    groups = record.get("groups", 1)
    if not (isinstance(kernel, list) and len(kernel) in _CONV_BY_DIMS and _positive_ints(*kernel, groups)
            and in_features % math.prod(kernel) == 0 and out_features % groups == 0):
        raise ValueError(f"layer record {record} is not a convolution's: kernel_size must be 1 to 3 positive "
                         "integers dividing in_features, and groups a positive integer dividing out_features")
    channels = in_features // math.prod(kernel) * groups
    return _CONV_BY_DIMS[len(kernel)](channels, out_features, tuple(kernel), groups=groups, device="meta")


def _positive_ints(*values: Any) -> bool:
    return all(type(value) is int and value > 0 for value in values)


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as an (out_features, in_features) matrix: a transpose view for Conv1D and
    nn.Embedding, the kernel flattened per output channel, (C_out, C_in/groups·∏kernel), for a convolution;
    for a bitsandbytes layer a fresh dequantised copy (writing to it changes nothing)."""
    if bnb_kind(module) is not None:
        return dequantised_weight(module)
    weight = module.weight
    if _stored_transposed(module):
        return weight.T
    return weight.flatten(1) if weight.dim() > 2 else weight


def conv_patches(conv: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The batched input of ``conv`` cut into (N, L, C_in·∏kernel) patches, and the output's spatial shape (L = ∏).

    Patch ℓ holds, in the order of the flattened kernel (channel, then kernel positions), the inputs that output
    pixel ℓ reads: the input padded as the layer pads it (its padding and padding mode), then windows of
    (k − 1)·dilation + 1 every ``stride``, keeping every ``dilation``-th element. So for an ungrouped convolution
    ``conv(x) = patches @ weight_matrix(conv)ᵀ + b`` (moved back to channels-first). Memory: ∏kernel times the
    input (no stride) -- the price of running a linear method on a convolution.
    """
    dims = conv.weight.dim() - 2
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    for d in range(dims):
        dilation = conv.dilation[d]
        x = x.unfold(2 + d, (conv.kernel_size[d] - 1) * dilation + 1, conv.stride[d])[..., ::dilation]
    spatial = tuple(x.shape[2:2 + dims])
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    return x.permute(order).reshape(x.shape[0], -1, conv.weight[0].numel()), spatial


def stored_weight(module: nn.Module, matrix: Tensor) -> Tensor:
    """The inverse of :func:`weight_matrix`: an (out_features, in_features) matrix in the layout the layer stores."""
    if _stored_transposed(module):
        return matrix.T
    return matrix.reshape(module.weight.shape)


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merge and unmerge compute in for a base weight of ``dtype``: float32 for float16 / bfloat16
    (merging arithmetic in half precision drifts; the result is cast back), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def linear_output_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer's output has for input ``x``: autocast's dtype while ``torch.autocast`` is on
    for ``x``'s device (and ``x`` is a float autocast casts), else ``x``'s own. The adapted output of a method
    that skips the base layer (``uses_base_output = False``) takes it, so it matches the layer it wraps."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return x.dtype


def add_into_output(base_out: Tensor, update: Tensor, alpha: float = 1.0) -> Tensor:
    """``base_out + alpha · update`` (same shapes), in place when ``base_out`` is the wrapper's scratch output.

    :class:`AdaptedLayer` marks the frozen layer's fresh output as scratch before handing it to the
    adapter; a tensor passed to ``Adapter.forward`` by anyone else is left untouched.
    """
    if getattr(base_out, "_rankwise_scratch", False):
        return base_out.add_(update, alpha=alpha)
    return torch.add(base_out, update, alpha=alpha)


class Adapter(nn.Module):
    """The trainable part of one adapted layer. Subclasses implement the method's math.

    Contract:
        * ``__init__(base, config, layer_name)`` builds and initialises the trainable tensors from
          the base layer's shape and raises ``ValueError`` (via :meth:`fail`) when the config does
          not fit the layer; it never changes the base layer (that is :meth:`attach`'s job).
        * ``forward(x, base_out)`` returns the adapted output, given the frozen layer's output.
          A method that computes the whole output from the weight itself (BoRA, MiSS "bat") sets
          the class attribute ``uses_base_output = False``; the wrapper then skips the frozen
          layer's own matmul (one full-size GEMM in the forward and one in the backward) and
          passes ``base_out=None``. Additive methods return :func:`add_into_output`, which adds in
          place into the wrapper's own fresh ``base_out`` (one output-sized buffer less per layer, as
          PEFT's ``result +=``) and never into a tensor a direct caller passed in.
        * ``delta_weight()`` returns the dense (out, in) update that merging adds to ``W``;
          ``merged_weight`` / ``unmerged_weight`` override it for methods that are not additive.
        * ``expected_num_params(out_features, in_features, config)`` is the paper's closed form.
    """

    uses_base_output: bool = True
    #: The layer kinds (:func:`layer_kind`) this class adapts; a method that adapts more kinds builds a
    #: class per kind (LoRA's ``LoRAConvAdapter``, ...).
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    #: True: a linear method that also adapts ungrouped convolutions, on their patches (:func:`conv_patches`).
    conv_as_patches: ClassVar[bool] = False

    def __init__(self, base: nn.Module, config: AdapterConfig, layer_name: str = "") -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind == "conv" and self.conv_as_patches and base.groups > 1:
            raise ValueError(
                f"method {config.method!r} cannot adapt layer '{layer_name or '<unnamed layer>'}' ({type(base).__name__} "
                f"with groups={base.groups}): {config.method} adapts a convolution through its flattened kernel "
                "matrix, and a grouped convolution is not one matrix on its patches. Exclude this layer, or use lora"
            )
        if kind not in self.layer_kinds and not (kind == "conv" and self.conv_as_patches):
            cls = type(base)
            kinds = (*self.layer_kinds, "conv") if self.conv_as_patches else self.layer_kinds
            supported = " and ".join(LAYER_KINDS[k] for k in kinds)
            raise ValueError(
                f"method {config.method!r} cannot adapt layer '{layer_name or '<unnamed layer>'}' "
                f"({cls.__module__}.{cls.__qualname__}): {config.method} adapts {supported} layers only. "
                "Leave this layer out of targets (or exclude it), or use a method that adapts this layer kind "
                "(the README's support table lists them)"
            )
        self.layer_name = layer_name
        self.out_features, self.in_features = linear_shape(base)
        # A plain tuple keeps the base layer out of this module's children (and state dict):
        # it belongs to the wrapper, the adapter only reads it.
        self._base: tuple[nn.Module] = (base,)

    # -- the base layer, read-only ---------------------------------------------------------------

    @property
    def base_layer(self) -> nn.Module:
        return self._base[0]

    def base_weight(self) -> Tensor:
        """The frozen weight as (out_features, in_features).

        Under FSDP2 the weight is whole only while the ``fully_shard`` unit holding it runs its forward
        or backward, so that unit must hold the whole adapted layer (or a module above it); a sharded
        weight here (a base layer sharded on its own, or W read outside the forward: merge,
        ``delta_weight``) is a ``ValueError`` naming the layer and the fix.
        """
        weight = weight_matrix(self.base_layer)
        if is_sharded(weight):
            raise self.fail(
                "the adapter reads the frozen base weight, which is sharded here (a DTensor). FSDP2 gathers it only "
                "during the forward and backward of the fully_shard unit that holds it",
                "Apply fully_shard to the adapted layer or a module above it (the transformer block, the model), not "
                "to the base layer alone, and merge or inspect the adapter on an unsharded model",
            )
        return weight

    def base_bias(self) -> Tensor | None:
        return self.base_layer.bias

    # -- what every method provides ------------------------------------------------------------

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def attach(self) -> None:
        """Called by ``adapt`` once every adapter of the model is built, validated and moved to its device.

        An init that changes the frozen base (LoRA's PiSSA and OLoRA subtract their initial update from
        ``W``) does it here, so a config that does not fit a later layer never leaves a base changed.
        The default does nothing.
        """

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        """Dense ΔW of shape (out_features, in_features) such that the merged weight is W + ΔW."""
        raise NotImplementedError

    def check_mergeable(self) -> None:
        """Raise ``ValueError`` (via :meth:`fail`) when the update has no form in the base's weight; ``rankwise.merge``
        asks every layer first (:meth:`AdaptedLayer.check_merge`, which also checks the bias), so a model is merged
        whole or not at all. The default accepts."""

    def check_unmergeable(self, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` (via :meth:`fail`) when this merged update cannot be taken back out of a base weight
        whose merge arithmetic runs in ``dtype`` (:func:`merge_dtype`). ``rankwise.unmerge``, ``unload(merge=False)``
        and ``set_adapter`` ask every merged layer first (:meth:`AdaptedLayer.check_unmerge`), so a model is
        unmerged whole or not at all. The default accepts: an additive update is subtracted, which always works;
        MiSS "bat" overrides it (its unmerge solves a system that may be singular)."""

    def delta_bias(self) -> Tensor | None:
        """Update of the bias on merge, or None when the method leaves the bias alone."""
        return None

    def merged_weight(self, weight: Tensor) -> Tensor:
        """The (out, in) weight after merging, given the unmerged one."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        """The inverse of :meth:`merged_weight`."""
        return weight - self.delta_weight().to(weight.dtype)

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: AdapterConfig) -> int:
        """Closed-form number of trainable parameters for one layer."""  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """A short description of the adapter's shape for ``rankwise.summary``."""
        return ""

    # -- helpers for subclasses ------------------------------------------------------------------

    def fail(self, problem: str, fix: str) -> ValueError:
        """A ``ValueError`` naming this layer, its shape, the problem and the fix."""
        name = self.layer_name or "<unnamed layer>"
        return ValueError(
            f"{type(self).__name__} cannot adapt layer '{name}' "
            f"(out_features={self.out_features}, in_features={self.in_features}): {problem}. {fix}"
        )

    def _apply_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"  # in a per-example adapter list: this example runs the base layer alone (PEFT's name)


class AdaptedLayer(nn.Module):
    """A frozen layer plus one or more named adapters; ``forward`` = ``adapter(x, base_layer(x))`` unless merged.

    ``adapter`` is the *active* adapter (``active_adapter`` names it; None when this layer has no adapter of
    that name, then the layer computes the base alone), so code written for one adapter per layer reads and
    replaces the active one. The adapters are stored by name at fixed state-dict keys: the one named
    ``"default"`` under ``adapter`` (``<path>.adapter.<tensor>``, the single-adapter key), every other under
    ``extra_adapters.<name>`` (created with the first such adapter). At most the active adapter is merged.

    ``example_adapters`` (set by :func:`rankwise.adapter_per_example`) gives one adapter name per example
    of the batch (dimension 0 of the input): each example then runs with its own adapter, or with the base
    layer alone for :data:`BASE_ADAPTER` or a name this layer does not hold (PEFT's mixed-batch forward).

    An empty input (a zero-size batch) goes through the base layer alone: the adapters' FFTs and
    reshapes need at least one token, and there is nothing to add to an empty output.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter, name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter = name
        self.add_adapter(name, adapter)
        self.merged = False
        self.disabled = False
        self.example_adapters: list[str] | None = None
        # A quantised base's weight before the merge re-quantised it, which unmerge puts back (a tuple: no parameter).
        self._unmerged_quantised: tuple[nn.Parameter, Tensor | None] | None = None

    # -- the named adapters ------------------------------------------------------------------------

    def _slot(self, name: str) -> tuple[dict[str, nn.Module], str]:
        """The module dict and key that hold (or would hold) adapter ``name``."""
        if name == DEFAULT_ADAPTER:
            return self._modules, "adapter"
        if "extra_adapters" not in self._modules:
            self.extra_adapters = nn.ModuleDict()
        return self._modules["extra_adapters"]._modules, name

    def adapters(self) -> dict[str, Adapter]:
        """``{name: adapter}`` of every adapter this layer holds, the default one first."""
        found = {DEFAULT_ADAPTER: self._modules["adapter"]} if self._modules.get("adapter") is not None else {}
        extra = self._modules.get("extra_adapters")
        return {**found, **(dict(extra.items()) if extra is not None else {})}

    def get_adapter(self, name: str) -> Adapter | None:
        """Adapter ``name``, or None when this layer does not hold it."""
        if name == DEFAULT_ADAPTER:
            return self._modules.get("adapter")  # type: ignore[return-value]
        extra = self._modules.get("extra_adapters")
        return None if extra is None else extra._modules.get(name)  # type: ignore[return-value]

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Hold ``adapter`` under ``name`` (replacing an adapter of that name)."""
        modules, key = self._slot(name)
        modules[key] = adapter

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (not merged; the caller checks)."""
        modules, key = self._slot(name)
        del modules[key]

    @property
    def adapter(self) -> Adapter | None:
        """The active adapter, None when this layer holds none of that name."""
        return self.get_adapter(self.active_adapter)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "adapter":  # replacing the adapter means replacing the active one (GoRA rebuilds them)
            self.add_adapter(self.active_adapter, value)
        else:
            super().__setattr__(name, value)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = self.adapter
        if self.example_adapters is not None and not self.disabled and x.numel() != 0:
            return self._per_example_forward(self.example_adapters, x, *args, **kwargs)
        if adapter is None or self.merged or self.disabled or x.numel() == 0:
            return self.base_layer(x, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs) if adapter.uses_base_output else None
        return self._run(adapter, x, base_out)

    def _run(self, adapter: Adapter, x: Tensor, base_out: Tensor | None) -> Tensor:
        """``adapter(x, base_out)`` in the adapter's dtype, returned in the output's; ``base_out`` must be fresh."""
        out_dtype = linear_output_dtype(x) if base_out is None else base_out.dtype
        adapter_dtype = adapter._apply_dtype()
        if x.dtype != adapter_dtype and x.is_floating_point():  # an embedding's token ids stay integers
            x = x.to(adapter_dtype)
        if base_out is not None and base_out.dtype != adapter_dtype:
            base_out = base_out.to(adapter_dtype)
        if base_out is not None:
            base_out._rankwise_scratch = True  # fresh and ours: see add_into_output
        if adapter.conv_as_patches and is_conv_layer(self.base_layer):
            out = self._patch_forward(adapter, x, base_out)
        else:
            out = adapter(x, base_out)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def _patch_forward(self, adapter: Adapter, x: Tensor, base_out: Tensor | None) -> Tensor:
        """A linear adapter on a convolution: its forward on the (N, L, C_in·∏k) patches and the (N, L, C_out)
        output pixels, moved back to (N, C_out, *spatial). An unbatched input gets a batch of one."""
        unbatched = x.dim() == self.base_layer.weight.dim() - 1
        if unbatched:
            x, base_out = x.unsqueeze(0), None if base_out is None else base_out.unsqueeze(0)
        patches, spatial = conv_patches(self.base_layer, x)
        pixels = None if base_out is None else base_out.flatten(2).transpose(1, 2)
        out = adapter(patches, pixels)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], *spatial)
        return out.squeeze(0) if unbatched else out

    def _per_example_forward(self, names: list[str], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Example i of the batch through adapter ``names[i]``: each group of examples that shares an adapter
        runs as one sub-batch, as PEFT's ``_mixed_batch_forward``."""
        if x.shape[0] != len(names):
            raise ValueError(
                f"layer '{self.adapter_layer_name()}' got a batch of {x.shape[0]} examples (input shape "
                f"{tuple(x.shape)}) but rankwise.adapter_per_example named {len(names)} adapters; pass one "
                "adapter name per example (dimension 0 of the input)"
            )
        if self.merged:
            raise ValueError(
                f"layer '{self.adapter_layer_name()}' has adapter '{self.active_adapter}' merged into its weight, "
                "so examples cannot run with other adapters; rankwise.unmerge(model) first"
            )
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out.clone()
        for name in dict.fromkeys(names):
            adapter = self.get_adapter(name)
            if adapter is None:  # BASE_ADAPTER, or an adapter that does not target this layer
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            sub_base = base_out[rows] if adapter.uses_base_output else None  # indexing copies: fresh
            out[rows] = self._run(adapter, x[rows], sub_base).to(out.dtype)
        return out

    def adapter_layer_name(self) -> str:
        """The layer's path in the model, as its adapters know it."""
        return next((a.layer_name for a in self.adapters().values() if a.layer_name), "<unnamed layer>")

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def check_merge(self, safe: bool = False) -> None:
        """Raise ``ValueError`` if :meth:`merge` would refuse; change nothing.

        It checks the adapter's own condition (:meth:`Adapter.check_mergeable`), that a bias update has a base bias
        to go into, and with ``safe`` that the merged weight and bias are finite (computed here and discarded).
        ``rankwise.merge`` / ``unload(merge=True)`` run it on every layer before merging any, so a refusal in
        the last layer cannot leave the earlier ones merged.
        """
        adapter = self.adapter
        if self.merged or adapter is None:
            return
        adapter.check_mergeable()
        delta_bias = adapter.delta_bias()
        if delta_bias is not None and self.base_layer.bias is None:
            raise ValueError(
                f"{type(adapter).__name__} on layer '{adapter.layer_name}' (out_features={adapter.out_features}, "
                f"in_features={adapter.in_features}) has a bias update (lora_bias) but the base layer has no bias, so "
                "it cannot be merged; nothing was merged. Keep the adapter unmerged, or build it without a bias "
                "term (lora_bias=False) to merge it"
            )
        if safe:
            self._check_finite(self._transformed_weight(adapter.merged_weight), delta_bias)

    def _check_finite(self, new_weight: Tensor, delta_bias: Tensor | None) -> None:
        """``ValueError`` unless the merged weight and the merged bias (base bias + Δb) are finite."""
        bias = getattr(self.base_layer, "bias", None)  # nn.Embedding has none (and no bias update)
        new_bias = None if delta_bias is None or bias is None else bias + delta_bias.to(bias.dtype)
        if not torch.isfinite(new_weight).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
            raise ValueError(
                f"merging {type(self.adapter).__name__} into layer '{self.adapter.layer_name}' gives non-finite "
                "weights; the adapter is left unmerged. Check the adapter for NaN/inf."
            )

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the active adapter into the base weight. Idempotent. ``safe`` refuses non-finite results.
        Refuses (:meth:`check_merge`; with ``safe`` on the weight it computes) before the weight changes."""
        if self.merged or self.adapter is None:
            return
        self.check_merge()
        self._write_weights(self.adapter.merged_weight, sign=1, safe=safe)
        self.merged = True

    def check_unmerge(self) -> None:
        """Raise ``ValueError`` if :meth:`unmerge` would refuse (:meth:`Adapter.check_unmergeable`); change nothing.
        A quantised base is never refused: its unmerge puts the kept pre-merge weight back."""
        if not self.merged or bnb_kind(self.base_layer) is not None:
            return
        self.adapter.check_unmergeable(merge_dtype(weight_matrix(self.base_layer).dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weight. Idempotent."""
        if not self.merged:
            return
        self._write_weights(self.adapter.unmerged_weight, sign=-1, safe=False)
        self.merged = False

    def _transformed_weight(self, transform: Any) -> Tensor:
        """``transform`` (merged / unmerged weight) of the current (out, in) base weight, in :func:`merge_dtype`."""
        current = weight_matrix(self.base_layer)
        return transform(current.to(merge_dtype(current.dtype)))

    def _write_weights(self, transform: Any, sign: int, safe: bool) -> None:
        """Apply ``transform`` (merged / unmerged weight) to the base weight and ``sign`` · Δb to its bias.

        The caller has checked that the merge is possible (:meth:`check_merge`); ``safe`` refuses a non-finite
        result, and an unmerge that cannot be done raises in ``transform``, both before anything is written.
        A bitsandbytes base is dequantised, transformed and re-quantised with a warning stating the rounding
        error (:func:`~rankwise.core.quantised.merge_into_quantised`); its unmerge puts the quantised weight
        from before the merge back bit for bit instead of subtracting through a second rounding.
        """
        quantised = bnb_kind(self.base_layer) is not None
        delta_bias = self.adapter.delta_bias()
        if quantised and sign < 0:
            set_weight(self.base_layer, *self._unmerged_quantised)
            self._unmerged_quantised = None
        else:
            new_weight = self._transformed_weight(transform)
            if safe:
                self._check_finite(new_weight, delta_bias)
            if quantised:
                self._unmerged_quantised = kept_weight(self.base_layer)
                merge_into_quantised(self.base_layer, new_weight, self.adapter.layer_name, type(self.adapter).__name__)
            else:
                self.base_layer.weight.copy_(stored_weight(self.base_layer, new_weight))
        if delta_bias is not None:
            self.base_layer.bias.add_(sign * delta_bias.to(self.base_layer.bias.dtype))

    def unload(self, merge: bool) -> nn.Module:
        """The plain base module, with the adapter merged in or discarded."""
        if merge:
            self.merge()
        else:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


class SavedModule(nn.Module):
    """A ``modules_to_save`` module: the user's original, frozen and kept as it was, and a trainable copy.

    As PEFT's ``ModulesToSaveWrapper``: the forward runs the copy (``trained_module``), or the original
    (``original_module``) while ``disabled`` (``rankwise.disable_adapters``). Training therefore never
    touches the original, so the base model stays recoverable. Attributes the wrapper does not have
    (``weight``, ``out_proj``, ...) are read from the module that runs, so code that reads
    ``model.classifier.weight`` keeps working.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.trained_module = copy.deepcopy(original).requires_grad_(True)
        self.disabled = False
        #: One adapter name per example (``rankwise.adapter_per_example``), or None: see :meth:`forward`.
        self.example_adapters: list[str] | None = None

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs."""
        return self.original_module if self.disabled else self.trained_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The trained copy's output (the original's while disabled). Under ``rankwise.adapter_per_example``, as
        PEFT's mixed-batch forward: the examples named ``"__base__"`` run through the original module and the
        others (the model's only adapter, which owns the copy) through the trained copy, each group as one
        sub-batch of the first argument (dimension 0); other arguments are passed to both whole."""
        if self.example_adapters is None or self.disabled or not args:
            return self.active_module(*args, **kwargs)
        return self._per_example_forward(self.example_adapters, *args, **kwargs)

    def _per_example_forward(self, names: list[str], x: Any, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != len(names):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"a modules_to_save module ({type(self.original_module).__name__}) got input {shape}, but "
                f"rankwise.adapter_per_example named {len(names)} adapters; its first argument must be a batch "
                "with one example per name (dimension 0)"
            )
        base = [i for i, name in enumerate(names) if name == BASE_ADAPTER]
        if len(base) in (0, len(names)):
            return (self.original_module if base else self.trained_module)(x, *args, **kwargs)
        trained = [i for i, name in enumerate(names) if name != BASE_ADAPTER]
        base_rows = torch.tensor(base, device=x.device)
        trained_rows = torch.tensor(trained, device=x.device)
        base_out = self.original_module(x[base_rows], *args, **kwargs)
        trained_out = self.trained_module(x[trained_rows], *args, **kwargs)
        if not isinstance(base_out, Tensor):
            raise ValueError(f"adapter_per_example: a modules_to_save module ({type(self.original_module).__name__}) "
                             f"returned a {type(base_out).__name__}; per-example outputs are joined as tensors only")
        out = base_out.new_empty((len(names), *base_out.shape[1:]))
        out[base_rows] = base_out
        out[trained_rows] = trained_out.to(out.dtype)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "trained_module"):
                raise
            return getattr(self.active_module, name)

    def unload(self, merge: bool) -> nn.Module:
        """The trained copy when ``merge`` (as PEFT's ``merge_and_unload``), else the original."""
        return self.trained_module if merge else self.original_module

    def extra_repr(self) -> str:
        return f"disabled={self.disabled}"
