"""QLoRA benchmark: LoRA r8 all-linear on an NF4 (4-bit) MiniLM, rankwise vs PEFT side by side, and what
``prepare_for_kbit_training`` costs and saves in memory.

Usage::

    python benchmarks/qlora.py                 # the shipped MiniLM, writes results/qlora.md (~2-3 min, 2 threads)
    python benchmarks/qlora.py --quick         # tiny random BERT, seconds (the smoke test's mode)

The base: every all-linear layer of the float32 model replaced by a bitsandbytes ``Linear4bit`` (NF4, double
quantisation, float32 compute), quantised on the CPU (bitsandbytes 0.50). Candidates, all built from copies of
that one quantised model and timed in one process, interleaved round by round after warm-up (medians): the
frozen 4-bit floor (forward + backward to the input embeddings), rankwise and PEFT LoRA r8 (alpha 8), and both
again after their k-bit preparation (``rankwise.prepare_for_kbit_training`` / PEFT's
``prepare_model_for_kbit_training``: frozen base, float32 small parameters, input gradients, re-entrant gradient
checkpointing). Peak memory is the resident-set growth over 3 steps in a fresh subprocess per candidate.

The parameter-memory table loads the model in bfloat16 (as ``load_in_4bit`` with a bfloat16 dtype does),
quantises the same layers to NF4 and counts parameter bytes (packed 4-bit weights with their quantisation
statistics) before and after ``prepare_for_kbit_training``, which casts the bfloat16 embeddings, layer norms and
biases to float32.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

import rankwise

RANK = 8


def quantise_nf4(model: nn.Module) -> nn.Module:
    """Replace the all-linear layers of ``model`` by NF4 ``Linear4bit`` layers holding their weights (in place)."""
    import bitsandbytes as bnb

    names = rankwise.find_targets(model, rankwise.LoRAConfig(targets=common.ALL_LINEAR))
    for name in names:
        dense = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
        layer.weight.data = dense.weight.data  # quantised from the model's dtype by the move below
        layer.bias = None if dense.bias is None else nn.Parameter(dense.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.is_loaded_in_4bit = True  # as transformers marks a load_in_4bit model; PEFT dispatches on it
    return model.to("cpu")


def quantised_model(quick: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    return quantise_nf4(common.load_model(quick).to(dtype))


def _rankwise(prepare: bool) -> Callable[[nn.Module], nn.Module]:
    def build(base: nn.Module) -> nn.Module:
        model = copy.deepcopy(base)
        if prepare:
            rankwise.prepare_for_kbit_training(model)
        return rankwise.adapt(model, rankwise.LoRAConfig(r=RANK, alpha=RANK, targets=common.ALL_LINEAR)).train()

    return build


def _peft(prepare: bool) -> Callable[[nn.Module], nn.Module]:
    def build(base: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = copy.deepcopy(base)
        if prepare:
            prepare_model_for_kbit_training(model)
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=common.ALL_LINEAR)).train()

    return build


CANDIDATES: dict[str, Callable[[nn.Module], nn.Module] | None] = {
    "floor": None,
    "rankwise QLoRA": _rankwise(prepare=False),
    "peft QLoRA": _peft(prepare=False),
    "rankwise QLoRA + prepare_for_kbit_training": _rankwise(prepare=True),
    "peft QLoRA + prepare_model_for_kbit_training": _peft(prepare=True),
}


def make_step(key: str, base: nn.Module, batch: common.Batch) -> tuple[nn.Module, common.Step]:
    build = CANDIDATES[key]
    if build is None:
        model = copy.deepcopy(base).train()
        return model, common.floor_step(model, batch)
    model = build(base)
    return model, common.training_step(model, batch)


def measure_memory(key: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one candidate, in this process (the subprocess side of the memory column)."""
    common.setup_torch(args.threads)
    base = quantised_model(args.quick)
    _, step = make_step(key, base, common.random_batch(base, args.batch, args.seq))  # the step holds the model
    del base
    return common.peak_rss_growth_mib(step)


def parameter_mib(model: nn.Module) -> float:
    """Parameter bytes in MiB, a 4-bit weight's quantisation statistics (absmax, nested absmax, code) included."""
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            state = state.state2 if state.nested else None
    return total / 2**20


def prepare_memory(quick: bool) -> list[list[str]]:
    """Parameter MiB of the float32 model, of the NF4 model loaded in bfloat16, and of it after the preparation."""
    float32 = common.load_model(quick)
    quantised = quantised_model(quick, torch.bfloat16)
    half = {p.dtype for p in quantised.parameters() if type(p) is nn.Parameter}
    before = parameter_mib(quantised)
    rankwise.prepare_for_kbit_training(quantised, use_gradient_checkpointing=False)
    cast = sum(p.numel() for p in quantised.parameters() if type(p) is nn.Parameter)
    return [
        ["float32 model", f"{parameter_mib(float32):.1f}"],
        [f"NF4 all-linear, rest {', '.join(str(d).removeprefix('torch.') for d in sorted(half, key=str))}",
         f"{before:.1f}"],
        [f"after prepare_for_kbit_training (rest float32: {cast:,} parameters cast)", f"{parameter_mib(quantised):.1f}"],
    ]


def run(args: argparse.Namespace) -> str:
    """Time every candidate, measure memory and return the markdown report."""
    common.setup_torch(args.threads)
    base = quantised_model(args.quick)
    batch = common.random_batch(base, args.batch, args.seq)
    models, steps = {}, {}
    for key in CANDIDATES:
        models[key], steps[key] = make_step(key, base, batch)
    print(f"timing {len(steps)} candidates, {args.rounds} rounds after {args.warmup} warm-up", file=sys.stderr)
    step_s = common.medians(common.interleaved_times(steps, args.rounds, args.warmup))
    memory = {key: common.memory_in_subprocess(__file__, args, key) for key in steps} if args.memory else {}
    return report(args, models, step_s, memory, prepare_memory(args.quick))


def report(args: argparse.Namespace, models: dict[str, nn.Module], step_s: dict[str, float],
           memory: dict[str, float | None], parameters: list[list[str]]) -> str:
    floor = step_s["floor"]

    def mib(key: str) -> str:
        value = memory.get(key)
        return "—" if value is None else f"{value:.0f}"

    rows = [["frozen NF4 floor", "0", f"{floor:.3f}", "1.00", "—", mib("floor"), "—"]]
    for prepared in ("", " + prepare"):
        ours = "rankwise QLoRA" + (" + prepare_for_kbit_training" if prepared else "")
        theirs = "peft QLoRA" + (" + prepare_model_for_kbit_training" if prepared else "")
        for key in (ours, theirs):
            rows.append([
                key, f"{rankwise.trainable_parameters(models[key]):,}", f"{step_s[key]:.3f}",
                common.ratio(step_s[key], floor),
                f"**{common.ratio(step_s[ours], step_s[theirs])}**" if key == ours else "",
                mib(key), f"**{common.ratio(memory.get(ours), memory.get(theirs))}**" if key == ours else "",
            ])
    setup = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    return "\n".join([
        f"# QLoRA benchmark ({setup}, NF4 all-linear, LoRA r{RANK}, batch {args.batch}, seq {args.seq}, train mode)",
        "",
        f"{common.environment_line(args.threads)}; {args.rounds} interleaved rounds after {args.warmup} warm-up, medians.",
        ("Base: every all-linear layer a bitsandbytes Linear4bit (NF4, double quantisation, float32 compute) on the "
         "CPU; the rest float32. Memory: peak RSS growth (VmHWM after reset) over 3 steps, one fresh subprocess per "
         "candidate. '+ prepare' = the library's k-bit preparation, which turns on re-entrant gradient checkpointing."),
        f"all-linear = {', '.join(common.ALL_LINEAR)}.",
        "",
        "## rankwise vs PEFT, same quantised base, same config, same run",
        "",
        common.markdown_table(
            ["candidate", "trainable", "step s (median)", "× floor", "time rankwise/PEFT", "RSS MiB",
             "memory rankwise/PEFT"],
            rows,
        ),
        "",
        "## Parameter memory and prepare_for_kbit_training (model loaded in bfloat16)",
        "",
        common.markdown_table(["model", "parameter MiB"], parameters),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.step_parser(__doc__, rounds=5, out="qlora.md")
    return common.parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' checkpointing rename, called by PEFT
    common.step_main(parse_args(argv), measure_memory, run)


if __name__ == "__main__":
    main()
