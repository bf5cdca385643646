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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

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
        ``self``, except for configs with per-layer overrides (:class:`LayerPatterns`: LoRA's, LoHa's and LoKr's
        ``rank_pattern`` / ``alpha_pattern``)."""
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


@dataclass(kw_only=True)
class LayerPatterns:
    """Per-layer rank and alpha, as PEFT's ``rank_pattern`` / ``alpha_pattern`` (LoRA, LoHa, LoKr).

    A mixin for a config with ``r`` and ``alpha`` fields, listed before :class:`AdapterConfig` in its bases
    (``class LoRAConfig(LayerPatterns, AdapterConfig)``); the config's ``validate`` calls :meth:`check_patterns`.
    Layer ℓ gets r_ℓ and α_ℓ from the first key of each dict that matches its name by PEFT's rule
    (:func:`pattern_key`), else ``r`` and ``alpha``; adapters build each layer from :meth:`for_layer`.
    """

    rank_pattern: dict[str, int] | None = field(  # field(): ruff wants a visible default for a dict
        default=None, metadata={"help": "{layer name or regex: r} overriding r per layer, matched as in PEFT"})
    alpha_pattern: dict[str, float] | None = field(
        default=None, metadata={"help": "{layer name or regex: alpha} overriding alpha per layer, matched as in PEFT"})

    def check_patterns(self) -> None:
        """Raise ``ValueError`` unless each pattern is None or a dict of valid regexes to positive ranks / alphas."""
        owner = type(self).__name__
        for name, check in (("rank_pattern", check_positive_int), ("alpha_pattern", check_positive_number)):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise ValueError(f"{owner}: {name} must be a dict {{layer name or regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except (re.error, TypeError) as error:
                    raise ValueError(f"{owner}: {name} key {key!r} is not a valid regular expression ({error})") from None
                check(owner, f"{name}[{key!r}]", value)

    def rank_of(self, layer_name: str) -> int:
        """The rank of layer ``layer_name``: its ``rank_pattern`` entry, else ``r`` (PEFT's rule, :func:`pattern_key`)."""
        key = pattern_key(self.rank_pattern, layer_name)
        return self.r if key is None else self.rank_pattern[key]  # type: ignore[attr-defined,index]

    def alpha_of(self, layer_name: str) -> float:
        """The alpha of layer ``layer_name``: its ``alpha_pattern`` entry, else ``alpha``."""
        key = pattern_key(self.alpha_pattern, layer_name)
        return self.alpha if key is None else float(self.alpha_pattern[key])  # type: ignore[attr-defined,index]

    def for_layer(self, layer_name: str) -> Self:
        """This config with the layer's pattern entries as its ``r`` and ``alpha`` and no patterns."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        return dataclasses.replace(self, r=self.rank_of(layer_name), alpha=self.alpha_of(layer_name),  # type: ignore[type-var]
                                   rank_pattern=None, alpha_pattern=None)


def pattern_key(pattern: dict[str, Any] | None, layer_name: str) -> str | None:
    """The first key of ``pattern`` that matches ``layer_name``, or None: PEFT 0.21.2's ``get_pattern_key``.

    A key is a regular expression that must match the end of the name at a dot boundary:
    ``re.match(rf"(.*\\.)?({key})$", layer_name)``. So ``"query"`` matches ``encoder.layer.0.query`` (and every
    other layer ending in ``.query``), ``"layer.0.query"`` matches that one layer, and ``"^up$"`` only a
    top-level ``up``. The first matching key in the dict's order wins, as in PEFT.
    """
    for key in pattern or {}:
        if re.match(rf"(.*\.)?({key})$", layer_name):
            return key
    return None


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
