"""Small models and test helpers shared by several test files."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import BertConfig, BertModel


def minilm_shaped_bert() -> BertModel:
    """A one-layer random BERT with MiniLM's widths (hidden 384, intermediate 1536), in eval mode."""
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
