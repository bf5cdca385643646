"""rankwise: the low-rank family of model adaptation and compression, exact and fast.

Public API (see DESIGN.md)::

    cfg   = rankwise.LoRAConfig(r=8, alpha=16, targets=["query", "value"])
    cfg   = rankwise.config("dora", r=8)           # any registered method by name
    model = rankwise.adapt(model, cfg)
    rankwise.summary(model); rankwise.trainable_parameters(model)
    rankwise.merge(model); rankwise.unmerge(model); plain = rankwise.unload(model, merge=True)
    rankwise.save(model, "out/"); model = rankwise.load(base_model, "out/")
    rankwise.import_peft(base_model, "peft_dir/"); rankwise.export_peft(model, "peft_dir/")
    model = rankwise.compress(model, ratio=0.5)
    alloc = rankwise.allocator(model); alloc.step(step)   # rank allocation (AdaLoRA); None for fixed-rank methods
    rankwise.ranks(model)                                 # {layer name: current rank}
    rankwise.add_adapter(model, "b", cfg); rankwise.set_adapter(model, "b")   # several named adapters
    rankwise.delete_adapter(model, "b"); rankwise.adapter_names(model); rankwise.active_adapter(model)
    rankwise.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "ab", combination="cat")
    with rankwise.adapter_per_example(model, ["default", "b"]): model(batch)   # one adapter per example
    lora_model = rankwise.to_lora(model, rank=16)         # any method's update as a LoRA (truncated SVD of W' - W)
    rankwise.to_lora_report(lora_model)                   # per-layer rank and relative error; export_peft serves it
    rankwise.prepare_for_kbit_training(model)             # before adapt on a bitsandbytes 4-/8-bit model (QLoRA)

Every method's config class (``C3AConfig``, ``GraLoRAConfig``, ...) is reachable as
``rankwise.<Name>Config`` once its module is registered.
"""

from typing import Any

from ._version import __version__
from .adapters.lora import DoRAConfig, LoRAConfig
from .convert import to_lora, to_lora_report
from .core.config import AdapterConfig
from .core.inject import (
    active_adapter,
    adapt,
    adapted_layers,
    adapter_config,
    disable_adapters,
    find_targets,
    merge,
    summary,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.io import load, save
from .core.kbit import prepare_for_kbit_training
from .core.multi import (
    adapter_names,
    adapter_per_example,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    set_adapter,
)
from .core.rank import allocator, ranks
from .core.registry import config, methods, register
from .integrations.peft import export_peft, import_peft

__all__ = [
    "AdapterConfig",
    "DoRAConfig",
    "LoRAConfig",
    "LoRAPro",
    "__version__",
    "active_adapter",
    "adapt",
    "adapted_layers",
    "adapter_config",
    "adapter_names",
    "adapter_per_example",
    "add_adapter",
    "add_weighted_adapter",
    "allocator",
    "compress",
    "config",
    "delete_adapter",
    "disable_adapters",
    "export_peft",
    "find_targets",
    "import_peft",
    "load",
    "merge",
    "methods",
    "prepare_for_kbit_training",
    "ranks",
    "register",
    "save",
    "set_adapter",
    "summary",
    "to_lora",
    "to_lora_report",
    "trainable_parameters",
    "unload",
    "unmerge",
]


def __getattr__(name: str) -> Any:
    """Lazy access to ``compress``, ``LoRAPro`` and every registered method's config class."""
    if name == "compress":
        # The package rankwise.compress is itself callable as compress(model, ratio=...), so the
        # name means the same thing before and after the subpackage is imported.
        import importlib

        return importlib.import_module(".compress", __name__)
    if name == "LoRAPro":
        from .optim import LoRAPro

        return LoRAPro
    if name.endswith("Config"):
        from .core.registry import registered

        for method in registered():
            if method.config_cls.__name__ == name:
                return method.config_cls
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
