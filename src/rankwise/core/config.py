"""The base of every method's configuration.

A config is a keyword-only dataclass. It is validated when it is built (values that are wrong
on their own, such as ``r=0``) and again by each adapter when it meets a layer (values that do not
fit that layer, such as ``r > min(m, n)``). It round-trips through JSON with ``to_dict`` /
``from_dict``; unknown keys are an error, so a config from a newer or different method never loads
half-understood.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

Targets = Sequence[str] | str | None


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every method shares.

    Args:
        targets: which layers to adapt: a list of module-name suffixes (``["query", "value"]``
            matches ``encoder.layer.0.attention.self.query``), a regular expression string that
            must match the whole module name, or ``"all-linear"`` for every Linear / Conv1D layer
            except the model's output head. Names and regexes may also select convolution and embedding
            layers, for the methods that adapt them (``"all-linear"`` never does).
        exclude: module names (same forms as ``targets``, but no ``"all-linear"``) to leave alone
            even when ``targets`` matches them.
        modules_to_save: modules trained in full and saved with the adapter, typically a freshly
            initialised classification head (``["classifier"]``).
    """

    method: ClassVar[str] = ""
    # Options a side-by-side run (``rankwise compare`` / ``bench``, benchmarks/) applies unless the user sets
    # them: a method whose safe default refuses some layers names here the explicit choice that lets it run
    # on every layer the others adapt (SURM: rectangular layers).
    comparison_defaults: ClassVar[dict[str, Any]] = {}
    # True for a method that runs on a quantised bitsandbytes base layer (QLoRA): its forward needs only x, the
    # base output and the dequantised weight (``weight_matrix``), and its merge goes through ``merged_weight``.
    # ``adapt`` refuses a quantised target for every other method, naming the ones that support it.
    quantised_base: ClassVar[bool] = False

    targets: Targets = "all-linear"
    exclude: Targets = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(
                    f"{type(self).__name__}: targets must be a non-empty list of module-name suffixes, "
                    f"a regex string or 'all-linear'; got {self.targets!r}"
                )
        elif not isinstance(self.targets, str) or not self.targets:
            raise ValueError(
                f"{type(self).__name__}: targets must be a list of module-name suffixes, a regex string "
                f"or 'all-linear'; got {self.targets!r}"
            )
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Check the method's own hyper-parameters; raise ``ValueError`` naming the fix."""

    def for_layer(self, layer_name: str) -> AdapterConfig:
        """The config as layer ``layer_name`` sees it, for closed forms such as ``expected_num_params``:
        ``self``, except for configs with per-layer overrides (LoRA's ``rank_pattern`` / ``alpha_pattern``)."""
        return self

    @property
    def changes_base_weights(self) -> bool:
        """True when adapting rewrites the targeted base weights (LoRA's PiSSA / OLoRA inits): loaders keep a
        copy of those weights and put it back if the load fails."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields of this config (the method name is stored beside it)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config, refusing keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} does not know the field(s) {unknown}; known fields are {sorted(known)}. "
                "The adapter was probably written by a different method or a newer rankwise."
            )
        return cls(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


# ----------------------------------------------------------------------------------------------
# Validators shared by the methods' configs, so each message is written once.
# ----------------------------------------------------------------------------------------------


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_positive_number(owner: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def check_dropout(owner: str, value: Any) -> None:
    """Raise unless ``value`` is a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")


def config_field(default: Any, help: str) -> Any:
    """A dataclass field carrying its help text, shown by ``rankwise finetune --help``."""
    return field(default=default, metadata={"help": help})
