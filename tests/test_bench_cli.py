"""``rankwise bench``: every method timed against the frozen floor on the user's model, error rows for misfits."""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import rankwise
from rankwise.cli import main
from rankwise.experiment.timing import interleaved_times


def tiny_bert(path) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    model = BertModel(config)
    model.save_pretrained(path)
    return model


def test_bench_times_each_method_and_reports_misfits(tmp_path, capsys, one_thread):
    base = tiny_bert(tmp_path / "bert")
    status = main(["bench", "--model", str(tmp_path / "bert"), "--methods", "lora,c3a", "--set", "c3a.block_size=7",
                   "--batch", "2", "--seq", "8", "--rounds", "1", "--warmup", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert status == 1
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    expected = rankwise.trainable_parameters(rankwise.adapt(copy.deepcopy(base), rankwise.config("lora")))
    assert f"{expected:,}" in rows["lora"]
    assert "error" in rows["c3a"] and "7" in rows["c3a"]
    assert "1.00" in rows["frozen floor"]


def test_a_method_that_trains_but_cannot_merge_keeps_its_row_and_the_others(tmp_path, capsys, one_thread):
    """A bias update on Llama's bias-less layers cannot merge: that cell says why; the run and the other rows go on
    (the merge refusal used to end the whole command without a table)."""
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    status = main(["bench", "--model", str(tmp_path / "llama"), "--methods", "lora,dora", "--set", "lora.lora_bias=true",
                   "--batch", "2", "--seq", "8", "--rounds", "1", "--warmup", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert status == 0
    rows = {line.split("|")[1].strip(): line.split("|") for line in printed.splitlines() if line.startswith("| ")}
    assert "cannot merge" in rows["lora"][5] and "no bias" in rows["lora"][5] and float(rows["lora"][4]) > 0
    assert float(rows["dora"][5]) > 0


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--methods", "nope"]) == 2
    assert main(["bench", "--rounds", "0"]) == 2
    assert "rankwise: error" in capsys.readouterr().err


def test_interleaving_rotates_the_order_and_drops_warmup():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(steps, rounds=2, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(samples) == 2 for samples in times.values())
