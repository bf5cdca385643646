"""SURM oracles: independent dense references written from the matrix definitions (surm.md §2, §9),
for every structure, square and rectangular layers (the paper's native m×n forms and rankwise's
block tiling), float32 and float64; gradcheck of every FFT path; dropout placement and every init
pinned against reference draws; the rectangular rule; and the per-structure contract the method
suite covers only for the default structure."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from toy_models import forward_and_dropped_input

import rankwise
from rankwise.adapters import surm
from rankwise.adapters.surm import SURMAdapter, SURMConfig
from rankwise.core.layer import AdaptedLayer

SHAPES = [(8, 8), (7, 7), (12, 8), (6, 9), (16, 24), (5, 13), (13, 5), (1, 6)]  # (out, in): square, odd, rectangular
STRUCTURES = ["circulant", "toeplitz", "ldr", "kronecker"]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- dense references from the definitions --------------------------------------------------------


def circulant_col(v: torch.Tensor) -> torch.Tensor:
    """First column v; column s is v shifted down by s."""
    return torch.stack([torch.roll(v, s) for s in range(len(v))], dim=1)


def symmetric_toeplitz(v: torch.Tensor) -> torch.Tensor:
    g = len(v)
    return torch.stack([torch.stack([v[abs(t - s)] for s in range(g)]) for t in range(g)])


def skew_circulant(s: torch.Tensor) -> torch.Tensor:
    """First row s; each row is the one above shifted right by one, the wrapped entry negated."""
    rows = [s]
    for _ in range(len(s) - 1):
        rows.append(torch.cat([-rows[-1][-1:], rows[-1][:-1]]))
    return torch.stack(rows)


def tiled(block: Callable[[int, int], torch.Tensor], p: int, q: int) -> torch.Tensor:
    return torch.cat([torch.cat([block(i, j) for j in range(q)], dim=1) for i in range(p)], dim=0)


def paper_rectangular_circulant(v: torch.Tensor, n: int) -> torch.Tensor:
    """The paper's §3 n×m circulant (first row v, each next row the one above shifted right by one,
    cyclically), transposed to the m×n ΔW it acts as (x·M = x ΔWᵀ, the official code's orientation)."""
    rows = [v]
    for _ in range(n - 1):
        rows.append(torch.roll(rows[-1], 1))
    return torch.stack(rows).T


def paper_rectangular_toeplitz(column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The paper's §3 m×n Toeplitz matrix: given first column and first row, constant diagonals."""
    m, n = len(column), len(row)
    entries = [[None] * n for _ in range(m)]
    for i in range(m):
        entries[i][0] = column[i]
    for j in range(n):
        entries[0][j] = row[j]
    for i in range(1, m):
        for j in range(1, n):
            entries[i][j] = entries[i - 1][j - 1]
    return torch.stack([torch.stack(r) for r in entries])


def reference_delta(adapter: SURMAdapter) -> torch.Tensor:
    """ΔW from the paper/official definitions (surm.md §2a–2d, §9), built without the module's helpers."""
    alpha = adapter.alpha
    if adapter.structure == "kronecker":
        return alpha / adapter.r * torch.kron(adapter.surm_B, adapter.surm_A)
    n = adapter.in_features
    if adapter.native and adapter.structure == "toeplitz":
        t = adapter.surm_t  # first column t[n−1:], first row t[n−1::-1]
        return alpha * paper_rectangular_toeplitz(t[n - 1:], t[: n].flip(0))
    if adapter.native:
        kernel = adapter.surm_a if adapter.surm_b is None else adapter.surm_a * adapter.surm_b
        return alpha * paper_rectangular_circulant(kernel, n)
    if adapter.structure == "ldr":
        c, s = adapter.surm_c, adapter.surm_s
        p, q, k, _ = c.shape
        return alpha * tiled(lambda i, j: sum(circulant_col(c[i, j, h]) @ skew_circulant(s[i, j, h]).T
                                             for h in range(k)), p, q)
    a = adapter.surm_a
    p, q, _ = a.shape
    if adapter.structure == "toeplitz":
        b = adapter.surm_b
        return alpha * tiled(lambda i, j: symmetric_toeplitz(b[i, j]) @ symmetric_toeplitz(a[i, j]), p, q)
    kernel = a if adapter.surm_b is None else a * adapter.surm_b
    return alpha * tiled(lambda i, j: circulant_col(kernel[i, j]), p, q)


def make_layer(out_f: int, in_f: int, dtype: torch.dtype, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(in_f, out_f).to(dtype)), SURMConfig(**kwargs))
    with torch.no_grad():
        for parameter in model[0].adapter.parameters():
            parameter.normal_()
    return model[0]


def kwargs_for(structure: str, out_f: int, in_f: int, rectangular: str = "tile") -> dict:
    if structure == "kronecker":
        return {"structure": structure, "r": max(d for d in (1, 2, 3, 4) if math.gcd(out_f, in_f) % d == 0),
                "alpha": 2.0}
    return {"structure": structure, "displacement_rank": 2, "alpha": 0.5, "use_prod": structure == "circulant",
            "rectangular": rectangular}


LAYOUTS = [(s, "tile") for s in STRUCTURES] + [("circulant", "native"), ("toeplitz", "native")]


# -- oracles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("structure, rectangular", LAYOUTS, ids=lambda v: v)
def test_fast_forward_and_merge_match_dense_definition(structure, rectangular, shape, dtype, tol):
    out_f, in_f = shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiles with g = 1 outgrow the dense update (tested below)
        layer = make_layer(out_f, in_f, dtype, **kwargs_for(structure, out_f, in_f, rectangular))
    delta = reference_delta(layer.adapter).detach()
    scale = max(1.0, delta.abs().max().item())
    x = torch.randn(4, 3, in_f, dtype=dtype)
    expected = nn.functional.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=tol * scale, rtol=tol)
        torch.testing.assert_close(layer.adapter.delta_weight(), delta, atol=tol * scale, rtol=tol)


def test_circulant_without_product_and_explicit_block_size():
    layer = make_layer(16, 24, torch.float64, structure="circulant", use_prod=False, block_size=4)
    assert layer.adapter.surm_a.shape == (4, 6, 4) and layer.adapter.surm_b is None
    x = torch.randn(5, 24, dtype=torch.float64)
    delta = reference_delta(layer.adapter).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias),
                                   atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "ldr", "native circulant", "native toeplitz"])
def test_gradcheck_fft_paths(structure):
    torch.manual_seed(0)
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)  # q = 2 blocks of g = 5 (odd)
    p, q, g = 3, 2, 5
    if structure == "circulant":
        v = torch.randn(p, q, g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(surm.circulant_matvec, (x, v))
    elif structure == "toeplitz":
        a, b = (torch.randn(p, q, g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(surm.toeplitz_matvec, (x, a, b))
    elif structure == "ldr":
        c, s = (torch.randn(p, q, 2, g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(surm.ldr_matvec, (x, c, s))
    elif structure == "native circulant":
        for m in (3, 7, 13):  # folds x (n = 10 > m) and pads it (n < m)
            v = torch.randn(m, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(surm.rectangular_circulant_matvec, (x, v))
    else:
        for m in (3, 13):
            t = torch.randn(m + 10 - 1, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(surm.rectangular_toeplitz_matvec, (x, t))


# -- the contract for every structure (the method suite runs only the default) ---------------------


@pytest.mark.parametrize("structure, rectangular", LAYOUTS, ids=lambda v: v)
def test_starts_at_zero_counts_and_merge_round_trip(structure, rectangular, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 16))
    config = SURMConfig(targets=["0", "2", "3"], **{**kwargs_for(structure, 32, 16, rectangular), "r": 4})
    model = rankwise.adapt(copy.deepcopy(base), config)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    expected = sum(SURMAdapter.expected_num_params(o, i, config) for o, i in ((32, 16), (16, 32), (16, 16)))
    closed_form = {  # layers 32×16, 16×32, 16×16
        ("circulant", "tile"): 2 * (512 // 16 * 2 + 16), ("toeplitz", "tile"): 2 * (512 // 16 * 2 + 16),
        ("ldr", "tile"): 4 * (512 // 16 * 2 + 16), ("kronecker", "tile"): 48 + 48 + 32,
        ("circulant", "native"): 2 * 32 + 2 * 16 + 2 * 16, ("toeplitz", "native"): 47 + 47 + 2 * 16,
    }[structure, rectangular]
    assert rankwise.trainable_parameters(model) == expected == closed_form
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
        adapted = model(x)
        assert not torch.allclose(adapted, base(x), atol=1e-4)
        rankwise.save(model, tmp_path / "a")
        restored = rankwise.load(copy.deepcopy(base), tmp_path / "a")
        torch.testing.assert_close(restored(x), adapted, atol=0, rtol=0)
        rankwise.merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        rankwise.unmerge(model)
        torch.testing.assert_close(model[0].base_layer.weight, base[0].weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("structure, rectangular", LAYOUTS, ids=lambda v: v)
def test_training_forward_never_builds_the_dense_delta(structure, rectangular, monkeypatch):
    layer = make_layer(12, 8, torch.float32, **kwargs_for(structure, 12, 8, rectangular))

    def refuse(*args, **kwargs):
        raise AssertionError("the training forward built the dense ΔW")

    for name in ("circulant_dense", "toeplitz_dense", "ldr_dense", "rectangular_circulant_dense",
                 "rectangular_toeplitz_dense"):
        monkeypatch.setattr(surm, name, refuse)
    monkeypatch.setattr(torch, "kron", refuse)
    layer(torch.randn(2, 8)).sum().backward()


# -- dropout placement and init, against reference draws --------------------------------------------


@pytest.mark.parametrize("structure, rectangular", LAYOUTS, ids=lambda v: v)
def test_dropout_acts_on_the_adapter_input_only(structure, rectangular):
    """Official layers: y = x Wᵀ + b + α·(ΔW applied to dropout(x)). The reference draws the same mask
    (one dropout call on x, same seed); dropout removed, or applied to the base path, fails here."""
    layer = make_layer(12, 8, torch.float64, dropout=0.5, **kwargs_for(structure, 12, 8, rectangular)).train()
    x = torch.randn(64, 8, dtype=torch.float64)
    delta = reference_delta(layer.adapter).detach()
    out, dropped = forward_and_dropped_input(lambda: layer(x), x, 0.5)
    expected = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) + dropped @ delta.T
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # eval: no dropout at all
        torch.testing.assert_close(layer.eval()(x), nn.functional.linear(x, layer.base_layer.weight + delta,
                                                                         layer.base_layer.bias), atol=1e-10, rtol=1e-10)


def init_draws(shape: tuple[int, ...], **kwargs) -> dict[str, torch.Tensor]:
    """The adapter's tensors right after construction from seed 7 on an (out, in) = shape layer."""
    base = nn.Linear(shape[1], shape[0])
    torch.manual_seed(7)
    adapter = SURMAdapter(base, SURMConfig(**kwargs), "layer")
    return {name: p.detach() for name, p in adapter.named_parameters()}


@pytest.mark.parametrize("structure, kwargs, draws", [
    ("circulant", {}, {"surm_a": (1.0, (16, 16, 16)), "surm_b": (0.0, (16, 16, 16))}),
    ("circulant", {"use_prod": False}, {"surm_a": (0.0, (16, 16, 16))}),
    ("circulant", {"rectangular": "native"}, {"surm_a": (1.0, (4096,)), "surm_b": (0.0, (4096,))}),
    ("toeplitz", {}, {"surm_a": (0.02, (16, 16, 16)), "surm_b": (0.0, (16, 16, 16))}),
    ("toeplitz", {"rectangular": "native"}, {"surm_t": (0.0, (4096 + 256 - 1,))}),
    ("ldr", {"displacement_rank": 2}, {"surm_c": (0.0, (16, 16, 2, 16)), "surm_s": (0.02, (16, 16, 2, 16))}),
], ids=["circulant", "circulant-no-prod", "circulant-native", "toeplitz", "toeplitz-native", "ldr"])
def test_init_distributions(structure, kwargs, draws):
    """The official inits (native Toeplitz: zeros): seeded equality with a reference N(0, σ²) draw in
    construction order, and the sample std of ≥ 4096 draws within 4 % of σ."""
    native = kwargs.get("rectangular") == "native"
    shape = (4096, 256) if native else (256, 256)
    block = {} if native else {"block_size": 16}
    tensors = init_draws(shape, structure=structure, **block, **kwargs)
    assert set(tensors) == set(draws)
    torch.manual_seed(7)
    for name, (std, size) in draws.items():  # parameters are created, and drawn, in this order
        reference = torch.randn(size) * std if std else torch.zeros(size)
        torch.testing.assert_close(tensors[name], reference, atol=0, rtol=0, msg=name)
        if std:
            assert abs(tensors[name].std().item() / std - 1) < 0.04 and abs(tensors[name].mean().item()) < 0.04 * std


def test_kronecker_init_bounds():
    """A ~ kaiming_uniform(a=√5): U(±1/√fan_in), fan_in = n/r; B = 0."""
    tensors = init_draws((256, 1024), structure="kronecker", r=16)
    bound = 1 / math.sqrt(1024 // 16)
    A = tensors["surm_A"]
    assert A.shape == (16, 64) and A.abs().max() <= bound and A.abs().max() > 0.98 * bound
    assert abs(A.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert torch.equal(tensors["surm_B"], torch.zeros(16, 16))


# -- rectangular layers --------------------------------------------------------------------------------


def test_rectangular_layers_are_refused_by_default_with_the_fix():
    for structure in ("circulant", "toeplitz", "ldr"):
        model = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 1536))  # MiniLM attention and FFN widths
        with pytest.raises(ValueError) as error:
            rankwise.adapt(model, SURMConfig(structure=structure))
        message = str(error.value)
        assert "'1'" in message and "out_features=1536, in_features=384" in message
        assert "rectangular='tile'" in message and "3,072 parameters" in message
        value = "tile" if structure == "ldr" else "native"
        assert f"--rectangular {value}," in message and f"--set surm.rectangular={value}" in message
        assert ("rectangular='native'" in message) == (structure != "ldr")
        assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    square_only = rankwise.adapt(nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 1536)),
                                 SURMConfig(targets=["0"]))
    assert rankwise.trainable_parameters(square_only) == 2 * 384


def test_files_saved_before_the_rectangular_option_keep_their_tiling(tmp_path):
    net = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 18))
    model = rankwise.adapt(copy.deepcopy(net), SURMConfig(rectangular="tile"))
    with torch.no_grad():
        for _, layer in rankwise.adapted_layers(model):
            layer.adapter.surm_b.normal_()
    rankwise.save(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    payload = json.loads(path.read_text())
    del payload["config"]["rectangular"]  # as written by rankwise before the option existed
    path.write_text(json.dumps(payload))
    loaded = rankwise.load(copy.deepcopy(net), tmp_path)
    assert rankwise.adapter_config(loaded).rectangular == "tile"
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert SURMConfig.from_dict({"structure": "kronecker"}).rectangular == "error"


def test_rectangular_native_and_tile_on_minilm_shapes():
    shapes = [(384, 384), (1536, 384), (384, 1536)]  # (out, in)
    net = nn.Sequential(*(nn.Linear(i, o) for o, i in shapes))
    native = rankwise.adapt(copy.deepcopy(net), SURMConfig(rectangular="native"))
    assert [layer.adapter.surm_a.shape for _, layer in rankwise.adapted_layers(native)] == [(1, 1, 384), (1536,), (384,)]
    assert rankwise.trainable_parameters(native) == 2 * (384 + 1536 + 384)
    toeplitz = rankwise.adapt(copy.deepcopy(net), SURMConfig(structure="toeplitz", rectangular="native"))
    assert rankwise.trainable_parameters(toeplitz) == 2 * 384 + 2 * (1536 + 384 - 1)
    tiled = rankwise.adapt(copy.deepcopy(net), SURMConfig(rectangular="tile"))
    assert [layer.adapter.surm_a.shape for _, layer in rankwise.adapted_layers(tiled)] == [
        (1, 1, 384), (4, 1, 384), (1, 4, 384)]
    assert rankwise.trainable_parameters(tiled) == 2 * (384 + 1536 + 1536)


def test_warns_when_the_adapter_outgrows_the_dense_update():
    with pytest.warns(UserWarning, match=r"'0' \(64×63, circulant g=1\) has 8,064 trainable parameters, more than "
                                         r"the 4,032 of a dense update"):
        rankwise.adapt(nn.Sequential(nn.Linear(63, 64)), SURMConfig(rectangular="tile"))  # coprime: g = 1
    with pytest.warns(UserWarning, match=r"'0' \(8×8, ldr g=8\) has 80 trainable parameters, more than the 64"):
        rankwise.adapt(nn.Sequential(nn.Linear(8, 8)), SURMConfig(structure="ldr", displacement_rank=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankwise.adapt(nn.Sequential(nn.Linear(63, 64)), SURMConfig(rectangular="native"))  # 128 parameters
        rankwise.adapt(nn.Sequential(nn.Linear(8, 8)), SURMConfig(structure="ldr", displacement_rank=4))  # 64


def test_config_and_fit_errors():
    with pytest.raises(ValueError, match=r"'0'.*block_size=5 does not divide both widths 12 and 8"):
        rankwise.adapt(nn.Sequential(nn.Linear(8, 12)), SURMConfig(block_size=5))
    with pytest.raises(ValueError, match=r"'0'.*kronecker r=3 does not divide"):
        rankwise.adapt(nn.Sequential(nn.Linear(8, 12)), SURMConfig(structure="kronecker", r=3))
    for bad, message in [
        ({"structure": "monarch"}, "structure"),
        ({"rectangular": "pad"}, "rectangular must be one of"),
        ({"rectangular": "native", "block_size": 4}, "drop block_size, or use rectangular='tile'"),
        ({"structure": "ldr", "rectangular": "native"}, "no rectangular LDR"),
        ({"structure": "kronecker", "rectangular": "tile"}, "rectangular by construction"),
    ]:
        with pytest.raises(ValueError, match=message):
            SURMConfig(**bad)
