"""``rankwise finetune`` / ``compare`` / ``bench`` check the method's config values before loading any data,
tokeniser or model, so ``--r 0`` fails at once with the config's own message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rankwise import cli
from rankwise.experiment import bench, data
from rankwise.experiment import comparison as compare
from rankwise.experiment import pipeline as finetune


class Loaded(Exception):
    """Raised by the patched loaders: something was loaded before the config was checked."""


@pytest.fixture
def nothing_may_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise Loaded("data, tokeniser or model loaded before the config was checked")

    for module, name in ((finetune, "prepare"), (compare, "prepare"), (finetune, "load_classifier"),
                         (data, "load_task"), (data, "load_file"), (finetune, "model_path"), (bench, "model_path")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "--r", "0"], "r must be a positive integer"),
        (["finetune", "--method", "dora", "--set", "r=-2"], "r must be a positive integer"),
        (["compare", "--methods", "lora,dora", "--set", "dora.r=0"], "r must be a positive integer"),
        (["bench", "--methods", "lora", "--set", "lora.r=0"], "r must be a positive integer"),
    ],
)
def test_bad_config_values_fail_before_anything_loads(argv, message, nothing_may_load, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_prints_nothing_on_stderr():
    """A fresh ``rankwise --help`` is quiet: bitsandbytes' note that it could not fetch a hub kernel (printed at
    its import on CPUs with AVX512-BF16) is silenced unless --verbose."""
    done = subprocess.run([sys.executable, "-m", "rankwise", "--help"], check=True, capture_output=True, text=True,
                          timeout=300)
    assert "usage: rankwise" in done.stdout
    assert done.stderr == ""
