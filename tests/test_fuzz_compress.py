"""Property-based fuzzing of the compression entry points over options × layer shapes (hypothesis).

Covered: ``rankwise.compress`` (svd / whitened, uniform / global / sensitivity allocation, ratio /
energy / ranks, sequential, force) on Linear and transformers Conv1D layers, the functions of
``rankwise.compress.decompositions``, ``factorize_layer`` (Linear, Conv2d under both schemes) and
TRP / Cuttlefish on user-named targets. Each drawn case must either raise ``ValueError`` or give
finite results that keep the entry point's own guarantee (Eckart–Young for the truncated SVDs, the
Van Loan–Pitsianis error for Kronecker, exactness at full rank, a non-increasing ALS objective).
Any other exception type fails the test.

Profile ``rankwise-fuzz`` (tests/conftest.py); ``RANKWISE_FUZZ_EXAMPLES=500`` for a larger run.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise
from rankwise.compress import (
    TRP,
    Cuttlefish,
    CuttlefishConfig,
    FactorizedLinear,
    TRPConfig,
    als_low_rank,
    compression_report,
    decompress,
    factorize_layer,
    hadamard_decomposition,
    khatri_rao,
    khatri_rao_decomposition,
    kronecker_decomposition,
    load_compressed,
    save_compressed,
)
from rankwise.compress.lowrank_conv import matricize, rank_cap
from rankwise.core.layer import weight_matrix

FUZZ = settings.get_profile("rankwise-fuzz")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
WIDTH = st.integers(1, 20)
FLOAT_DTYPES = st.sampled_from(["float32", "float64"] * 3 + ["bfloat16"])  # bfloat16: refused or coarse
ZEROS = st.sampled_from(["none"] * 4 + ["rows", "cols", "all", "rank1"])


def matrix(m: int, n: int, zeros: str, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded m×n matrix with zero rows / columns, all zeros, or rank one."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if zeros == "rows":
        a[torch.randperm(m, generator=generator)[: max(1, m // 2)]] = 0
    elif zeros == "cols":
        a[:, torch.randperm(n, generator=generator)[: max(1, n // 2)]] = 0
    elif zeros == "all":
        a.zero_()
    elif zeros == "rank1":
        a = a[:, :1] @ a[:1, :]
    return a.to(dtype)


def refusal(error: ValueError) -> str:
    """The statistics label of a refused case: its message up to the first number or list."""
    return "refused: " + re.split(r"[\d\[(]", str(error))[0][:60]


def tail_error(weight: torch.Tensor, rank: int) -> float:
    """Σ_{i>r} σ_i² of ``weight`` (Eckart–Young's optimum), in float64."""
    return float(torch.linalg.svdvals(weight.double())[rank:].square().sum())


# ----------------------------------------------------------------------------------------------
# rankwise.compress
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Net:
    widths: tuple[int, int, int]  # in -> hidden -> out
    conv1d: bool
    bias: bool
    dtype: str
    zeros: str
    seed: int


NETS = st.builds(Net, widths=st.tuples(WIDTH, WIDTH, WIDTH), conv1d=st.booleans(), bias=st.booleans(),
                 dtype=FLOAT_DTYPES, zeros=ZEROS, seed=st.integers(0, 2**16))


class TwoLayers(nn.Module):
    """x -> first -> tanh -> second, called with a dict batch like a transformers model."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        n_in, hidden, n_out = net.widths
        self.first = self._layer(hidden, n_in, net, net.seed)
        self.second = self._layer(n_out, hidden, net, net.seed + 1)

    @staticmethod
    def _layer(m: int, n: int, net: Net, seed: int) -> nn.Module:
        weight = matrix(m, n, net.zeros, seed) / n**0.5
        layer = Conv1D(m, n) if net.conv1d else nn.Linear(n, m, bias=net.bias)
        with torch.no_grad():
            layer.weight.copy_(weight.T if net.conv1d else weight)
            if layer.bias is not None:
                layer.bias.copy_(torch.linspace(-1, 1, m) if net.bias else torch.zeros(m))
        return layer

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def calibration(net: Net, shape: tuple[int, int] = (3, 4), masked: bool = False,
                batches: int = 2) -> list[dict[str, torch.Tensor]]:
    """Batches of ``shape`` (sequences, tokens), with a random padding mask when ``masked``."""
    generator = torch.Generator().manual_seed(net.seed + 7)
    out = []
    for _ in range(batches):
        batch = {"x": torch.randn(*shape, net.widths[0], generator=generator).to(DTYPES[net.dtype])}
        if masked:
            batch["attention_mask"] = torch.randint(0, 2, shape, generator=generator)
        out.append(batch)
    return out


COMPRESS_OPTIONS = st.fixed_dictionaries({
    "method": st.sampled_from(["svd", "whitened"]),
    "allocation": st.sampled_from(["uniform", "uniform", "global", "sensitivity"]),
    "budget": st.sampled_from(["ratio", "default", "ratio", "energy", "ranks"]),
    "ratio": st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]),
    "energy": st.sampled_from([0.5, 0.9, 0.999, 1.0]),
    "rank": st.integers(1, 6),
    "sequential": st.sampled_from([False, False, True]),
    "force": st.booleans(),
    "calibration": st.sampled_from([(3, 4), (3, 4), (1, 1), (2, 0)]),
    "masked": st.booleans(),
    "both_ranks": st.booleans(),
})


def compress_kwargs(options: dict[str, Any], net: Net) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"method": options["method"], "allocation": options["allocation"],
                              "sequential": options["sequential"], "force": options["force"]}
    if options["budget"] == "ratio":
        kwargs["ratio"] = options["ratio"]
    elif options["budget"] == "energy":
        kwargs["energy"] = options["energy"]
    elif options["budget"] == "ranks":
        kwargs["ranks"] = {"first": options["rank"], **({"second": options["rank"]} if options["both_ranks"] else {})}
    if options["method"] == "whitened" or options["allocation"] == "sensitivity":
        kwargs["calibration"] = calibration(net, options["calibration"], options["masked"])
    return kwargs


def check_compress(options: dict[str, Any], net: Net) -> None:
    model = TwoLayers(net).to(DTYPES[net.dtype]).eval()
    original = copy.deepcopy(model)
    x = calibration(net, batches=1)[0]["x"]
    kwargs = compress_kwargs(options, net)
    try:
        rankwise.compress(model, **kwargs)
    except ValueError as error:
        event(refusal(error))
        return
    event(f"compressed, {sum(row.rank is not None for row in compression_report(model).layers)} of 2 factorised")
    report = compression_report(model)
    assert [row.name for row in report.layers] == ["first", "second"]
    for row in report.layers:
        module = model.get_submodule(row.name)
        dense = weight_matrix(original.get_submodule(row.name)).detach()
        if row.rank is None:
            assert module is not None and not isinstance(module, FactorizedLinear)
            continue
        assert isinstance(module, FactorizedLinear) and module.rank == row.rank
        assert 1 <= row.rank <= min(dense.shape)
        if not options["force"]:
            assert row.rank < dense.shape[0] * dense.shape[1] / sum(dense.shape)
        product = module.dense_weight().detach()
        assert product.dtype == dense.dtype
        if options["method"] == "svd" and net.dtype != "bfloat16":
            # LoRD is the truncated SVD: its error is Eckart–Young's optimum.
            error = float((product.double() - dense.double()).square().sum())
            optimum = tail_error(dense, row.rank)
            eps = 1e-5 if net.dtype == "float32" else 1e-12
            assert abs(error - optimum) <= eps * (1 + float(dense.double().square().sum()))
    assert report.params_after == sum(row.params_after for row in report.layers)
    if options["budget"] in ("ratio", "default"):  # a ratio is met or refused, never silently exceeded
        ratio = options["ratio"] if options["budget"] == "ratio" else 0.5
        assert report.params_after <= ratio * report.params_before * (1 + 1e-9)
    with torch.no_grad():
        out = model(x)
        assert out.shape == original(x).shape and out.dtype == DTYPES[net.dtype]
        assert torch.isfinite(out).all()
    if report.skipped != report.layers:  # save -> load onto a fresh base model gives the same function
        with tempfile.TemporaryDirectory() as directory:
            save_compressed(model, directory)
            restored = load_compressed(TwoLayers(net).to(DTYPES[net.dtype]).eval(), directory)
        with torch.no_grad():
            torch.testing.assert_close(restored(x), out, atol=0, rtol=0)
    with torch.no_grad():
        # decompress keeps each layer's function: in float64, within the rounding bound of the
        # factored product, whatever the factors' norms (whitening can make them large).
        for module in model.modules():
            if isinstance(module, FactorizedLinear):
                wide = copy.deepcopy(module).double()
                z = torch.randn(3, wide.in_features, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
                size = z.abs() @ (wide.up.weight.abs() @ wide.down.weight.abs()).T + 1
                assert ((wide.to_linear()(z) - wide(z)).abs() <= 1e-13 * wide.in_features * size).all()
        assert torch.isfinite(decompress(model)(x)).all()
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


@FUZZ
@given(options=COMPRESS_OPTIONS, net=NETS)
def test_fuzz_compress(options: dict[str, Any], net: Net) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check_compress(options, net)


# ----------------------------------------------------------------------------------------------
# rankwise.compress.decompositions
# ----------------------------------------------------------------------------------------------

MATRICES = st.builds(lambda m, n, zeros, seed, dtype: matrix(m, n, zeros, seed, DTYPES[dtype]),
                     WIDTH, WIDTH, ZEROS, st.integers(0, 2**16), FLOAT_DTYPES)


@FUZZ
@given(a=MATRICES, ridge=st.sampled_from([0.0, 0.1]), masked=st.booleans(), init=st.sampled_from(["svd", "random"]),
       data=st.data())
def test_fuzz_als(a: torch.Tensor, ridge: float, masked: bool, init: str, data: st.DataObject) -> None:
    rank = data.draw(around_ranks(min(a.shape) - 1), label="rank")
    mask = None
    if masked:
        keep = data.draw(st.lists(st.booleans(), min_size=a.numel(), max_size=a.numel()), label="mask")
        mask = torch.tensor(keep).reshape(a.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the documented jitter warning
        try:
            w, z, info = als_low_rank(a, rank, ridge=ridge, mask=mask, max_iter=20, init=init)
        except ValueError as error:
            event(refusal(error))
            return
    assert w.shape == (a.shape[0], rank) and z.shape == (rank, a.shape[1]) and w.dtype == a.dtype
    assert torch.isfinite(w).all() and torch.isfinite(z).all()
    history = torch.tensor(info.history)
    assert torch.isfinite(history).all() and 0 <= info.residual < float("inf")
    # The objective never increases (each half-step is an exact minimiser), up to rounding.
    assert (history[1:] <= history[:-1] * (1 + 1e-9) + 1e-9 * (1 + float(history[0]))).all(), info.history
    if mask is None and ridge == 0.0 and info.converged:
        optimum = tail_error(a, rank)
        assert float(info.history[-1]) <= optimum + 1e-4 * (1 + float(a.double().square().sum()))


@FUZZ
@given(a=MATRICES, restarts=st.integers(1, 2), data=st.data())
def test_fuzz_hadamard(a: torch.Tensor, restarts: int, data: st.DataObject) -> None:
    largest = min(3, min(a.shape) - 1)
    ranks = data.draw(st.tuples(around_ranks(largest), around_ranks(largest)), label="ranks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            c1, d1, c2, d2, info = hadamard_decomposition(a, ranks, max_iter=8, restarts=restarts)
        except ValueError as error:
            event(refusal(error))
            return
    m, n = a.shape
    assert [t.shape for t in (c1, d1, c2, d2)] == [(m, ranks[0]), (ranks[0], n), (m, ranks[1]), (ranks[1], n)]
    assert all(torch.isfinite(t).all() for t in (c1, d1, c2, d2))
    assert torch.isfinite(torch.tensor(info.history)).all() and info.residual < float("inf")


def around_ranks(largest: int) -> st.SearchStrategy[int]:
    """Mostly a valid rank in [1, largest]; one case in six (or when none is valid) 0 or largest + 1."""
    invalid = st.sampled_from([0, largest + 1])
    if largest < 1:
        return invalid
    return st.sampled_from([True] * 5 + [False]).flatmap(lambda ok: st.integers(1, largest) if ok else invalid)


def factor_pairs(size: int) -> st.SearchStrategy[tuple[int, int]]:
    """(p, q) with p·q = size, or an arbitrary pair that usually is not."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    return st.sampled_from([(d, size // d) for d in divisors] * 4 + [(0, size), (2, size + 1)])


@FUZZ
@given(a=MATRICES, data=st.data())
def test_fuzz_kronecker(a: torch.Tensor, data: st.DataObject) -> None:
    m, n = a.shape
    (m1, m2), (n1, n2) = data.draw(factor_pairs(m), label="rows"), data.draw(factor_pairs(n), label="cols")
    terms = data.draw(around_ranks(min(m1 * n1, m2 * n2)), label="terms")
    try:
        b, c = kronecker_decomposition(a, (m1, n1), (m2, n2), terms)
    except ValueError as error:
        event(refusal(error))
        return
    assert b.shape == (terms, m1, n1) and c.shape == (terms, m2, n2) and b.dtype == a.dtype
    approx = sum(torch.kron(bk.double(), ck.double()) for bk, ck in zip(b, c))
    rearranged = a.double().reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    error = float((a.double() - approx).square().sum())
    eps = {torch.float32: 1e-5, torch.float64: 1e-12}[a.dtype]
    assert abs(error - tail_error(rearranged, terms)) <= eps * (1 + float(a.double().square().sum()))


@FUZZ
@given(a=MATRICES, data=st.data())
def test_fuzz_khatri_rao(a: torch.Tensor, data: st.DataObject) -> None:
    p, q = data.draw(factor_pairs(a.shape[0]), label="rows")
    try:
        b, c = khatri_rao_decomposition(a, (p, q))
    except ValueError as error:
        event(refusal(error))
        return
    n = a.shape[1]
    assert b.shape == (p, n) and c.shape == (q, n) and b.dtype == a.dtype
    assert torch.isfinite(b).all() and torch.isfinite(c).all()
    # Column by column the best rank-1 fit of the P×Q reshape, whose error is the spectral tail.
    error = (a.double() - khatri_rao(b.double(), c.double())).square().sum(0)
    tails = torch.stack([torch.linalg.svdvals(col.reshape(p, q))[1:].square().sum() for col in a.double().T])
    eps = {torch.float32: 1e-5, torch.float64: 1e-12}[a.dtype]
    assert ((error - tails).abs() <= eps * (1 + a.double().square().sum(0))).all()


# ----------------------------------------------------------------------------------------------
# factorize_layer, TRP and Cuttlefish on user-given layers and ranks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: int
    bias: bool
    dtype: str
    seed: int


LAYER_SPECS = st.one_of(
    st.tuples(WIDTH, WIDTH, st.booleans(), st.sampled_from(["float32", "float64"]), st.integers(0, 2**16)),
    st.builds(ConvSpec, out_channels=st.integers(1, 8), in_channels=st.integers(1, 6),
              kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.integers(1, 2),
              padding=st.integers(0, 1), bias=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
              seed=st.integers(0, 2**16)),
)


def build_layer(spec: tuple | ConvSpec) -> nn.Module:
    if isinstance(spec, ConvSpec):
        torch.manual_seed(spec.seed)
        layer = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding, bias=spec.bias)
        return layer.to(DTYPES[spec.dtype])
    m, n, bias, dtype, seed = spec
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=bias).to(DTYPES[dtype])


def layer_input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    shape = (2, layer.in_channels, 5, 6) if isinstance(layer, nn.Conv2d) else (2, 3, layer.in_features)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(layer.weight.dtype)


@FUZZ
@given(spec=LAYER_SPECS, scheme=st.sampled_from(["channel", "spatial"] * 3 + ["rows"]), data=st.data())
def test_fuzz_factorize_layer(spec: tuple | ConvSpec, scheme: str, data: st.DataObject) -> None:
    layer = build_layer(spec)
    rank = data.draw(around_ranks(rank_cap(layer.weight.shape, scheme if scheme != "rows" else "channel")), label="rank")
    try:
        pair = factorize_layer("layer", layer, rank, scheme)  # type: ignore[arg-type]
    except ValueError as error:
        event(refusal(error))
        return
    x = layer_input(layer)
    with torch.no_grad():
        out, approx = layer(x), pair(x)
    assert approx.shape == out.shape and torch.isfinite(approx).all()
    dense = matricize(layer.weight.detach(), scheme)  # type: ignore[arg-type]
    with torch.no_grad():
        got = pair.dense_weight() if isinstance(pair, FactorizedLinear) else matricize(pair.dense_weight(), scheme)  # type: ignore[arg-type]
    error = float((got.double() - dense.double()).square().sum())
    eps = 1e-5 if layer.weight.dtype == torch.float32 else 1e-12
    assert abs(error - tail_error(dense, rank)) <= eps * (1 + float(dense.double().square().sum()))
    if rank == rank_cap(layer.weight.shape, scheme):  # type: ignore[arg-type]
        torch.testing.assert_close(approx, out, atol=100 * eps * (1 + float(out.abs().max())), rtol=0)


class Stack(nn.Module):
    """Linear -> tanh -> Linear -> tanh -> Linear (the last is the classifier the default rules skip)."""

    def __init__(self, widths: tuple[int, int, int, int], zero_middle: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(widths[0], widths[1])
        self.b = nn.Linear(widths[1], widths[2])
        self.c = nn.Linear(widths[2], widths[3])
        if zero_middle:
            with torch.no_grad():
                self.b.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


STACKS = st.builds(Stack, st.tuples(WIDTH, WIDTH, WIDTH, WIDTH), st.sampled_from([False] * 4 + [True]),
                   st.integers(0, 2**16))
TARGETS = st.none() | st.lists(st.sampled_from(["a", "b", "c"] * 3 + ["missing", ""]), min_size=1, max_size=3)


@FUZZ
@given(model=STACKS, targets=TARGETS, energy=st.sampled_from([0.5, 0.9, 1.0] * 3 + [0.0, 1.5]),
       final_energy=st.sampled_from([None, 0.5, 0.99]), threshold=st.sampled_from([0.0, 0.05, 10.0]),
       scheme=st.sampled_from(["channel", "spatial"]))
def test_fuzz_trp(model: Stack, targets: list[str] | None, energy: float, final_energy: float | None,
                  threshold: float, scheme: str) -> None:
    try:
        trp = TRP(model, TRPConfig(energy=energy, final_energy=final_energy, final_threshold=threshold,
                                   targets=targets, include_linear=True, scheme=scheme))
    except ValueError as error:
        event(refusal(error))
        return
    x = torch.randn(4, model.a.in_features, generator=torch.Generator().manual_seed(0))
    assert trp.before_forward(0)
    loss = model(x).square().mean()
    loss.backward()
    trp.before_optimizer_step()
    for layer in trp.layers.values():
        assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.weight.grad).all()
    report = trp.factorize()
    assert set(report) == set(trp.layers)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@FUZZ
@given(model=STACKS, targets=TARGETS, floor=st.sampled_from([0.0, 0.2, 1.0]),
       metric=st.sampled_from(["scaled", "vanilla"]), prefix=st.sampled_from([0, 1, 0, 1, 3]))
def test_fuzz_cuttlefish(model: Stack, targets: list[str] | None, floor: float, metric: str, prefix: int) -> None:
    config = CuttlefishConfig(window=1, points=1, rank_floor=floor, rank_metric=metric, dense_prefix=prefix,
                              targets=targets, max_warmup_points=2)
    try:
        cuttlefish = Cuttlefish(model, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the forced switch
            while not cuttlefish.observe():
                pass
        caps = {name: min(layer.weight.shape) for name, layer in cuttlefish.layers.items()}
        report = cuttlefish.switch()
    except ValueError as error:
        event(refusal(error))
        return
    for name, row in report.items():
        assert 1 <= row["rank"] <= caps[name]
        assert isinstance(model.get_submodule(name), FactorizedLinear) == row["factorized"]
    x = torch.randn(4, model.a.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert torch.isfinite(cuttlefish.penalty())
