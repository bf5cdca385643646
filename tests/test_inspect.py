"""``rankwise inspect``: saved adapters and compressed models described from their files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from method_cases import CASES
from torch import nn

import rankwise
from rankwise import cli
from rankwise.compress import save_compressed
from rankwise.compress.storage import CONFIG_FILE as COMPRESSED_CONFIG
from rankwise.core.io import CONFIG_FILE, WEIGHTS_FILE, adapter_state
from rankwise.experiment.budget import count_parameters


class Toy(nn.Module):
    """Linear layers of widths 32, 48 and 64 and a small head saved in full."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.mid = nn.Linear(64, 48)
        self.down = nn.Linear(48, 32, bias=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.mid(torch.relu(self.up(x))))))


def saved_adapter(tmp_path: Path, method: str = "lora", **kwargs) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    config = rankwise.config(method, targets=["up", "mid", "down"], modules_to_save=["head"], **kwargs)
    model = rankwise.adapt(Toy(), config)
    return model, rankwise.save(model, tmp_path / f"adapter-{method}")


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_counts_match_the_model(method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, directory = saved_adapter(tmp_path, method, **CASES[method].kwargs)
    info = inspect_json(directory, capsys)
    assert (info["kind"], info["method"]) == ("adapter", method)
    assert info["config"] == rankwise.core.inject.adapter_config(model).to_dict()
    assert [layer["layer"] for layer in info["layers"]] == ["down", "mid", "up"]  # natural name order
    # Every saved tensor is listed once, with its shape, under its layer or the saved modules.
    listed = {f"{layer['layer']}.adapter.{t['name']}": t["shape"] for layer in info["layers"] for t in layer["tensors"]}
    listed.update({t["name"]: t["shape"] for t in info["modules_to_save"]})
    assert listed == {name: list(value.shape) for name, value in adapter_state(model).items()}
    # The closed form (what inspect can compute without the model) equals the live trainable count.
    assert info["totals"]["trainable"] == rankwise.trainable_parameters(model)
    assert info["totals"]["modules_to_save"] == 32 * 3 + 3


def test_buffers_of_a_saved_module_are_not_counted_as_trainable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """audit p17: a modules_to_save BatchNorm's running_mean / running_var / num_batches_tracked are saved but are
    buffers; the saved config records which saved tensors are parameters and inspect counts only those."""
    torch.manual_seed(0)
    model = Toy()
    model.head = nn.Sequential(nn.BatchNorm1d(32), nn.Linear(32, 3))
    model = rankwise.adapt(model, rankwise.LoRAConfig(r=4, targets=["up"], modules_to_save=["head"]))
    directory = rankwise.save(model, tmp_path / "bn")
    info = inspect_json(directory, capsys)
    assert info["totals"]["trainable"] == rankwise.trainable_parameters(model)
    assert info["totals"]["modules_to_save_trainable"] == 2 * 32 + 32 * 3 + 3
    assert info["totals"]["modules_to_save"] == 2 * 32 + 32 * 3 + 3 + 2 * 32 + 1  # the buffers are stored
    assert cli.main(["inspect", str(directory)]) == 0
    assert f"total: {rankwise.trainable_parameters(model):,} trainable parameters" in capsys.readouterr().out
    # a file saved before the record: nothing tells parameters from buffers, every saved tensor counts as before
    payload = json.loads((directory / CONFIG_FILE).read_text())
    del payload["modules_to_save_parameters"]
    (directory / CONFIG_FILE).write_text(json.dumps(payload))
    assert inspect_json(directory, capsys)["totals"]["modules_to_save_trainable"] == 2 * 32 + 32 * 3 + 3 + 2 * 32 + 1
    payload["modules_to_save_parameters"] = "head.1.weight"
    (directory / CONFIG_FILE).write_text(json.dumps(payload))
    assert cli.main(["inspect", str(directory)]) == 2


class Convs(nn.Module):
    """A 3x3 convolution, a grouped one and a kernel-3 Conv1d: shapes where a flattened (out, in) does not fix the
    adapter's size (Tucker cores, LoKr's factor split, LoRA's grouped B)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.grouped = nn.Conv2d(12, 16, 3, padding=1, groups=4)
        self.seq = nn.Conv1d(16, 24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(self.grouped(self.conv(x)).mean(dim=2))


CONV_CASES = {
    "lora": {"r": 4},
    "loha": {"r": 2, "use_effective_conv2d": True},
    "lokr": {"r": 2, "use_effective_conv2d": True, "decompose_both": True},
    "lokr-flat": {"r": 2},
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_convolution_counts_match_the_model(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The saved record keeps each convolution's kernel and groups, so inspect and the budget count (both on
    weightless stand-ins) equal the adapted model's trainable count."""
    torch.manual_seed(0)
    method = case.split("-")[0]
    targets = ["conv", "grouped", "seq"]
    config = rankwise.config(method, targets=targets, **CONV_CASES[case])
    model = rankwise.adapt(Convs(), config)
    directory = rankwise.save(model, tmp_path / case)
    layers = json.loads((directory / CONFIG_FILE).read_text())["layers"]
    assert layers["grouped"] == {"out_features": 16, "in_features": 27, "kernel_size": [3, 3], "groups": 4}
    assert layers["seq"]["kernel_size"] == [3]
    info = inspect_json(directory, capsys)
    live = rankwise.trainable_parameters(model)
    assert info["totals"]["adapter_trainable"] == info["totals"]["adapter_stored"] == live
    assert count_parameters(Convs(), config) == live


def test_load_refuses_a_convolution_of_another_kernel_with_the_same_flattened_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    directory = rankwise.save(rankwise.adapt(Convs(), rankwise.config("lora", targets=["conv"], r=2)), tmp_path / "a")
    other = Convs()
    other.conv = nn.Conv2d(24, 12, (3, 1), padding=(1, 0))  # in_features 24·3 = 72 = 8·3·3 as well
    with pytest.raises(ValueError, match=r"expects layer 'conv' to be a convolution with \{'kernel_size': \[3, 3\]"):
        rankwise.load(other, directory)
    assert not list(rankwise.adapted_layers(other))


@pytest.mark.parametrize("layers", [{"conv": 5}, {"conv": {"out_features": "12", "in_features": 72}}, ["conv"]])
def test_a_malformed_layer_record_is_a_clear_error(layers, tmp_path: Path) -> None:
    torch.manual_seed(0)
    directory = rankwise.save(rankwise.adapt(Convs(), rankwise.config("lora", targets=["conv"], r=2)), tmp_path / "a")
    payload = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**payload, "layers": layers}))
    with pytest.raises(ValueError, match="'layers' must map each layer name"):
        rankwise.load(Convs(), directory)


def test_inspect_refuses_a_kernel_that_does_not_fit_the_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    directory = rankwise.save(rankwise.adapt(Convs(), rankwise.config("lora", targets=["conv"], r=2)), tmp_path / "a")
    payload = json.loads((directory / CONFIG_FILE).read_text())
    payload["layers"]["conv"]["kernel_size"] = [5, 5]  # 72 is not a multiple of 25
    (directory / CONFIG_FILE).write_text(json.dumps(payload))
    assert cli.main(["inspect", str(directory)]) == 2


def test_adapter_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, directory = saved_adapter(tmp_path, "lora", r=4, alpha=8)
    assert cli.main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "method: lora" in out and "r=4" in out and "alpha=8" in out
    assert "lora_A.weight" in out and "4x64" in out and "48x4" in out and "F32" in out
    assert "head.weight" in out and "3x32" in out
    total = rankwise.trainable_parameters(model)
    assert f"total: {total:,} trainable parameters" in out
    assert cli.main(["inspect", str(directory / CONFIG_FILE)]) == 0  # a file inside the directory works too


def test_compressed_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = rankwise.compress(Toy(), ranks={"up": 5, "mid": 7})
    directory = save_compressed(model, tmp_path / "compressed")
    info = inspect_json(directory, capsys)
    assert info["kind"] == "compressed"
    layers = {layer["layer"]: layer for layer in info["layers"]}
    assert {name: layer["rank"] for name, layer in layers.items()} == {"up": 5, "mid": 7}
    up = {t["name"]: t["shape"] for t in layers["up"]["tensors"]}
    assert up == {"down.weight": [5, 32], "up.weight": [64, 5], "up.bias": [64]}
    assert layers["up"]["stored"] == 5 * (32 + 64) + 64 and layers["up"]["dense"] == 64 * 32 + 64
    assert info["totals"]["stored"] == sum(p.numel() for p in model.parameters())
    assert {t["name"] for t in info["other_tensors"]} == {"down.weight", "head.weight", "head.bias"}

    assert cli.main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "compressed model" in out and "64 x 32" in out and "rank" in out
    assert "head.weight" not in out and "--all-tensors" in out
    assert cli.main(["inspect", str(directory), "--all-tensors"]) == 0
    assert "head.weight" in capsys.readouterr().out


def test_buffers_of_a_compressed_model_are_not_counted_as_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """audit p4: a BatchNorm's running_mean / running_var / num_batches_tracked are saved with a compressed model but
    are buffers; save_compressed records which saved tensors are parameters and inspect counts only those."""
    from rankwise.compress import factorize_layer
    from rankwise.compress.lowrank_conv import set_submodule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 10))
    model(torch.randn(4, 3, 8, 8))  # running statistics that are not the defaults
    set_submodule(model, "0", factorize_layer("0", model[0], 4))
    set_submodule(model, "4", factorize_layer("4", model[4], 5))
    directory = save_compressed(model, tmp_path / "bn")
    info = inspect_json(directory, capsys)
    assert info["totals"]["stored"] == sum(p.numel() for p in model.parameters())
    assert info["totals"]["other"] == 2 * 16 and info["totals"]["buffers"] == 2 * 16 + 1
    assert info["totals"]["before"] == 16 * 27 + 16 + 1024 * 10 + 10 + 2 * 16
    assert {t["name"] for t in info["other_tensors"] if t["buffer"]} == {
        "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert cli.main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "32 parameters, 33 buffer values" in out and f"total: {info['totals']['stored']:,} parameters stored" in out
    # a file saved before the record: nothing tells parameters from buffers, every tensor counts as before
    payload = json.loads((directory / COMPRESSED_CONFIG).read_text())
    del payload["parameters"]
    (directory / COMPRESSED_CONFIG).write_text(json.dumps(payload))
    old = inspect_json(directory, capsys)["totals"]
    assert old["other"] == 2 * 16 + 2 * 16 + 1 and old["buffers"] == 0
    payload["parameters"] = "1.weight"
    (directory / COMPRESSED_CONFIG).write_text(json.dumps(payload))
    assert cli.main(["inspect", str(directory)]) == 2


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankwise: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_corrupt_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, directory = saved_adapter(tmp_path)
    (directory / CONFIG_FILE).write_text('{"format": "rankwise-adapter", "method": ', encoding="utf-8")
    assert "not valid JSON" in _one_error_line(["inspect", str(directory)], capsys)

    _, directory = saved_adapter(tmp_path / "truncated")
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    assert "truncated or corrupted" in _one_error_line(["inspect", str(directory)], capsys)

    _, directory = saved_adapter(tmp_path / "missing")
    (directory / WEIGHTS_FILE).unlink()
    assert "does not exist" in _one_error_line(["inspect", str(directory)], capsys)

    _, directory = saved_adapter(tmp_path / "unknown")
    payload = json.loads((directory / CONFIG_FILE).read_text())
    payload["method"] = "no_such_method"
    (directory / CONFIG_FILE).write_text(json.dumps(payload), encoding="utf-8")
    assert "unknown method 'no_such_method'" in _one_error_line(["inspect", str(directory)], capsys)

    assert "holds neither" in _one_error_line(["inspect", str(tmp_path)], capsys)
    assert "does not exist" in _one_error_line(["inspect", str(tmp_path / "absent")], capsys)

    model = rankwise.compress(Toy(), ranks={"up": 5})
    directory = save_compressed(model, tmp_path / "compressed")
    payload = json.loads((directory / COMPRESSED_CONFIG).read_text())
    payload["layers"]["up"] = {"kind": "linear", "rank": "five"}
    (directory / COMPRESSED_CONFIG).write_text(json.dumps(payload), encoding="utf-8")
    assert "malformed" in _one_error_line(["inspect", str(directory)], capsys)
