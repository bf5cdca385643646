"""A tiny classifier on disk (a 2-layer, 32-wide BERT with the shipped MiniLM's tokenizer) and a tiny labelled
CSV, so that ``rankwise finetune`` runs end to end (Trainer, checkpoints, processes) in a second or two."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "lovely", "superb", "moving"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "poor"]
FILLER = ["movie", "plot", "actor", "scene", "story", "film", "the", "a", "was", "very"]


def tiny_model(directory: Path, dropout: float = 0.1) -> Path:
    """Save a random 2-layer BERT (seed 0, ``dropout`` in its hidden and attention layers) with MiniLM's
    tokenizer to ``directory``; return it."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rankwise.experiment.pipeline import SHIPPED_MODEL, model_path

    if (directory / "config.json").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(model_path(SHIPPED_MODEL))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_data(path: Path, examples: int = 240) -> Path:
    """A CSV of short reviews whose label follows their sentiment words (seed 0)."""
    rng = random.Random(0)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(examples):
            positive = i % 2 == 0
            words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if positive else NEGATIVE)]
            rng.shuffle(words)
            writer.writerow([f"{' '.join(words)} {i}", "pos" if positive else "neg"])
    return path


def tiny_argv(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """``rankwise finetune`` on the tiny model and data: LoRA r 2, 8 steps of 16, no probe, one thread."""
    return ["finetune", "--model", str(model), "--data", str(data), "--max-examples", "128", "--max-length", "16",
            "--r", "2", "--steps", "8", "--batch-size", "16", "--lr", "5e-3", "--no-probe", "--threads", "1",
            "--output-dir", str(output), *extra]
