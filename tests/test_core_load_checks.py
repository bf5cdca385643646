"""rankwise.load, import_peft and load_compressed refuse NaN/Inf tensors and wrong dtypes, naming the tensor,
and leave the model as it was; half-precision files for float32 models still load (cast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from rankwise.compress.factorized import FactorizedLinear
from rankwise.compress.storage import WEIGHTS_FILE, load_compressed, save_compressed
from rankwise.core.layer import AdaptedLayer, SavedModule

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Three Linears and a persistent buffer that holds -inf on purpose (an additive attention-style mask)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 24)
        self.out = nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.out(torch.relu(self.proj(x))))) + self.mask.clamp(min=-1e4)


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def adapted() -> Net:
    config = rankwise.LoRAConfig(r=4, targets=["proj", "out"], init_weights=False, modules_to_save=["head"])
    return rankwise.adapt(Net(), config)


def compressed() -> Net:
    return rankwise.compress(Net(), ranks={"proj": 4, "out": 4}, targets=["proj", "out"])


def corrupt(path: Path, key: str, change) -> None:
    tensors = load_file(str(path))
    assert key in tensors, sorted(tensors)
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path))


def with_value(value: float):
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[1] = value
        return tensor
    return change


CORRUPTIONS = {
    "nan": (with_value(float("nan")), r"holds 1 NaN/Inf value"),
    "inf": (with_value(float("inf")), r"holds 1 NaN/Inf value"),
    "-inf": (with_value(float("-inf")), r"holds 1 NaN/Inf value"),
    "int32": (lambda t: t.to(torch.int32), r"has dtype torch\.int32, but the model's tensor is torch\.float32"),
    "bool": (lambda t: t != 0, r"has dtype torch\.bool, but the model's tensor is torch\.float32"),
    "complex": (lambda t: t.to(torch.complex64), r"has dtype torch\.complex64, but the model's tensor is torch\.float32"),
    "float8": (lambda t: t.to(torch.float8_e4m3fn), r"has dtype torch\.float8_e4m3fn"),
}


def assert_untouched(model: nn.Module, reference: torch.Tensor) -> None:
    assert not any(isinstance(m, (AdaptedLayer, SavedModule, FactorizedLinear)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not rankwise.core.inject.is_adapted(model)
    with torch.no_grad():
        assert torch.equal(model(X), reference)


ENTRIES = {  # entry: (writer of a good file, reader, tensor file)
    "load": (lambda path: rankwise.save(adapted(), path), rankwise.load, "adapter.safetensors"),
    "import_peft": (lambda path: rankwise.export_peft(adapted(), path), rankwise.import_peft,
                    "adapter_model.safetensors"),
    "load_compressed": (lambda path: save_compressed(compressed(), path), load_compressed, WEIGHTS_FILE),
}
BAD_FILES = [
    *(("load", key, corruption) for key in ("proj.adapter.lora_B.weight", "head.weight") for corruption in CORRUPTIONS),
    *(("import_peft", "base_model.model.out.lora_A.weight", corruption) for corruption in ("nan", "int32", "complex")),
    *(("load_compressed", key, corruption) for key in ("proj.down.weight", "head.bias")
      for corruption in ("nan", "inf", "int32", "complex")),
]


@pytest.mark.parametrize(("entry", "key", "corruption"), BAD_FILES)
def test_loaders_refuse_a_bad_tensor_naming_it_and_leave_the_model_as_it_was(entry, key, corruption, tmp_path):
    write, read, filename = ENTRIES[entry]
    write(tmp_path)
    change, message = CORRUPTIONS[corruption]
    corrupt(tmp_path / filename, key, change)
    base = Net()
    with torch.no_grad():
        reference = base(X)
    with pytest.raises(ValueError, match=rf"tensor '{key}' in {tmp_path}.* {message}"):
        read(base, tmp_path)
    assert_untouched(base, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_precisions_load_cast(dtype, tmp_path):
    model = adapted()
    rankwise.save(model, tmp_path)
    tensors = {k: v.to(dtype) for k, v in load_file(str(tmp_path / "adapter.safetensors")).items()}
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    loaded = rankwise.load(Net(), tmp_path)
    state = rankwise.core.io.adapter_state(loaded)
    assert set(state) == set(tensors)
    for key, value in tensors.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value.to(torch.float32)), key


def test_load_compressed_keeps_the_models_own_infinite_buffer_and_casts_half_files(tmp_path):
    model = compressed()
    save_compressed(model, tmp_path)
    tensors = {k: v.to(torch.float16) if k != "mask" else v for k, v in load_file(str(tmp_path / WEIGHTS_FILE)).items()}
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    loaded = load_compressed(Net(), tmp_path)
    assert isinstance(loaded.proj, FactorizedLinear)
    assert torch.equal(loaded.mask, Net().mask)
    assert torch.equal(loaded.proj.down.weight, tensors["proj.down.weight"].to(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=2e-2, rtol=2e-2)
