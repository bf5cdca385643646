"""Adapted models under FSDP2 (``torch.distributed.fsdp.fully_shard``) on two gloo processes.

One spawned run (module fixture) trains every registered method sharded, each process on its half of
the same global batches, saves the adapter from the sharded state and loads it back; the tests compare
with one unsharded process on the whole batches. One method of each kind (additive LoRA, DoRA's
magnitude, C3A's FFT, BoRA and MiSS "bat", which read the base weight in their forward) is sharded per
adapted layer plus the root (ZeRO-3 units: the base weight is gathered only inside its layer's unit);
the other methods are sharded at the root. (Lean imports: the spawned processes import this module.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gloo import on_gloo_processes
from method_cases import CASES
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from toy_models import ToyMLP

import rankwise
import rankwise.core.io
from rankwise.compress.lowrank_conv import factorize_layer
from rankwise.core.io import adapter_state, full_tensors
from rankwise.core.quantised import is_sharded, quantisation_reason

#: one method of each kind, sharded per adapted layer (its own fully_shard unit) and at the root
PER_LAYER = {"lora": {}, "dora": {}, "c3a": {}, "bora": {}, "miss": {"init_weights": "bat", "r": 8}}
STEPS = 3
SAVED = "saved"


def kwargs(name: str) -> dict[str, Any]:
    """The method's toy case without dropout (every process would draw its own masks)."""
    values = {**CASES[name].kwargs, **PER_LAYER.get(name, {})}
    dropouts = [key for key in rankwise.config(name, **CASES[name].kwargs).to_dict() if key.endswith("dropout")]
    return {**values, **dict.fromkeys(dropouts, 0.0)}


def adapted(name: str) -> nn.Module:
    """A seeded adapted ToyMLP with every adapter tensor moved off its init (so every update is non-trivial)."""
    torch.manual_seed(0)
    net = ToyMLP()
    torch.manual_seed(1)
    model = rankwise.adapt(net, rankwise.config(name, **kwargs(name)))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in rankwise.adapted_layers(model):
            for parameter in layer.adapter.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def batches(part: slice) -> list[torch.Tensor]:
    """The global batches (8 rows), or one process's rows of them."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(8, 32, generator=generator)[part] for _ in range(STEPS)]


def train(model: nn.Module, part: slice) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for x in batches(part):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def shard(model: nn.Module, per_layer: bool) -> None:
    if per_layer:
        for _, layer in rankwise.adapted_layers(model):
            fully_shard(layer)
    fully_shard(model)


def error(call: Any) -> str:
    """``"<exception class>: <message>"`` of what ``call()`` raises, or ``"nothing"`` (every process raises at
    the same point, so the run goes on and each refusal fails only its own test)."""
    try:
        call()
    except Exception as caught:  # noqa: BLE001 - the tests check the class
        return f"{type(caught).__name__}: {caught}"
    return "nothing"


def _errors() -> dict[str, str]:
    errors = {}
    sharded = ToyMLP()
    shard(sharded, per_layer=False)
    errors["adapt"] = error(lambda: rankwise.adapt(sharded, rankwise.config("lora")))
    errors["compress"] = error(lambda: rankwise.compress(sharded, ratio=0.5))
    conv = nn.Sequential(nn.Conv2d(4, 8, 3))
    fully_shard(conv)
    errors["factorize"] = error(lambda: factorize_layer("0", conv[0], rank=2))
    dora = rankwise.adapt(ToyMLP(), rankwise.config("dora", r=4))
    fully_shard(dora.up.base_layer)  # the base layer alone: its weight is whole only for its own forward
    fully_shard(dora)
    errors["base_alone"] = error(lambda: dora(torch.randn(2, 32)))
    for name in ("adalora", "elalora"):
        model = rankwise.adapt(ToyMLP(), rankwise.config(name, **kwargs(name)))
        shard(model, per_layer=False)
        model(torch.randn(2, 32)).sum().backward()
        errors[name] = error(lambda model=model: rankwise.allocator(model).step(0))
    ard = rankwise.adapt(ToyMLP(), rankwise.config("ardlora", **kwargs("ardlora")))
    shard(ard, per_layer=False)
    errors["ardlora"] = error(lambda: rankwise.allocator(ard).finalize())
    gora = rankwise.adapt(ToyMLP(), rankwise.config("gora", **kwargs("gora")))
    shard(gora, per_layer=False)
    errors["gora"] = error(lambda: rankwise.allocator(gora).before_training([torch.randn(2, 32)],
                                                                            lambda m, x: m(x).sum()))
    return errors


def _mixed_precision() -> dict[str, tuple[float, bool]]:
    """One method of each kind under FSDP2's bfloat16 ``MixedPrecisionPolicy`` (the parameters are gathered in
    bfloat16, so C3A's kernel reaches its FFT in bfloat16): the output's error relative to the float32 output,
    and whether every gradient is finite."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    results = {}
    for name in PER_LAYER:
        model = adapted(name)
        with torch.no_grad():
            reference = model(x)
        for _, layer in rankwise.adapted_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        out = model(x)
        out.float().square().mean().backward()
        finite = all(bool(torch.isfinite(p.grad.full_tensor()).all()) for p in model.parameters() if p.requires_grad)
        results[name] = (float((out.detach().float() - reference).abs().max() / reference.abs().max()), finite)
    return results


def _quantisation() -> dict[str, Any]:
    """What the quantised-layer rule says of a sharded float Linear and of a sharded int8 weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    linear = nn.Linear(32, 64)
    fully_shard(linear)
    holder = nn.Module()
    mesh = init_device_mesh("cpu", (2,))
    holder.weight = nn.Parameter(DTensor.from_local(torch.zeros(2, 8, dtype=torch.int8), mesh, [Shard(0)]),
                                 requires_grad=False)
    return {"float": (is_sharded(linear.weight), quantisation_reason(linear)),
            "int8": (is_sharded(holder.weight), quantisation_reason(holder))}


def _work(rank: int, directory: Path) -> dict[str, Any]:
    part = slice(4 * rank, 4 * rank + 4)
    trained, sharded, loaded = {}, {}, {}
    writes = []  # the config files this process wrote
    write_json = rankwise.core.io.save_json
    rankwise.core.io.save_json = lambda path, payload, **options: (writes.append(path.parent.name),
                                                                  write_json(path, payload, **options))
    for name in rankwise.methods():
        model = adapted(name)
        shard(model, per_layer=name in PER_LAYER)
        sharded[name] = all(is_sharded(p) for _, layer in rankwise.adapted_layers(model) for p in layer.adapter.parameters())
        train(model, part)
        trained[name] = full_tensors(adapter_state(model))
        rankwise.save(model, directory / SAVED / name)
        torch.manual_seed(5)  # a different init: every loaded tensor must come from the file
        loaded[name] = adapter_state(rankwise.load(ToyMLP(), directory / SAVED / name))
    rankwise.core.io.save_json = write_json
    return {"trained": trained, "sharded": sharded, "loaded": loaded, "errors": _errors(), "writes": writes,
            "mixed": _mixed_precision(),
            "quantisation": _quantisation(), "files": sorted(p.name for p in (directory / SAVED).iterdir())}


class _Work:
    """``_work`` bound to the run's directory (picklable for the spawned processes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, rank: int) -> dict[str, Any]:
        return _work(rank, self.directory)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("fsdp")
    return on_gloo_processes(_Work(directory), directory)


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    """Every method trained unsharded, on one process, on the whole batches."""
    states = {}
    for name in rankwise.methods():
        model = adapted(name)
        train(model, slice(None))
        states[name] = adapter_state(model)
    return states


def close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert not is_sharded(got[key])
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("name", rankwise.methods())
def test_sharded_training_matches_one_process_on_the_global_batch(run, reference, name):
    start = adapter_state(adapted(name))
    assert max(float((reference[name][k] - start[k]).abs().max()) for k in start) > 1e-3  # training moved it
    for result in run:
        assert result["sharded"][name], "the adapter was not sharded: the comparison would prove nothing"
        close(result["trained"][name], reference[name])


@pytest.mark.parametrize("name", rankwise.methods())
def test_a_full_adapter_file_is_saved_from_the_sharded_state_and_loads_everywhere(run, reference, name):
    assert run[0]["files"] == sorted(rankwise.methods())
    assert run[0]["writes"] == rankwise.methods() and run[1]["writes"] == []  # process 0 alone writes
    for result in run:  # every process loads what process 0 wrote, as soon as save returns
        close(result["loaded"][name], reference[name])


@pytest.mark.parametrize("name", PER_LAYER)
def test_bf16_mixed_precision_policy_trains_every_kind(run, name):
    error, finite = run[0]["mixed"][name]
    assert finite and error <= 2e-2  # the bfloat16 tolerance of tests/test_precision.py


def test_adapting_a_sharded_model_is_refused(run):
    message = run[0]["errors"]["adapt"]
    assert message.startswith("ValueError: layer 'up' (Linear) has a sharded weight") and "then call fully_shard" in message
    assert "quantised" not in message


@pytest.mark.parametrize("entry", ["compress", "factorize"])
def test_compressing_a_sharded_model_is_refused(run, entry):
    message = run[0]["errors"][entry]
    assert message.startswith("ValueError: layer ") and "has a sharded weight" in message
    assert "Compress the unsharded model" in message and "quantised" not in message


def test_a_base_layer_sharded_alone_is_refused_where_the_adapter_reads_it(run):
    message = run[0]["errors"]["base_alone"]
    assert message.startswith("ValueError: DoRAAdapter cannot adapt layer 'up'")
    assert "adapted layer or a module above it" in message


@pytest.mark.parametrize("name", ["adalora", "elalora"])
def test_allocators_that_need_whole_adapters_refuse_shards(run, name):
    message = run[0]["errors"][name]
    assert message.startswith("ValueError: ") and "sharded by FSDP2" in message and "DDP" in message
    assert ("resizes" in message) == (name == "elalora")


def test_ardlora_reads_its_ranks_and_finalizes_unsharded(run):
    message = run[0]["errors"]["ardlora"]
    assert message.startswith("ValueError: ARDLoRAAdapter") and "load it into the unsharded model" in message


def test_gora_initialises_before_sharding(run):
    message = run[0]["errors"]["gora"]
    assert message.startswith("ValueError: GoRA") and "initialise the unsharded model" in message


def test_a_sharded_float_weight_is_not_quantised_but_a_sharded_int8_one_is(run):
    quantisation = run[0]["quantisation"]
    assert quantisation["float"] == (True, None)
    sharded, reason = quantisation["int8"]
    assert sharded and reason == "its weight has dtype torch.int8"
