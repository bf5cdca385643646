"""Small models and test helpers shared by several test files."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ToyMLP(nn.Module):
    """Linear layers of widths 32, 48 and 64, square and rectangular both ways."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.mid = nn.Linear(64, 48)
        self.down = nn.Linear(48, 32, bias=False)
        self.square = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(self.down(torch.tanh(self.mid(torch.tanh(self.up(x))))))


def minilm_shaped_bert() -> nn.Module:
    """A one-layer random BERT with MiniLM's widths (hidden 384, intermediate 1536), in eval mode."""
    from transformers import BertConfig, BertModel  # here: the spawned processes of the DDP tests import this module

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12,
                        vocab_size=50)
    return BertModel(config).eval()


def seeded_train_outputs(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, seed: int = 123):
    """Both models' training-mode outputs on ``x``, with the global RNG seeded before each forward, so
    dropout layers that draw in the same order draw the same masks. Asserts the masks change ``ours``."""
    outputs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(seed)
        outputs.append(model(x))
    with torch.no_grad():
        assert not torch.allclose(outputs[0], ours.eval()(x), atol=1e-3), "dropout did not change the output"
    ours.train()
    return outputs[0], outputs[1]


def forward_and_dropped_input(forward: Callable[[], torch.Tensor], x: torch.Tensor, p: float,
                              seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward()`` (no grad) under ``seed``, and dropout(x, p) drawn under the same seed: the input an
    adapter branch sees when its forward makes exactly one dropout call on x (and no other draw first)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = forward()
    torch.manual_seed(seed)
    dropped = torch.nn.functional.dropout(x, p, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    return out, dropped
