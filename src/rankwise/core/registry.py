"""The method registry: name -> (config class, adapter class, optional PEFT format, optional allocator).

A method module ends with one ``register(...)`` line. Names are lower snake case and unique;
registering a name twice is an error, so two modules can never silently shadow each other.
Packages outside rankwise may register methods through the ``rankwise.methods`` entry-point
group (each entry point is a module to import).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .config import AdapterConfig
    from .layer import Adapter
    from .rank import Allocator

_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$")


@dataclass(frozen=True)
class PeftFormat:
    """How a method maps onto a Hugging Face PEFT adapter directory.

    Args:
        peft_type: PEFT's ``peft_type`` string (``"LORA"``, ``"C3A"``, ...).
        matches: does a PEFT ``adapter_config.json`` dict belong to this method? (LoRA and DoRA share
            ``peft_type="LORA"`` and differ by ``use_dora``.)
        to_peft_config: rankwise config -> the method-specific PEFT config fields.
        from_peft_config: PEFT config dict -> keyword arguments of the rankwise config.
        tensor_names: rankwise adapter tensor name -> PEFT's on-disk local name (identity when absent).
        prepare_export: ``(model, payload, tensors)`` -> None, called by ``export_peft`` to adjust the
            config payload and the adapter tensors (keyed as in ``rankwise.save``) in place, for
            methods whose PEFT file depends on training state (AdaLoRA's rank pattern).
        refuse_layer: ``(base layer, config)`` -> why PEFT does not compute this layer's adapter as rankwise does
            (a phrase starting with the layer's offending attributes), or None; ``export_peft`` and ``import_peft``
            refuse a model with such a layer (e.g. LoRA on a dilated convolution, peft#3697).
    """

    peft_type: str
    matches: Callable[[dict[str, Any]], bool]
    to_peft_config: Callable[[AdapterConfig], dict[str, Any]]
    from_peft_config: Callable[[dict[str, Any]], dict[str, Any]]
    tensor_names: dict[str, str]
    prepare_export: Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], None] | None = None
    refuse_layer: Callable[[nn.Module, AdapterConfig], str | None] | None = None


@dataclass(frozen=True)
class Method:
    """One registered method. ``allocator(model, config)`` builds the rank allocator of an allocating method."""

    name: str
    config_cls: type[AdapterConfig]
    adapter_cls: type[Adapter]
    peft: PeftFormat | None = None
    allocator: Callable[[nn.Module, AdapterConfig], Allocator] | None = None


_METHODS: dict[str, Method] = {}


def register(
    name: str,
    config_cls: type[AdapterConfig],
    adapter_cls: type[Adapter],
    peft: PeftFormat | None = None,
    allocator: Callable[[nn.Module, AdapterConfig], Allocator] | None = None,
) -> None:
    """Add a method; ``config_cls.method`` must equal ``name``."""
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lower snake case, e.g. 'my_lora'")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered (by {_METHODS[name].adapter_cls.__module__})")
    if config_cls.method != name:
        raise ValueError(f"{config_cls.__name__}.method is {config_cls.method!r}, expected {name!r}")
    _METHODS[name] = Method(name, config_cls, adapter_cls, peft, allocator)


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a ``ValueError`` listing the known ones."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods are {sorted(_METHODS)}") from None


def methods() -> list[str]:
    """The names of all registered methods, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def registered() -> list[Method]:
    """All registered methods."""
    _load_builtin_methods()
    return [_METHODS[n] for n in sorted(_METHODS)]


def option_names(name: str) -> set[str]:
    """The keyword options of method ``name``'s config (shared fields such as ``targets`` included)."""
    return {f.name for f in fields(get_method(name).config_cls) if f.init}


class UnknownOptionError(ValueError, TypeError):
    """An option the method's config does not have (a ValueError, and a TypeError like any bad keyword)."""


def config(name: str, **kwargs: Any) -> AdapterConfig:
    """Build the config of method ``name`` from keyword arguments."""
    config_cls = get_method(name).config_cls
    known = option_names(name)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UnknownOptionError(f"{name}: unknown option(s) {unknown}; the options of {config_cls.__name__} are "
                                 f"{sorted(known)}")
    return config_cls(**kwargs)


_loaded = False


def _load_builtin_methods() -> None:
    """Import rankwise's own method modules and any entry-point plug-ins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    importlib.import_module("rankwise.adapters")
    for entry in entry_points(group="rankwise.methods"):
        entry.load()
