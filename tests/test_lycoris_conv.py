"""LoHa and LoKr on nn.Conv1d / nn.Conv2d against Hugging Face PEFT 0.21.2 (``loha.Conv1d/2d``, ``lokr.Conv1d/2d``).

Same tensors in (PEFT's random adapter tensors copied into ours): outputs, gradients of every adapter tensor and
of the inputs, ΔW and merged weights, unmerge, seeded init (same seed, same tensors), training forwards with rank
and module dropout under a shared seed, adapter files both ways; kernel 1 and 3, stride, padding, dilation, groups,
bias and no bias, with and without ``use_effective_conv2d`` (Tucker cores). Independently of PEFT: ΔW against the
formulas written here with einsum, and the places where PEFT is wrong (LoHa's Tucker backward, a padding mode other
than zeros, LoKr's Tucker core on a (k, 1) kernel), which rankwise computes correctly and refuses to exchange.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model

import rankwise
from rankwise.adapters.loha import LoHaConvAdapter
from rankwise.adapters.lokr import LoKrConvAdapter

TOL = {"atol": 1e-5, "rtol": 1e-5}
PEFT_CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig}
NAMES = {"loha": "LoHa", "lokr": "LoKr"}
ALL = ["seq", "point", "img", "rect", "flat", "grp", "wide"]


class Net(nn.Module):
    """Conv1d (kernel 3, strided, padded, dilated; kernel 1 without bias) on a sequence and Conv2d (3x3 strided
    without bias; (3, 2) dilated; 1x1; grouped with padding='same'; a wide 3x3) on an image."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.seq = nn.Conv1d(6, 8, 3, stride=2, padding=2, dilation=2, padding_mode=padding_mode)
        self.point = nn.Conv1d(6, 4, 1, bias=False)
        self.img = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.rect = nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(2, 1))
        self.flat = nn.Conv2d(4, 6, 1)
        self.grp = nn.Conv2d(4, 8, 3, groups=2, padding="same")
        self.wide = nn.Conv2d(4, 32, 3, padding=1)

    def forward(self, sequence: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        outs = [self.seq(sequence), self.point(sequence)]
        outs += [layer(image) for layer in (self.img, self.rect, self.flat, self.grp, self.wide)]
        return torch.cat([torch.tanh(out).flatten(1) for out in outs], dim=1)


def base_net(padding_mode: str = "zeros") -> Net:
    torch.manual_seed(0)
    return Net(padding_mode)


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, 11, generator=generator), torch.randn(batch, 4, 7, 6, generator=generator)


def peft_layer(theirs: nn.Module, name: str) -> nn.Module:
    return theirs.base_model.model.get_submodule(name)


def peft_tensor(theirs: nn.Module, name: str, tensor: str) -> torch.Tensor:
    return getattr(peft_layer(theirs, name), tensor)["default"]


# (method, options, targets): every tensor layout of both methods; LoKr's Tucker core leaves out the Conv1d layer
# with a low-rank W2, where PEFT's forward raises (test_lokr_tucker_on_a_k_by_1_kernel_...).
CASES = {
    "loha-flattened": ("loha", {"r": 2}, ALL),
    "loha-tucker": ("loha", {"r": 2, "use_effective_conv2d": True}, ALL),
    "lokr-low-rank-w2": ("lokr", {"r": 1}, ALL),
    "lokr-full-w2": ("lokr", {"r": 8}, ALL),
    "lokr-decompose-both": ("lokr", {"r": 1, "decompose_both": True}, ALL),
    "lokr-tucker": ("lokr", {"r": 1, "use_effective_conv2d": True}, [t for t in ALL if t != "seq"]),
    "lokr-tucker-full-w2": ("lokr", {"r": 8, "use_effective_conv2d": True}, ALL),
    "lokr-factor-2": ("lokr", {"r": 1, "decompose_factor": 2}, ALL),
}


def pair(method: str, targets: list[str], base: nn.Module | None = None, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """PEFT's adapter and ours on copies of one base, built under the same seed, ours holding PEFT's tensors."""
    base = base_net() if base is None else base
    kwargs = {"alpha": 3.0, "init_weights": False, **kwargs}
    torch.manual_seed(7)
    theirs = get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method](target_modules=targets, **kwargs))
    torch.manual_seed(7)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(method, targets=targets, **kwargs))
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            for tensor, parameter in layer.adapter.named_parameters():
                parameter.copy_(peft_tensor(theirs, name, tensor))
    return ours, theirs


def wrong_peft_gradient(method: str, kwargs: dict[str, Any], layer: nn.Module, tensor: str) -> bool:
    """PEFT's LoHa Tucker backward (HadaWeightCP) returns wrong gradients for hada_w1_a and hada_w2_a."""
    return method == "loha" and isinstance(layer.adapter, LoHaConvAdapter) and layer.adapter.tucker and tensor in (
        "hada_w1_a", "hada_w2_a")


# ----------------------------------------------------------------------------------------------
# The oracle: PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_merge_equal_peft(case):
    method, kwargs, targets = CASES[case]
    ours, theirs = pair(method, targets, **kwargs)
    assert {type(layer.adapter) for _, layer in rankwise.adapted_layers(ours)} == {
        LoHaConvAdapter if method == "loha" else LoKrConvAdapter}
    sequence, image = inputs()
    ours_in = [t.clone().requires_grad_() for t in (sequence, image)]
    theirs_in = [t.clone().requires_grad_() for t in (sequence, image)]
    out_ours, out_theirs = ours(*ours_in), theirs(*theirs_in)
    with torch.no_grad(), theirs.disable_adapter():
        base_out = theirs(sequence, image)
    for name in targets:  # every adapted layer changes its output
        columns = _columns(name)
        assert not torch.allclose(base_out[:, columns], out_theirs[:, columns], atol=1e-3), name
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for mine, peft_input in zip(ours_in, theirs_in):
        torch.testing.assert_close(mine.grad, peft_input.grad, **TOL)
    for name, layer in rankwise.adapted_layers(ours):
        for tensor, parameter in layer.adapter.named_parameters():
            if not wrong_peft_gradient(method, kwargs, layer, tensor):
                torch.testing.assert_close(parameter.grad, peft_tensor(theirs, name, tensor).grad, **TOL,
                                           msg=f"{name}.{tensor}")
    with torch.no_grad():
        for name, layer in rankwise.adapted_layers(ours):
            expected = peft_layer(theirs, name).get_delta_weight("default")
            torch.testing.assert_close(layer.adapter.delta_weight(), expected.flatten(1), **TOL)
        before = {name: layer.base_layer.weight.clone() for name, layer in rankwise.adapted_layers(ours)}
        rankwise.merge(ours)
        theirs.merge_adapter()
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.base_layer.weight, peft_layer(theirs, name).base_layer.weight, **TOL)
        torch.testing.assert_close(ours(sequence, image), out_theirs, **TOL)
        rankwise.unmerge(ours)
        for name, layer in rankwise.adapted_layers(ours):
            torch.testing.assert_close(layer.base_layer.weight, before[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours(sequence, image), out_theirs, **TOL)


def _columns(name: str) -> slice:
    """The columns of Net's output that layer ``name`` writes (for inputs())."""
    sizes = dict(zip(ALL, (8 * 4, 4 * 11, 8 * 4 * 3, 6 * 7 * 5, 6 * 7 * 6, 8 * 7 * 6, 32 * 7 * 6)))
    start = sum(sizes[n] for n in ALL[:ALL.index(name)])
    return slice(start, start + sizes[name])


def test_tensor_layouts_are_peft_s():
    """The shapes PEFT stores: flattened kernel matrices, Tucker cores (a Conv1d's as (r, r, k, 1)), a full lokr_w2
    with the kernel's dimensions; kernel size 1 ignores use_effective_conv2d."""
    shapes = {}
    for case in ("loha-tucker", "lokr-tucker", "lokr-full-w2"):
        method, kwargs, targets = CASES[case]
        ours = rankwise.adapt(base_net(), rankwise.config(method, targets=targets, **kwargs))
        shapes[case] = {f"{name}.{tensor}": tuple(p.shape) for name, layer in rankwise.adapted_layers(ours)
                        for tensor, p in layer.adapter.named_parameters()}
    assert shapes["loha-tucker"]["seq.hada_t1"] == (2, 2, 3, 1) and shapes["loha-tucker"]["seq.hada_w1_a"] == (2, 8)
    assert shapes["loha-tucker"]["grp.hada_w2_b"] == (2, 2) and shapes["loha-tucker"]["rect.hada_t2"] == (2, 2, 3, 2)
    assert shapes["loha-tucker"]["flat.hada_w1_b"] == (2, 4) and "flat.hada_t1" not in shapes["loha-tucker"]
    assert shapes["loha-tucker"]["point.hada_w1_a"] == (4, 2) and "point.hada_t1" not in shapes["loha-tucker"]
    assert shapes["lokr-tucker"]["img.lokr_t2"] == (1, 1, 3, 3) and shapes["lokr-tucker"]["img.lokr_w2_a"] == (1, 4)
    assert shapes["lokr-tucker"]["flat.lokr_w2_b"] == (1, 2) and "flat.lokr_t2" not in shapes["lokr-tucker"]
    assert shapes["lokr-full-w2"]["seq.lokr_w2"] == (4, 3, 3) and shapes["lokr-full-w2"]["img.lokr_w2"] == (4, 2, 3, 3)


@pytest.mark.parametrize("method, init_weights", [("loha", True), ("loha", False), ("lokr", True), ("lokr", False),
                                                  ("lokr", "lycoris")])
@pytest.mark.parametrize("tucker", [False, True], ids=["flattened", "tucker"])
def test_seeded_init_equals_peft(method, init_weights, tucker):
    """Same seed, same tensors, bit for bit: PEFT's shapes, distributions and draw order (cores last)."""
    kwargs = {"r": 1 if method == "lokr" else 2, "use_effective_conv2d": tucker, "init_weights": init_weights}
    targets = [t for t in ALL if not (method == "lokr" and tucker and t == "seq")]
    base = base_net()
    torch.manual_seed(11)
    theirs = get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method](target_modules=targets, **kwargs))
    torch.manual_seed(11)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config(method, targets=targets, **kwargs))
    for name, layer in rankwise.adapted_layers(ours):
        names = {tensor for tensor, _ in layer.adapter.named_parameters()}
        assert names == {t for t in peft_layer(theirs, name).adapter_layer_names
                         if "default" in getattr(peft_layer(theirs, name), t)}, name
        for tensor, parameter in layer.adapter.named_parameters():
            torch.testing.assert_close(parameter, peft_tensor(theirs, name, tensor), atol=0, rtol=0)
        assert sum(p.numel() for p in layer.adapter.parameters()) == type(layer.adapter).expected_conv_params(
            layer.base_layer, rankwise.adapter_config(ours))
    if init_weights is not False:  # the update starts at zero
        sequence, image = inputs()
        with torch.no_grad(), rankwise.disable_adapters(ours):
            plain = ours(sequence, image)
        torch.testing.assert_close(ours(sequence, image), plain, atol=0, rtol=0)


@pytest.mark.parametrize("case, options", [
    ("loha-flattened", {"rank_dropout": 0.5}),
    ("loha-tucker", {"rank_dropout": 0.5, "module_dropout": 0.3}),
    ("lokr-low-rank-w2", {"rank_dropout": 0.5}),
    ("lokr-full-w2", {"rank_dropout": 0.5, "rank_dropout_scale": True, "module_dropout": 0.3}),
])
def test_dropouts_equal_peft_under_the_same_seed(case, options):
    """PEFT's module-dropout draw, then its mask over the output channels of ΔW (rescaled as PEFT does): the same
    training outputs and gradients seed by seed; the masks change the output; eval has no dropout. Seeds where a
    layer drops every channel are skipped (PEFT's LoHa divides by a zero mean there: NaN, see test_loha.py)."""
    method, kwargs, targets = CASES[case]
    ours, theirs = pair(method, targets, **kwargs, **options)
    sequence, image = inputs()
    with torch.no_grad():
        plain = ours.eval()(sequence, image)
        torch.testing.assert_close(plain, theirs.eval()(sequence, image), **TOL)
    ours.train()
    theirs.train()
    changed = compared = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out_ours = ours(sequence, image)
        torch.manual_seed(seed)
        out_theirs = theirs(sequence, image)
        if out_theirs.isnan().any():
            continue
        compared += 1
        torch.testing.assert_close(out_ours, out_theirs, **TOL, msg=f"seed {seed}")
        changed += not torch.allclose(out_ours, plain, atol=1e-4)
        ours.zero_grad()
        theirs.zero_grad()
        out_ours.square().sum().backward()
        out_theirs.square().sum().backward()
        for name, layer in rankwise.adapted_layers(ours):
            for tensor, parameter in layer.adapter.named_parameters():
                expected = peft_tensor(theirs, name, tensor).grad
                if expected is None:
                    assert parameter.grad is None, f"{name}.{tensor}"
                elif not wrong_peft_gradient(method, kwargs, layer, tensor):
                    torch.testing.assert_close(parameter.grad, expected, **TOL, msg=f"seed {seed}: {name}.{tensor}")
    assert changed == compared >= 4


def test_rank_dropout_masks_whole_output_channels():
    """One mask entry per output channel: a dropped channel is the base's, the kept ones are rescaled by 1/mean."""
    ours, _ = pair("loha", ["img"], r=2, rank_dropout=0.5)
    layer = ours.img
    image = inputs()[1]
    with torch.no_grad():
        base = layer.base_layer(image)
        full = layer.eval()(image) - base
        layer.train()
        torch.manual_seed(3)
        torch.rand(1)  # module dropout's draw
        keep = (torch.rand(8) > 0.5).float()
        torch.manual_seed(3)
        dropped = layer(image) - base
    assert 0 < keep.sum() < 8
    torch.testing.assert_close(dropped, full * (keep / keep.mean())[None, :, None, None], **TOL)


@pytest.mark.parametrize("case", ["loha-tucker", "lokr-tucker", "lokr-full-w2", "loha-flattened"])
def test_peft_files_both_ways(case, tmp_path):
    method, kwargs, targets = CASES[case]
    ours, theirs = pair(method, targets, **kwargs, rank_dropout=0.1, module_dropout=0.2)
    sequence, image = inputs()
    with torch.no_grad():
        expected = theirs.eval()(sequence, image)
        rankwise.export_peft(ours, tmp_path / "ours")
        written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert written["peft_type"] == method.upper()
        assert written["use_effective_conv2d"] is kwargs.get("use_effective_conv2d", False)
        reloaded = PeftModel.from_pretrained(base_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(reloaded(sequence, image), expected, **TOL)
        theirs.save_pretrained(tmp_path / "theirs")
        imported = rankwise.import_peft(base_net(), tmp_path / "theirs").eval()
        torch.testing.assert_close(imported(sequence, image), expected, **TOL)
        config = rankwise.adapter_config(imported)
        assert config.use_effective_conv2d is kwargs.get("use_effective_conv2d", False)
        rankwise.save(imported, tmp_path / "rankwise")
        loaded = rankwise.load(base_net(), tmp_path / "rankwise").eval()
        torch.testing.assert_close(loaded(sequence, image), imported(sequence, image), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# The formulas, independently of PEFT
# ----------------------------------------------------------------------------------------------


def tucker(core: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Σ_ab core[a, b, ...] rows[a, o] columns[b, i] -> (o, i, ...)."""
    return torch.tensordot(torch.tensordot(core, rows, dims=([0], [0])), columns, dims=([0], [0])).movedim(
        (-2, -1), (0, 1))


def kron_kernel(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """ΔW[(i, j), (p, q), ...] = w1[i, p] · w2[j, q, ...]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    return (w1[:, None, :, None].reshape(a, 1, c, 1, *[1] * (w2.dim() - 2)) * w2[None, :, None]).reshape(
        a * b, c * d, *w2.shape[2:])


def test_loha_tucker_update_and_gradients_are_the_formula_where_peft_s_backward_is_wrong():
    """ΔW = s·(T1 ×₁ W1aᵀ ×₂ W1bᵀ) ⊙ (T2 ×₁ W2aᵀ ×₂ W2bᵀ); the gradients are autograd's of that formula. PEFT's
    forward equals it, but its hand-written backward (HadaWeightCP) gets hada_w1_a and hada_w2_a wrong."""
    ours, theirs = pair("loha", ["img", "seq"], r=2, use_effective_conv2d=True)
    sequence, image = inputs()
    for name, x in (("img", image), ("seq", sequence)):
        layer = getattr(ours, name)
        adapter = layer.adapter
        tensors = {t: p.detach().clone().requires_grad_() for t, p in adapter.named_parameters()}
        first = tucker(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"])
        second = tucker(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"])
        kernel = (1.5 * first * second).reshape(layer.base_layer.weight.shape)
        torch.testing.assert_close(adapter.delta_weight(), kernel.flatten(1), **TOL)
        expected = layer.base_layer(x) + layer.base_layer._conv_forward(x, kernel, None)
        out = layer(x)
        torch.testing.assert_close(out, expected, **TOL)
        out.square().sum().backward()
        expected.square().sum().backward()
        for tensor, parameter in adapter.named_parameters():
            torch.testing.assert_close(parameter.grad, tensors[tensor].grad, **TOL, msg=f"{name}.{tensor}")
        peft_out = peft_layer(theirs, name)(x)
        torch.testing.assert_close(peft_out, expected, **TOL)
        peft_out.square().sum().backward()
        for tensor in ("hada_w1_a", "hada_w2_a"):  # PEFT 0.21.2's bug: if this fails, PEFT fixed it
            assert not torch.allclose(peft_tensor(theirs, name, tensor).grad, tensors[tensor].grad, atol=1e-3)
        torch.testing.assert_close(peft_tensor(theirs, name, "hada_t1").grad, tensors["hada_t1"].grad, **TOL)


@pytest.mark.parametrize("name", ["img", "seq", "grp", "rect"])
def test_lokr_update_is_the_kronecker_kernel(name):
    """ΔW = s·W1 ⊗ W2 with the kernel on W2 (low-rank, Tucker, full on Conv2d); a Conv1d with a full lokr_w2 takes
    PEFT's order, ΔW[(j, i), (q, p), h] = s·W2[j, q, h]·W1[i, p] (PEFT's torch.kron of a matrix and a 3-D tensor)."""
    for kwargs in ({"r": 1}, {"r": 1, "use_effective_conv2d": True}, {"r": 8}):
        model = rankwise.adapt(base_net(), rankwise.config("lokr", targets=[name], init_weights=False, alpha=2.0,
                                                           **kwargs))
        adapter, base = getattr(model, name).adapter, getattr(model, name).base_layer
        t = dict(adapter.named_parameters())
        w1 = t["lokr_w1"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            w2 = w2.reshape(*w2.shape[:2], *base.kernel_size)
        else:
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(t["lokr_w2_a"].shape[0], -1, *base.kernel_size)
        if "lokr_w2" in t and base.weight.dim() == 3:
            kernel = torch.stack([torch.kron(w2[:, :, h], w1) for h in range(w2.shape[2])], dim=-1)
        else:
            kernel = kron_kernel(w1, w2)
        scale = 2.0 / kwargs["r"]  # alpha / r
        torch.testing.assert_close(adapter.delta_weight(), scale * kernel.flatten(1), **TOL, msg=str(kwargs))


def test_expected_conv_params_is_the_closed_form():
    conv = nn.Conv2d(12, 32, 3)
    loha = rankwise.config("loha", r=4, use_effective_conv2d=True)
    assert LoHaConvAdapter.expected_conv_params(conv, loha) == 2 * 4 * (32 + 12) + 2 * 16 * 9
    assert LoHaConvAdapter.expected_conv_params(conv, rankwise.config("loha", r=4)) == 2 * 4 * (32 + 12 * 9)
    lokr = rankwise.config("lokr", r=1, use_effective_conv2d=True)  # 32 = 4·8, 12 = 3·4
    assert LoKrConvAdapter.expected_conv_params(conv, lokr) == 4 * 3 + (8 + 4) + 9
    assert LoKrConvAdapter.expected_conv_params(conv, rankwise.config("lokr", r=1)) == 4 * 3 + 8 + 4 * 9
    assert LoKrConvAdapter.expected_conv_params(conv, rankwise.config("lokr", r=4)) == 4 * 3 + 8 * 4 * 9
    for config in (loha, lokr):
        adapter = rankwise.core.registry.get_method(config.method).adapter_cls(conv, config, "conv")
        assert sum(p.numel() for p in adapter.parameters()) == type(adapter).expected_conv_params(conv, config)
        with pytest.raises(NotImplementedError, match="needs the layer"):
            type(adapter).expected_num_params(32, 108, config)


def test_unbatched_input_is_one_batch_row():
    ours, _ = pair("lokr", ["seq", "img"], r=1)
    sequence, image = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.seq(sequence[1]), ours.seq(sequence)[1], **TOL)
        torch.testing.assert_close(ours.img(image[1]), ours.img(image)[1], **TOL)


# ----------------------------------------------------------------------------------------------
# Where PEFT is wrong, and what rankwise refuses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_padding_mode_other_than_zeros_is_exact_here_and_refused_both_ways(method, tmp_path):
    """rankwise convolves ΔW padded as the layer pads (reflect), so its forward is its merged layer's. PEFT pads ΔW
    with zeros: its forward is not its own merge. export_peft and import_peft refuse the layer."""
    base = base_net("reflect")
    ours, theirs = pair(method, ["seq"], base=base, r=2)
    sequence, image = inputs()
    with torch.no_grad():
        adapted = ours(sequence, image)
        rankwise.merge(ours)
        torch.testing.assert_close(ours(sequence, image), adapted, **TOL)
        rankwise.unmerge(ours)
        peft_forward = theirs(sequence, image)
        theirs.merge_adapter()
        torch.testing.assert_close(theirs(sequence, image), adapted, **TOL)  # PEFT's merge is ours
        assert not torch.allclose(peft_forward, adapted, atol=1e-3)  # PEFT's unmerged forward is not
    match = rf"layer 'seq' is a Conv1d with padding_mode='reflect'; PEFT 0.21.2's {NAMES[method]}"
    with pytest.raises(ValueError, match=match):
        rankwise.export_peft(ours, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    theirs.unmerge_adapter()
    theirs.save_pretrained(tmp_path / "theirs")
    model = base_net("reflect")
    with pytest.raises(ValueError, match=match):
        rankwise.import_peft(model, tmp_path / "theirs")
    assert not rankwise.core.inject.is_adapted(model)


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(6, 8, 3), (2, 6, 9)), (nn.Conv2d(6, 8, (3, 1)), (2, 6, 5, 4))],
                         ids=["conv1d", "conv2d-3x1"])
def test_lokr_tucker_on_a_k_by_1_kernel_is_computed_here_and_refused_both_ways(conv, shape, tmp_path):
    """PEFT builds lokr_t2 on a kernel whose last size is 1 but its torch.kron raises at every forward and merge;
    rankwise computes the Kronecker kernel (W1 ⊗ the core product) and refuses to exchange the adapter."""
    base = nn.ModuleDict({"c": conv})
    kwargs = {"r": 1, "alpha": 2.0, "use_effective_conv2d": True, "init_weights": False}
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), LoKrConfig(target_modules=["c"], **kwargs))
    with pytest.raises(RuntimeError, match="view size is not compatible"):  # if this fails, PEFT fixed it
        theirs.base_model.model["c"](torch.randn(shape))
    torch.manual_seed(0)
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.config("lokr", targets=["c"], **kwargs))
    adapter = ours["c"].adapter
    assert adapter.tucker and adapter.lokr_t2.shape == (1, 1, 3, 1)
    for tensor, parameter in adapter.named_parameters():  # same tensors as PEFT's all the same
        torch.testing.assert_close(parameter, peft_tensor(theirs, "c", tensor), atol=0, rtol=0)
    w2 = tucker(adapter.lokr_t2, adapter.lokr_w2_a, adapter.lokr_w2_b).reshape(4, 3, *conv.kernel_size)
    kernel = 2.0 * kron_kernel(adapter.lokr_w1, w2)  # s = alpha / r
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(ours["c"](x), conv(x) + conv._conv_forward(x, kernel, None), **TOL)
    match = r"layer 'c' is a Conv[12]d with kernel_size=\(3(, 1)?,?\) and use_effective_conv2d=True; .*torch.kron raises"
    with pytest.raises(ValueError, match=match):
        rankwise.export_peft(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match=match):
        rankwise.import_peft(copy.deepcopy(base), tmp_path / "theirs")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_conv3d_is_refused_before_the_model_changes(method):
    model = nn.ModuleDict({"vol": nn.Conv3d(4, 8, 3), "img": nn.Conv2d(4, 8, 3)})
    before = copy.deepcopy(model.state_dict())
    name = NAMES[method]
    with pytest.raises(ValueError, match=rf"{name}ConvAdapter cannot adapt layer 'vol' \(out_features=8, "
                                         rf"in_features=108\): Conv3d with kernel \(3, 3, 3\): {name} adapts nn.Conv1d "
                                         r"and nn.Conv2d only .*use lora, which adapts nn.Conv3d"):
        rankwise.adapt(model, rankwise.config(method, r=2, targets=["img", "vol"]))
    assert not rankwise.core.inject.is_adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loha_tucker_rank_limit_is_the_kernel_s_largest_multilinear_rank():
    """A (C_out, C_in, k) kernel's multilinear ranks are at most min(C_out, C_in·k) and min(C_in, C_out·k): above
    their maximum the Tucker factors add nothing. The flattened form keeps the Linear limit min(out, in)."""
    conv = nn.Conv2d(2, 3, 3)  # ranks ≤ (3, 2): limit 3; flattened 3 x 18: limit 3
    config = rankwise.config("loha", r=3, use_effective_conv2d=True)
    LoHaConvAdapter(conv, config, "c")
    with pytest.raises(ValueError, match=r"'c' \(out_features=3, in_features=18\): rank r=4 exceeds the largest "
                                         r"multilinear rank of the kernel=3.*allow_excess_rank=True"):
        LoHaConvAdapter(conv, rankwise.config("loha", r=4, use_effective_conv2d=True), "c")
    LoHaConvAdapter(conv, rankwise.config("loha", r=4, use_effective_conv2d=True, allow_excess_rank=True), "c")
    with pytest.raises(ValueError, match=r"rank r=4 exceeds min\(out, in\)=3"):
        LoHaConvAdapter(conv, rankwise.config("loha", r=4), "c")


def test_lokr_decompose_factor_must_divide_the_channels_per_group():
    conv = nn.Conv2d(12, 8, 3, groups=2)  # 6 input channels per group
    with pytest.raises(ValueError, match=r"decompose_factor=4 does not divide both widths 8 and 6"):
        rankwise.adapt(nn.ModuleDict({"c": conv}), rankwise.config("lokr", targets=["c"], decompose_factor=4))
    ours = rankwise.adapt(nn.ModuleDict({"c": copy.deepcopy(conv)}),
                          rankwise.config("lokr", targets=["c"], decompose_factor=2))
    assert ours["c"].adapter.shape == (2, 4, 2, 3 * 9)


def test_use_effective_conv2d_is_validated():
    with pytest.raises(ValueError, match="use_effective_conv2d"):
        rankwise.config("loha", use_effective_conv2d="yes")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_to_lora_is_exact_at_full_rank_and_refuses_grouped_convolutions(method):
    """rankwise.to_lora factorises ΔW of each convolution into a LoRA conv adapter (exact at full rank); a grouped
    convolution's update is a grouped kernel, which a LoRA (dense A kernel) cannot hold: refused by name."""
    targets = ["seq", "img", "rect", "flat"]
    ours, _ = pair(method, targets, r=1, use_effective_conv2d=True)
    sequence, image = inputs()
    with torch.no_grad():
        lora = rankwise.to_lora(ours, rank=64)
        torch.testing.assert_close(lora(sequence, image), ours(sequence, image), **TOL)
    grouped, _ = pair(method, ["img", "grp"], r=1)
    with pytest.raises(ValueError, match=rf"to_lora: layer 'grp' is a grouped convolution \(groups=2\).*'{method}'"):
        rankwise.to_lora(grouped, rank=8)


def test_svd_combination_of_conv_adapters_and_grouped_refusal():
    """add_weighted_adapter(combination='svd') of a Tucker LoHa and a LoKr on convolutions: at full rank the combined
    LoRA computes the weighted sum of the updates; a grouped convolution is refused before the model changes."""
    ours = rankwise.adapt(base_net(), rankwise.config("loha", targets=["img", "seq"], init_weights=False, r=2,
                                                      use_effective_conv2d=True))
    rankwise.add_adapter(ours, "kron", rankwise.config("lokr", targets=["img", "seq"], init_weights=False, r=1))
    sequence, image = inputs()
    layers = {"img": image, "seq": sequence}
    with torch.no_grad():
        updates = {}
        for adapter in ("default", "kron"):
            rankwise.set_adapter(ours, adapter)
            updates[adapter] = {n: getattr(ours, n)(x) - getattr(ours, n).base_layer(x) for n, x in layers.items()}
        rankwise.add_weighted_adapter(ours, ["default", "kron"], [0.5, 2.0], "mix", combination="svd", svd_rank=8)
        rankwise.set_adapter(ours, "mix")
        for name, x in layers.items():
            expected = 0.5 * updates["default"][name] + 2.0 * updates["kron"][name]
            torch.testing.assert_close(getattr(ours, name)(x) - getattr(ours, name).base_layer(x), expected, **TOL)
    grouped = rankwise.adapt(base_net(), rankwise.config("loha", targets=["grp"], r=2))
    rankwise.add_adapter(grouped, "b", rankwise.config("lokr", targets=["grp"], r=1))
    with pytest.raises(ValueError, match=r"layer 'grp' is a grouped convolution \(groups=2\)"):
        rankwise.add_weighted_adapter(grouped, ["default", "b"], [1.0, 1.0], "mix", combination="svd", svd_rank=4)
    assert set(grouped.grp.adapters()) == {"default", "b"}
