"""C3A oracles: an independent dense block-circulant reference (from the paper's definition) and
PEFT 0.21.2 (outputs, merged weight, kernel gradients, adapter files both ways).

PEFT's input gradient is wrong (its custom backward misses a transpose, c3a.md §2), so input
gradients are checked against the dense reference only, and one test documents PEFT's error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters.c3a import C3AAdapter, C3AConfig

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


class TwoLinear(nn.Module):
    """Rectangular both ways: 32 -> 48 -> 64 (block sizes 8 and 16 divide every width)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(32, 48)
        self.lin2 = nn.Linear(48, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


def dense_block_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The paper's C_blk(K): block (i, j) is the circulant with first row K[i, j], each row the one
    above shifted right by one (row t = roll(K[i, j], t))."""
    p, q, _ = kernel.shape
    rows = []
    for i in range(p):
        blocks = [torch.stack([torch.roll(kernel[i, j], t) for t in range(kernel.shape[-1])]) for j in range(q)]
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows, dim=0)


def make_base(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return TwoLinear().to(dtype)


def adapted(dtype: torch.dtype = torch.float32, block_size: int = 16, init: object = "gaussian") -> nn.Module:
    torch.manual_seed(1)
    return rankwise.adapt(make_base(dtype), C3AConfig(block_size=block_size, init_weights=init))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_forward_and_delta_match_dense_reference(dtype, tol, block_size):
    model = adapted(dtype, block_size)
    x = torch.randn(3, 5, 32, dtype=dtype)
    for name in ("lin1", "lin2"):
        layer = getattr(model, name)
        kernel = layer.adapter.c3a_kernel
        assert kernel.dtype == dtype and kernel.shape == (layer.adapter.out_features // block_size,
                                                          layer.adapter.in_features // block_size, block_size)
        delta = dense_block_circulant(kernel.detach()) / layer.adapter.in_features
        torch.testing.assert_close(layer.adapter.delta_weight().detach(), delta, atol=tol, rtol=tol)
        inp = torch.randn(3, 5, layer.adapter.in_features, dtype=dtype)
        expected = nn.functional.linear(inp, layer.base_layer.weight + delta, layer.base_layer.bias)
        torch.testing.assert_close(layer(inp).detach(), expected, atol=tol, rtol=tol)
    assert model(x).shape == (3, 5, 64)


def test_gradcheck_input_and_kernel_float64():
    torch.manual_seed(0)
    base = nn.Linear(24, 16).double()
    adapter = C3AAdapter(base, C3AConfig(block_size=8, init_weights="gaussian")).double()
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    kernel = adapter.c3a_kernel.detach().clone().requires_grad_()

    def branch(inp: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(adapter, {"c3a_kernel": k}, (inp, torch.zeros(3, 16, dtype=torch.float64)))

    assert torch.autograd.gradcheck(branch, (x, kernel))


def test_input_gradient_matches_dense_while_peft_does_not():
    """PEFT's BlockCircularConvolution.backward returns Σ_l g_l K[(t+l) mod b] for ∂L/∂x instead of
    Σ_i C(K_ij)ᵀ g_i; ours is exact."""
    base = make_base()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.C3AConfig(
        block_size=16, target_modules=["lin1", "lin2"], init_weights="gaussian"))
    ours = rankwise.adapt(copy.deepcopy(base), C3AConfig(block_size=16, targets=["lin1", "lin2"]))
    with torch.no_grad():
        for name in ("lin1", "lin2"):
            getattr(ours, name).adapter.c3a_kernel.copy_(peft_model.base_model.model.get_submodule(name).c3a_kernel["default"])
    layer = ours.lin1
    kernel = layer.adapter.c3a_kernel.detach()
    dense_delta = dense_block_circulant(kernel) / 32
    x = torch.randn(4, 32)
    upstream = torch.randn(4, 48)

    def input_grad(fn) -> torch.Tensor:
        inp = x.clone().requires_grad_()
        (fn(inp) * upstream).sum().backward()
        return inp.grad

    reference = input_grad(lambda inp: nn.functional.linear(inp, layer.base_layer.weight + dense_delta))
    torch.testing.assert_close(input_grad(ours.lin1), reference, atol=1e-5, rtol=1e-5)
    peft_grad = input_grad(peft_model.base_model.model.lin1)
    assert (peft_grad - reference).abs().max() > 1e-2, "PEFT's input gradient bug seems fixed; update c3a.py docstring"


def test_peft_parity_outputs_merge_and_kernel_gradients(tmp_path):
    base = make_base()
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.C3AConfig(
        block_size=16, target_modules=["lin1", "lin2"], init_weights="gaussian"))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(6, 32)
    torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=1e-5)
    # Kernel gradients layer by layer, on inputs without grad: in a stack, lin1's kernel gradient
    # flows through lin2's adapter input gradient, which PEFT gets wrong.
    for name, width in (("lin1", 32), ("lin2", 48)):
        inp, upstream = torch.randn(6, width), torch.randn(6, 64 if name == "lin2" else 48)
        peft_layer = peft_model.base_model.model.get_submodule(name)
        (peft_layer(inp) * upstream).sum().backward()
        (getattr(ours, name)(inp) * upstream).sum().backward()
        torch.testing.assert_close(getattr(ours, name).adapter.c3a_kernel.grad, peft_layer.c3a_kernel["default"].grad,
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        merged_peft = peft_model.merge_and_unload()
        rankwise.merge(ours)
        for name in ("lin1", "lin2"):
            torch.testing.assert_close(getattr(ours, name).base_layer.weight, getattr(merged_peft, name).weight,
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), merged_peft(x), atol=1e-5, rtol=1e-5)


def test_export_loads_in_peft(tmp_path):
    base = make_base()
    ours = adapted(init="xavier_uniform")
    rankwise.export_peft(ours, tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), atol=1e-5, rtol=1e-5)
    assert loaded.peft_config["default"].block_size == 16


def test_zero_init_is_identity_and_default_config_fits_minilm_widths():
    base = make_base()
    model = rankwise.adapt(copy.deepcopy(base), C3AConfig(block_size=16, init_weights=True))
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    mlp = nn.Sequential(nn.Linear(384, 1536), nn.Linear(1536, 384), nn.Linear(384, 384))
    model = rankwise.adapt(mlp, rankwise.config("c3a"))
    assert rankwise.trainable_parameters(model) == (384 * 1536 * 2 + 384 * 384) // 64


@pytest.mark.parametrize("init", [True, False, "zeros", "gaussian", "kaiming_uniform", "xavier_uniform"])
def test_seeded_init_equals_peft(init):
    """Every init_weights value draws PEFT's kernel from the same seed ("zeros" is PEFT's True)."""
    base = make_base()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.C3AConfig(
        block_size=16, target_modules=["lin1", "lin2"], init_weights=True if init == "zeros" else init))
    torch.manual_seed(3)
    ours = rankwise.adapt(copy.deepcopy(base), C3AConfig(block_size=16, init_weights=init))
    for name in ("lin1", "lin2"):
        kernel = getattr(ours, name).adapter.c3a_kernel
        assert kernel.any() == (init not in (True, "zeros"))
        torch.testing.assert_close(kernel, theirs.base_model.model.get_submodule(name).c3a_kernel["default"],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("init, bound", [
    ("xavier_uniform", (6 / (1024 + 512)) ** 0.5),  # fan-in + fan-out of the layer, not of a block
    (False, (6 / (1024 + 512)) ** 0.5),
    ("kaiming_uniform", 1 / 1024**0.5),  # fan-in n = in_features (not out_features 512)
])
def test_uniform_init_bounds_and_std_are_pinned(init, bound):
    """65,536 kernel entries of a 1024 -> 512 layer: U(±bound) to 1% at the extremes and 2% in std."""
    torch.manual_seed(0)
    kernel = C3AAdapter(nn.Linear(1024, 512), C3AConfig(block_size=8, init_weights=init)).c3a_kernel.detach()
    assert kernel.shape == (64, 128, 8)
    assert kernel.abs().max() <= bound and kernel.abs().max() > 0.99 * bound
    assert abs(kernel.std().item() / (bound / 3**0.5) - 1) < 0.02
    assert abs(kernel.mean().item()) < 0.01 * bound


def test_gaussian_init_is_standard_normal():
    """N(0, 1), whatever the layer's size: mean 0, std 1 (1%), and a normal's tails (not a uniform's)."""
    torch.manual_seed(0)
    kernel = C3AAdapter(nn.Linear(1024, 512), C3AConfig(block_size=8, init_weights="gaussian")).c3a_kernel.detach()
    assert abs(kernel.mean().item()) < 0.01 and abs(kernel.std().item() - 1) < 0.01
    assert abs((kernel.abs() < 1).float().mean().item() - 0.6827) < 0.01  # P(|N(0,1)| < 1)
    assert kernel.abs().max() > 3.5


def test_width_not_divisible_names_layer_and_fix():
    with pytest.raises(ValueError, match=r"lin1.*block_size=12 does not divide both widths 48 and 32.*gcd"):
        rankwise.adapt(make_base(), C3AConfig(block_size=12))
    with pytest.warns(UserWarning, match="block_size=1 makes"):
        C3AConfig(block_size=1)


def test_paper_parameter_counts():
    """Paper Table 2 counts (q, v on 12 / 24 layers): RoBERTa-base b=768 -> 18,432; large b=1024 -> 49,152."""
    count = C3AAdapter.expected_num_params
    assert 24 * count(768, 768, C3AConfig(block_size=768)) == 18_432
    assert 24 * count(768, 768, C3AConfig(block_size=128)) == 110_592
    assert 48 * count(1024, 1024, C3AConfig(block_size=1024)) == 49_152
