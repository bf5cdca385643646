"""Small models shared by several test files."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel


def minilm_shaped_bert() -> BertModel:
    """A one-layer random BERT with MiniLM's widths (hidden 384, intermediate 1536), in eval mode."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12,
                        vocab_size=50)
    return BertModel(config).eval()
