"""One row per registered method for the parametrised method suite (tests/test_method_suite.py).

Each method's author owns its own row. Fields:
    kwargs: config keyword arguments that fit the toy model's layers (in/out widths 32, 48, 64).
    starts_at_zero: the method's default init leaves the model unchanged.
    random_init: kwargs that make the adapter non-trivial at init (so merge tests see a real update);
        the suite also perturbs every floating adapter tensor, so this may be {}.
    bad: config kwargs that are invalid on their own: the config constructor must raise ValueError.
    unfit: config kwargs valid on their own that do not fit the toy layers: adapt must raise ValueError.
    fits_every_layer: why a method has no ``unfit`` config (it derives every shape from the layer); empty otherwise.
    conv1d: whether the method supports transformers' Conv1D (GPT-2 layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    kwargs: dict[str, Any]
    starts_at_zero: bool = True
    random_init: dict[str, Any] = field(default_factory=dict)
    bad: list[dict[str, Any]] = field(default_factory=list)
    unfit: list[dict[str, Any]] = field(default_factory=list)
    conv1d: bool = True
    fits_every_layer: str = ""


CASES: dict[str, Case] = {
    "singlora": Case(
        kwargs={"r": 4, "alpha": 4},
        random_init={"ramp_up_steps": 0},
        bad=[{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"ramp_up_steps": -1}, {"init_weights": "zeros"}],
        unfit=[{"r": 33}],
    ),
    "gralora": Case(
        kwargs={"r": 4, "alpha": 8, "gralora_k": 2, "hybrid_r": 2, "dropout": 0.1},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"gralora_k": 0}, {"r": 3}, {"hybrid_r": -1}, {"alpha": 0}, {"dropout": 1.0}],
        unfit=[{"r": 5, "gralora_k": 5}, {"hybrid_r": 40}],
    ),
    "c3a": Case(
        kwargs={"block_size": 16},
        starts_at_zero=False,  # PEFT's default xavier_uniform kernel; init_weights=True starts at zero
        bad=[{"block_size": 0}, {"block_size": -16}, {"init_weights": "orthogonal"}],
        unfit=[{"block_size": 5}, {"block_size": 64}],
    ),
    "surm": Case(
        kwargs={"structure": "circulant", "rectangular": "native"},
        bad=[{"structure": "lowrank"}, {"alpha": 0}, {"block_size": 0, "rectangular": "tile"}, {"displacement_rank": 0},
             {"r": 0}, {"dropout": 1.0}, {"rectangular": "pad"}, {"block_size": 8},
             {"structure": "kronecker", "rectangular": "error", "block_size": 8}, {"structure": "ldr"}],
        unfit=[{"rectangular": "error"}, {"block_size": 5, "rectangular": "tile"},
               {"structure": "toeplitz", "block_size": 64, "rectangular": "tile"},
               {"structure": "kronecker", "r": 5, "rectangular": "error"}],
    ),
    "lora": Case(
        kwargs={"r": 4, "alpha": 8},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"r": -1}, {"alpha": 0}, {"dropout": 1.0}, {"dropout": -0.1}],
        unfit=[{"r": 33}],
    ),
    "dora": Case(
        kwargs={"r": 4, "alpha": 8},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"alpha": -1}, {"dropout": 1.5}],
        unfit=[{"r": 40}],
    ),
    "loldu": Case(
        kwargs={"r": 4, "alpha": 4.0},
        bad=[{"r": 0}, {"alpha": 0}, {"alpha": float("nan")}],
        unfit=[{"r": 33}],
    ),
    "miss": Case(
        kwargs={"r": 8, "dropout": 0.1},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"mini_r": 0}, {"dropout": 1.0}, {"init_weights": "bone"}, {"init_weights": "bat"}],
        unfit=[{"r": 40}, {"init_weights": "bat", "r": 6, "dropout": 0.0}, {"init_weights": "mini", "mini_r": 5}],
    ),
    "bora": Case(
        kwargs={"r": 4, "alpha": 8},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"order": "both"}, {"detach_norms": "yes"}, {"lora_bias": True}],
        unfit=[{"r": 40}],
    ),
    "gora": Case(  # adapt builds the rank-r placeholder; initialize (tests/test_gora.py) allocates
        kwargs={"r": 4, "alpha": 8, "r_min": 1, "r_max": 16},
        bad=[{"r": 0}, {"r_min": 0}, {"r_min": 5, "r_max": 4}, {"gamma": -1.0}, {"budget_features": "log"},
             {"init_weights": "pissa"}, {"rank_pattern": {"up": 0}}],
        unfit=[{"r": 33}],
    ),
    "adalora": Case(
        kwargs={"init_r": 4, "target_r": 2, "total_step": 10, "alpha": 8},
        bad=[{"init_r": 0}, {"target_r": 5}, {"total_step": None}, {"total_step": 0}, {"tinit": 5, "tfinal": 5},
             {"tinit": -1}, {"deltaT": 0}, {"beta1": 1.0}, {"beta2": 0}, {"orth_reg_weight": -0.1},
             {"orth_reg": "l1"}, {"alpha": 0}, {"dropout": 1.0}, {"rank_pattern": {"up": [True]}},
             {"rank_pattern": "up"}],
        unfit=[{"init_r": 33, "target_r": 2}],
    ),
    "ardlora": Case(
        kwargs={"r": 2, "alpha": 4},  # per-head layers: tests/test_ardlora.py
        bad=[{"r": 0}, {"r": 2, "r_max": 1}, {"alpha": 0}, {"dropout": 1.0}, {"temperature": 0},
             {"l1_weight": -1.0}, {"tv_weight": float("nan")}, {"scale_lr": 0}, {"heads": {"up": 0}},
             {"heads": {"up": 2}, "input_heads": {"up": 2}}, {"rank_pattern": {"up": [0]}}],
        unfit=[{"r": 20}, {"heads": {"mid": 5}}, {"input_heads": {"mid": 5}}, {"heads": {"up": 32}},
               {"rank_pattern": {"up": [2, 2]}}],
    ),
    "elalora": Case(
        kwargs={"init_r": 4, "total_step": 10, "alpha": 8},
        bad=[{"init_r": 0}, {"init_r": 1}, {"b": 0}, {"k": 0}, {"scheduler": "yes"}, {"total_step": None},
             {"tinit": 5, "tfinal": 5}, {"deltaT": 0}, {"beta1": 1.0}, {"orth_reg_weight": -1.0}, {"orth_reg": "l1"},
             {"alpha": 0}, {"dropout": 1.0}, {"expansion_seed": -1}, {"rank_pattern": {"up": 0}},
             {"rank_pattern": ["up"]}],
        unfit=[{"init_r": 33}, {"rank_pattern": {"up": 40}}],
    ),
    "loha": Case(  # r=4: the Khatri-Rao forward on the rectangular layers, the dense one on the square layer
        kwargs={"r": 4, "alpha": 8, "rank_dropout": 0.1},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"alpha": 0}, {"rank_dropout": 1.0}, {"module_dropout": -0.1}, {"init_weights": "gaussian"}],
        unfit=[{"r": 33}],
    ),
    "lokr": Case(  # r=2 with decompose_both: both Kronecker factors are low-rank products on every toy layer
        kwargs={"r": 2, "alpha": 4, "decompose_both": True, "rank_dropout": 0.1},
        random_init={"init_weights": False},
        bad=[{"r": 0}, {"decompose_factor": 0}, {"decompose_factor": -2}, {"init_weights": "gaussian"},
             {"rank_dropout": 1.0}, {"rank_dropout_scale": "yes"}],
        unfit=[{"decompose_factor": 5}],
    ),
    "kradapter": Case(
        kwargs={},
        random_init={"init_weights": False},
        bad=[{"scaling": 0}, {"scaling": float("inf")}, {"init_weights": "zeros"}],
        fits_every_layer="r and d follow from each layer's shape, so every Linear / Conv1D layer fits",
    ),
}
