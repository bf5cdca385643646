"""save_compressed / load_compressed for every factorised module: TRP and Cuttlefish CNN+MLP models, bad files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.compress.cuttlefish import Cuttlefish, CuttlefishConfig
from rankwise.compress.factorized import FactorizedLinear
from rankwise.compress.lowrank_conv import FactorizedConv2d, matricize, unmatricize
from rankwise.compress.storage import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
)
from rankwise.compress.trp import TRP, TRPConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: a second thread costs more than it saves


class CnnMlp(nn.Module):
    """8×8 images: conv, BN, strided conv, dilated conv with uneven padding, then a three-layer MLP."""

    def __init__(self, seed: int = 0, width: int = 4, stride: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        side = 8 // stride
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=(1, 2), dilation=(1, 2)), nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def train_steps(
    model: nn.Module,
    steps: int,
    before: Callable[[int], object] = lambda step: None,
    after: Callable[[], None] = lambda: None,
    extra: Callable[[], torch.Tensor | float] = lambda: 0.0,
) -> None:
    """A few SGD steps on random labels, with the method's hooks (so BN statistics and weights move)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    labels = torch.arange(5) % 10
    model.train()
    for step in range(steps):
        before(step)
        loss = nn.functional.cross_entropy(model(images()), labels) + extra()
        optimizer.zero_grad()
        loss.backward()
        after()
        optimizer.step()
    model.eval()


def trp_model(scheme: str) -> nn.Module:
    model = CnnMlp()
    trp = TRP(model, TRPConfig(scheme=scheme, include_linear=True, final_energy=0.6))
    train_steps(model, 2, before=trp.before_forward, after=trp.before_optimizer_step)
    report = trp.factorize()
    assert report["features.3"]["factorized"] and report["features.5"]["factorized"], report
    return model


def cuttlefish_model() -> nn.Module:
    model = CnnMlp()
    cf = Cuttlefish(model, CuttlefishConfig(frobenius_decay=1e-3))  # ξ measured on the random init
    with torch.no_grad():  # "training found" rank-2 structure in every tracked layer
        for layer in cf.layers.values():
            u, s, vh = torch.linalg.svd(matricize(layer.weight), full_matrices=False)
            layer.weight.copy_(unmatricize((u[:, :2] * s[:2]) @ vh[:2], layer.weight.shape))
    report = cf.switch()
    assert all(entry["factorized"] for entry in report.values()), report
    train_steps(model, 2, extra=cf.penalty)  # post-switch training must come back too
    return model


def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list[type], dict[str, torch.Tensor]]) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def edit_config(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / CONFIG_FILE
    payload = json.loads(path.read_text())
    edit(payload["layers"])
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_trp_round_trip(tmp_path: Path, scheme: str) -> None:
    model = trp_model(scheme)
    save_compressed(model, tmp_path)
    loaded = load_compressed(CnnMlp(seed=1).eval(), tmp_path)
    for name in ("features.3", "features.5"):
        mine, theirs = loaded.get_submodule(name), model.get_submodule(name)
        assert isinstance(mine, FactorizedConv2d) and (mine.rank, mine.scheme) == (theirs.rank, scheme)
    assert isinstance(loaded.head[1], FactorizedLinear) and loaded.head[1].rank == model.head[1].rank
    torch.testing.assert_close(loaded(images()), model(images()), atol=1e-6, rtol=0)
    entry = json.loads((tmp_path / CONFIG_FILE).read_text())["layers"]["features.3"]
    assert entry["kind"] == "conv2d" and entry["scheme"] == scheme
    assert (entry["stride"], entry["padding"], entry["weight_shape"]) == ([2, 2], [1, 1], [8, 4, 3, 3])


def test_cuttlefish_round_trip(tmp_path: Path) -> None:
    model = cuttlefish_model()
    save_compressed(model, tmp_path)
    loaded = load_compressed(CnnMlp(seed=1).eval(), tmp_path)
    assert {type(loaded.get_submodule(n)) for n in ("features.3", "features.5")} == {FactorizedConv2d}
    torch.testing.assert_close(loaded(images()), model(images()), atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.features[1].running_var, model.features[1].running_var, atol=0, rtol=0)


def test_files_without_kind_read_as_linear(tmp_path: Path) -> None:
    model = nn.Sequential(FactorizedLinear(6, 5, 2), nn.ReLU(), nn.Linear(5, 3))
    save_compressed(model, tmp_path)
    edit_config(tmp_path, lambda layers: layers["0"].pop("kind"))  # the format before conv support
    loaded = load_compressed(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), tmp_path)
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


def test_save_without_factorised_layer_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no factorised layer.*TRP.factorize"):
        save_compressed(CnnMlp(), tmp_path)


def first_conv_factorised() -> nn.Module:
    model = CnnMlp()
    model.features[0] = FactorizedConv2d(model.features[0], 1)  # so that its weight shape is checked first
    return model


@pytest.mark.parametrize(
    "saved, base, match",
    [
        (first_conv_factorised, lambda: CnnMlp(seed=1, width=3),
         r"'features.0'.*weight_shape.*\[4, 1, 3, 3\] saved, \[3, 1, 3, 3\] here.*load onto"),
        (lambda: trp_model("spatial"), lambda: CnnMlp(seed=1, stride=1),
         r"'features.3'.*stride.*\[2, 2\] saved, \[1, 1\] here.*load onto"),
        (first_conv_factorised, lambda: nn.Sequential(nn.Linear(4, 4)), r"'features.0' does not exist in the base"),
    ],
)
def test_wrong_base_model_is_named_and_left_unchanged(
    tmp_path: Path, saved: Callable[[], nn.Module], base: Callable[[], nn.Module], match: str
) -> None:
    save_compressed(saved(), tmp_path)
    fresh = base()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_compressed(fresh, tmp_path)
    assert_unchanged(fresh, before)


def break_kind(layers: dict) -> None:
    layers["features.5"]["kind"] = "conv3d"


def break_type(layers: dict) -> None:
    layers["head.1"] = layers.pop("features.5")


def break_entry(layers: dict) -> None:
    del layers["features.5"]["rank"]


def break_rank(layers: dict) -> None:
    layers["features.5"]["rank"] = 99


def rename(layers: dict) -> None:
    layers["features.9"] = layers.pop("features.5")


@pytest.mark.parametrize(
    "edit, match",
    [
        (break_kind, r"'features.5'.*unknown kind 'conv3d'.*\['conv2d', 'linear'\]"),
        (break_type, r"'head.1' is a Conv2d .*weight_shape.*has a Linear"),
        (break_entry, r"'features.5'.*malformed.*'rank'.*save the model again"),
        (break_rank, r"'features.5' rank 99 is outside \[1, 24\]"),
        (rename, r"'features.9' does not exist"),
    ],
)
def test_bad_config_entries_are_named_and_model_left_unchanged(
    tmp_path: Path, edit: Callable[[dict], None], match: str
) -> None:
    save_compressed(trp_model("spatial"), tmp_path)
    edit_config(tmp_path, edit)
    fresh = CnnMlp(seed=1)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_compressed(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_missing_truncated_and_incomplete_files_leave_model_unchanged(tmp_path: Path) -> None:
    save_compressed(trp_model("channel"), tmp_path)
    fresh = CnnMlp(seed=1)
    before = snapshot(fresh)
    weights = tmp_path / WEIGHTS_FILE
    data = weights.read_bytes()
    tensors = load_file(str(weights))
    # a tensor of a factorised layer is gone: nothing else (e.g. the dense first conv) may be loaded either
    save_file({k: v for k, v in tensors.items() if k != "features.3.second.bias"}, str(weights))
    with pytest.raises(ValueError, match=r"missing \['features.3.second.bias'\]"):
        load_compressed(fresh, tmp_path)
    assert_unchanged(fresh, before)
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_compressed(fresh, tmp_path)
    assert_unchanged(fresh, before)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_compressed(fresh, tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_compressed(fresh, tmp_path / "nowhere")
    assert_unchanged(fresh, before)
