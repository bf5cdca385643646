"""Every registered method under bfloat16 (autocast and a model cast to bfloat16), torch.compile and
gradient checkpointing.

bfloat16 tolerance: outputs within ``BF16_TOL`` of the float32 output's largest magnitude. bfloat16 keeps 8
significant bits (a relative rounding of 2⁻⁹ ≈ 2e-3 per value), and a layer's output carries a few
roundings (inputs, weights, the output itself), so ~5 units of 2⁻⁸ bound it; measured: at most 9e-3.
The FFT transforms (C3A, SURM) and the DoRA / BoRA norms must come out as float32 computations do (1e-5
/ 1e-6), which a bfloat16 computation misses by ~1e-3.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from method_cases import CASES
from torch import nn
from toy_models import ToyMLP, minilm_shaped_bert

import rankwise

METHODS = rankwise.methods()
BF16_TOL = 2e-2
#: the FFT families and their layouts (a 32→48 layer: rectangular, so native and tiled layouts both apply)
FFT_CASES = {
    "c3a": {"block_size": 16},
    "surm-circulant-native": {"structure": "circulant", "rectangular": "native"},
    "surm-toeplitz-native": {"structure": "toeplitz", "rectangular": "native"},
    "surm-circulant-tile": {"structure": "circulant", "rectangular": "tile"},
    "surm-toeplitz-tile": {"structure": "toeplitz", "rectangular": "tile"},
    "surm-ldr-tile": {"structure": "ldr", "rectangular": "tile"},
}


def dropout_fields(name: str) -> list[str]:
    """The method's dropout options (``dropout``; LoHa / LoKr's ``rank_dropout`` and ``module_dropout``)."""
    return [key for key in rankwise.config(name, **CASES[name].kwargs).to_dict() if key.endswith("dropout")]


def kwargs(name: str, dropout: float = 0.0) -> dict[str, Any]:
    """The method's toy case, with every dropout of the adapter set to ``dropout``."""
    return {**CASES[name].kwargs, **dict.fromkeys(dropout_fields(name), dropout)}


def perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every adapter tensor off its init (B = 0 would hide half the computation)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in rankwise.adapted_layers(model):
            for parameter in layer.adapter.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return model


def adapted(name: str, model: nn.Module | None = None, dropout: float = 0.0, **extra: Any) -> nn.Module:
    torch.manual_seed(0)
    model = ToyMLP() if model is None else model
    torch.manual_seed(1)
    return perturb(rankwise.adapt(model, rankwise.config(name, **{**kwargs(name, dropout), **extra}))).train()


def inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(3)).to(dtype)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def assert_bf16_close(out: torch.Tensor, reference: torch.Tensor) -> None:
    error = float((out.detach().float() - reference).abs().max())
    assert error <= BF16_TOL * float(reference.abs().max()), f"bf16 error {error:.3g}"


def assert_finite_training_step(model: nn.Module, out: torch.Tensor, dtype: torch.dtype) -> None:
    loss = out.float().square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in trainable(model).items():
        assert parameter.dtype == dtype and parameter.grad is not None and parameter.grad.dtype == dtype, name
        assert torch.isfinite(parameter.grad).all(), name


# ----------------------------------------------------------------------------------------------
# bfloat16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_autocast_bf16_trains_float32_adapters_close_to_float32(name):
    model = adapted(name)
    with torch.no_grad():
        reference = model(inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs())
    assert out.dtype == torch.bfloat16  # as the plain model's last Linear gives under autocast
    assert_bf16_close(out, reference)
    assert_finite_training_step(model, out, torch.float32)


@pytest.mark.parametrize(("name", "extra"), [("bora", {}), ("miss", {"init_weights": "bat", "dropout": 0.0})])
def test_methods_that_skip_the_base_layer_output_autocast_dtype(name, extra):
    """BoRA and MiSS bat compute the whole output from W (the wrapper skips the base layer); under autocast it
    still comes out in autocast's dtype, as the Linear it replaces, and plain float32 outside autocast."""
    layer = adapted(name, **extra).up
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(inputs()).dtype == layer.base_layer(inputs()).dtype == torch.bfloat16
    assert layer(inputs()).dtype == torch.float32


@pytest.mark.parametrize("name", METHODS)
def test_a_model_cast_to_bf16_trains_close_to_float32(name):
    model = adapted(name)
    with torch.no_grad():
        reference = model(inputs())
    model.to(torch.bfloat16)
    out = model(inputs(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, reference)
    assert_finite_training_step(model, out, torch.bfloat16)


def fft_adapter(layout: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    name = layout.split("-")[0]
    torch.manual_seed(0)
    model = perturb(rankwise.adapt(nn.Sequential(nn.Linear(32, 48)), rankwise.config(name, **FFT_CASES[layout])))
    return model.to(dtype)[0].adapter


@pytest.mark.parametrize("layout", FFT_CASES)
def test_fft_transforms_of_a_bf16_adapter_run_in_float32(layout):
    """The branch of a bfloat16 adapter is the float32 computation on its (bfloat16) tensors, not a bfloat16 one."""
    adapter = fft_adapter(layout, torch.bfloat16)
    exact = copy.deepcopy(adapter).float()
    x = inputs(torch.bfloat16)
    zeros = torch.zeros(5, 7, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        branch = adapter(x, zeros)
        want = exact(x.float(), zeros.float())
    assert branch.dtype == torch.float32  # added into the output in float32, rounded once by the wrapper
    torch.testing.assert_close(branch, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", FFT_CASES)
def test_fft_transforms_under_autocast_stay_float32(layout):
    adapter = fft_adapter(layout)
    x, zeros = inputs(), torch.zeros(5, 7, 48)
    with torch.no_grad():
        want = adapter(x, zeros)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            branch = adapter(x, zeros)
    torch.testing.assert_close(branch, want, rtol=1e-5, atol=1e-6)


def norm_adapter(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(64, 48)), rankwise.config(name, r=4, init_weights=False))
    return perturb(model, scale=0.5).to(dtype)[0].adapter


def norms(adapter: nn.Module) -> tuple[torch.Tensor, ...]:
    """DoRA's c, or BoRA's (d_out, d_in)."""
    if hasattr(adapter, "weight_norm"):
        return (adapter.weight_norm(adapter.base_weight()),)
    with torch.no_grad():
        return adapter.scales(adapter.base_weight())


@pytest.mark.parametrize("name", ["dora", "bora"])
def test_dora_and_bora_norms_are_float32_under_autocast(name):
    adapter = norm_adapter(name)
    want = norms(adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norms(adapter)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dora", "bora"])
def test_dora_and_bora_norms_of_a_bf16_model_are_float32(name):
    adapter = norm_adapter(name, torch.bfloat16)
    exact = copy.deepcopy(adapter).double()  # the same bfloat16 values, in float64
    for g, w in zip(norms(adapter), norms(exact)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# torch.compile (backend "aot_eager": dynamo's graph capture and AOTAutograd's backward, no codegen, so the
# test stays fast on CPU; benchmarks/precision.py times "inductor")
# ----------------------------------------------------------------------------------------------


class EveryMethod(nn.Module):
    """One adapted 32→48 layer per method side by side, so that a single (small) compile covers them all."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name: adapted(name, nn.Sequential(nn.Linear(32, 48))) for name in METHODS})

    def forward(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: layer(xs[name]) for name, layer in self.layers.items()}


def two_steps(model: EveryMethod, forward: Any) -> dict[str, Any]:
    """Outputs, parameter and input gradients of two training steps (an SGD step between them: state such as
    SingLoRA's step counter changes, and the compiled graph must see it)."""
    optimizer = torch.optim.SGD(trainable(model).values(), lr=0.1)
    record = {}
    for step in range(2):
        xs = {name: inputs().requires_grad_() for name in METHODS}
        outputs = forward(xs)
        sum(out.square().mean() for out in outputs.values()).backward()
        grads = {k: p.grad.clone() for k, p in trainable(model).items()}
        record[step] = {"outputs": {k: v.detach() for k, v in outputs.items()},
                        "grads": {**grads, **{f"layers.{name}.input": x.grad for name, x in xs.items()}}}
        optimizer.step()
        optimizer.zero_grad()
    return record


@pytest.fixture(scope="module")
def compiled_and_eager() -> tuple[dict[str, Any], dict[str, Any]]:
    eager = EveryMethod()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    # fullgraph: no method may break the graph (a break would fall back to eager for part of it).
    return two_steps(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True)), two_steps(eager, eager)


@pytest.mark.parametrize("name", METHODS)
def test_compiled_forward_and_backward_match_eager(compiled_and_eager, name):
    compiled, eager = compiled_and_eager
    for step in (0, 1):
        torch.testing.assert_close(compiled[step]["outputs"][name], eager[step]["outputs"][name], rtol=1e-5, atol=1e-5)
        keys = [k for k in eager[step]["grads"] if k.startswith(f"layers.{name}.")]
        assert len(keys) > 1
        for key in keys:
            torch.testing.assert_close(compiled[step]["grads"][key], eager[step]["grads"][key], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing (transformers' gradient_checkpointing_enable on a MiniLM-shaped BERT)
# ----------------------------------------------------------------------------------------------


def bert_gradients(name: str, checkpointing: bool, dropout: float, **checkpoint_kwargs: Any) -> dict[str, Any]:
    base = minilm_shaped_bert()
    model = adapted(name, base, dropout=dropout, targets="all-linear")
    if dropout == 0.0:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.SGD(trainable(model).values(), lr=0.1)
    torch.manual_seed(7)  # dropout masks (model and adapters) drawn alike in both runs
    model(ids).last_hidden_state.square().mean().backward()
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in trainable(model).items()}
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items() if "singlora_step" in k}
    return {"grads": grads, "state": state}


def assert_same_gradients(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert [k for k, g in got["grads"].items() if g is None] == [k for k, g in want["grads"].items() if g is None]
    assert sum(g is not None for g in want["grads"].values()) > 1
    for key, grad in want["grads"].items():
        if grad is not None:
            torch.testing.assert_close(got["grads"][key], grad, rtol=0, atol=1e-6, msg=key)
    assert got["state"].keys() == want["state"].keys()
    for key, value in want["state"].items():  # a recomputed forward does not advance SingLoRA's clock again
        stepped = want["grads"][key.replace("singlora_step", "singlora_A")] is not None  # not the unused pooler's
        assert torch.equal(got["state"][key], value) and int(value) == int(stepped), key


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    assert_same_gradients(bert_gradients(name, True, 0.0), bert_gradients(name, False, 0.0))


WITH_DROPOUT = [name for name in METHODS if dropout_fields(name)]


@pytest.mark.parametrize("name", WITH_DROPOUT)
def test_gradient_checkpointing_replays_the_dropout_masks(name):
    """Model and adapter dropout 0.1: the recomputed forward draws the same masks (torch's checkpoint restores
    the RNG state), so the gradients are those of the one forward. Reentrant checkpointing here (transformers'
    default, used above, is the non-reentrant one), so both of torch's implementations are covered."""
    checkpointed = bert_gradients(name, True, 0.1, use_reentrant=True)
    assert_same_gradients(checkpointed, bert_gradients(name, False, 0.1))
