"""ElaLoRA's rank allocator: prune the weakest components and grow the strongest layers, physically.

Paper: "ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning", Chang, Ma,
Ma, Qi, Sabot, Jiang, Kung, arXiv:2504.00254 (2025). Official code: HuandongChang/ElaLoRA
(``loralib/loralib/elalora.py``, ``RankAllocator``); the exact rules below are the official code's.

Importance, exactly AdaLoRA's (:mod:`rankwise.allocation.adalora`), updated at every step t < T − t_final::

    I = |w ⊙ ∇w|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,   s = Ī ⊙ Ū
    S_{l,i} = s(E_{l,i}) + mean_j s(A_{l,ij}) + mean_k s(B_{l,ki})

Three phases: warm-up (t ≤ t_init, ranks fixed), dynamic adjustment, stabilisation (t ≥ T − t_final,
ranks frozen, no more statistics). A reallocation round runs at every step with

    t_init < t < T − t_final,   (t − t_init) mod ΔT = 0,   b_t > 0,

where the dynamic rank scheduler (``scheduler=True``) moves b_t = round(b · (1 − p³)) components,
p = clip((t − t_init) / (T − t_final − t_init), 0, 1) (``round`` is Python's, half to even), and
b_t = b without it. A round (:func:`plan`):

    1. every layer l offers its k_l = min(k, r_l − 1) lowest-scored components (so no layer loses its
       last one); the offers of all layers form one pool;
    2. the b_t lowest of the pool are pruned: their rows of A and E and columns of B are deleted;
    3. the b_t highest of the same pool are expansion slots: each gives its layer one new component
       (a layer offering several high candidates gains several);
    4. the total rank Σ_l r_l is unchanged.

The new components (:meth:`rankwise.adapters.elalora.ElaLoRAAdapter.new_components`) are unit vectors
orthogonal to the surviving ones with a singular value of min(min |E|, 1e-13), so ΔW does not change
at the moment of growth (to ~1e-13); pruning removes the pruned components' share of ΔW. A new
component starts with zero statistics and a near-zero E, so it is its layer's weakest offer until
training has grown it: with a short ΔT the next round prunes it again and the ranks swing back (as in
the official code; the official scripts use ΔT = 50 to 500).

Where rankwise decides differently from the official code, on purpose:

    * ties: the pool is ordered by (score, layer, index), so exactly b_t components are pruned (the
      official code prunes every offer ≤ the b_t-th smallest score, more than b_t on ties);
    * b_t larger than the pool is clipped to the pool's size with a warning (official: ``topk`` error);
    * a layer never grows past min(m, n) (the orthogonal complement would be empty): an expansion slot
      of a layer whose rank (before the round's pruning) plus its slots so far reaches min(m, n) goes to
      the next pool entry, and if too few slots can be placed, only as many components are pruned;
    * the optimizer lives on: the tensors are resized in place and the optimizer's state follows
      (surviving components keep their AdamW moments, new ones start at zero; ``step`` is kept), so one
      optimizer and one learning-rate schedule run through every round. The official trainer rebuilds
      the optimizer after every round and means to copy the old state, but its copy compares Python
      ids with integer state keys and never matches: every round resets all Adam moments, merges the
      parameter groups, and leaves the learning-rate schedule bound to the dead optimizer (constant
      peak lr after the first round). That is a bug of the code, not part of the method;
    * the new components are drawn from the allocator's own generator (``expansion_seed``), not the global one,
      so that training randomness is the same with and without ElaLoRA and a resume is exact;
    * layers at rank 1 offer nothing, so they can neither shrink nor grow (as in the official code).

Under ``torch.distributed`` the scores are averaged over the processes before each round (as for
AdaLoRA) and the new components come from identically seeded generators, so every process makes the
same surgery. The tensors change shape, so a ``DistributedDataParallel`` wrapper built before a round
is stale (its buckets hold the old shapes and it no longer all-reduces the resized gradients; torch
says nothing and the processes drift apart): rebuild it after every step with
:func:`rankwise.allocation.rewrap_ddp` (``ddp = rewrap_ddp(ddp)``, a no-op when nothing was resized).
The allocator notices a DDP run at a round (the gradients are bit-identical on every process,
:func:`~rankwise.allocation.distributed.in_sync`) and then raises ``ValueError`` at its next step if
the resized tensors were not rewrapped. Processes that train without DDP (each on its own data) are
not checked. A DDP run equals a one-process run on the same global batch only up to what the new
components allow: their A and B gradients are proportional to E_new ≤ 1e-13, so in float32 they are
rounding noise (~1e-10) that AdamW (ε = 1e-8) turns into steps of ~lr·1e-2, different for any other
summation order; in float64 the two runs agree to 1e-5 (tested). ``transformers.Trainer`` builds its DDP wrapper once, inside its training loop, where a
callback cannot replace it: ``RankwiseCallback`` refuses ElaLoRA in a multi-process Trainer run.

The allocator must know the optimizer: ``allocator.attach_optimizer(optimizer)`` before the first
round; ``RankwiseCallback`` and rankwise's own training loop do it. A plain loop::

    allocator = rankwise.allocator(model); allocator.attach_optimizer(optimizer)
    loss = task_loss + allocator.regularizer(); loss.backward(); optimizer.step()
    allocator.step(step); optimizer.zero_grad()

Each round writes the new ranks into the adapter config's ``rank_pattern``, so ``rankwise.save`` /
``rankwise.load`` rebuild every layer at its current rank; the allocator state (EMAs at the current
shapes, the expansion generator, the round count) is saved beside it for an exact resume.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import check_positive_int
from ..core.rank import RankComponents, rank_layers, zero_padded
from .adalora import AdaLoRAAllocator
from .distributed import in_sync, resized_since_wrapped, world_size


def plan(scores: dict[str, Tensor], caps: dict[str, int], moved: int,
         k: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """One round's decisions: ``({layer: indices to prune}, {layer: components to add})``.

    ``scores`` holds every layer's component scores (their count is the layer's rank), ``caps`` each
    layer's largest rank min(m, n), ``moved`` the number of components to move (b_t), ``k`` the offers
    per layer. See the module docstring for the rules, ties and caps.
    """
    names = list(scores)
    pool: list[tuple[float, int, int]] = []  # (score, layer position, component index)
    for position, name in enumerate(names):
        values = scores[name].tolist()
        offered = sorted(range(len(values)), key=lambda i: (values[i], i))[:min(k, len(values) - 1)]
        pool.extend((values[i], position, i) for i in offered)
    if moved > len(pool):  # the slots below stop at the pool's end: this many are moved
        warnings.warn(f"ElaLoRA: b_t={moved} exceeds the {len(pool)} components the layers offer "
                      f"(k_l = min(k, r_l - 1)); moving {len(pool)}", stacklevel=3)
    grown = dict.fromkeys(names, 0)
    placed = 0
    for _, position, _ in sorted(pool, key=lambda c: (-c[0], c[1], c[2])):
        if placed == moved:
            break
        name = names[position]
        if scores[name].numel() + grown[name] < caps[name]:
            grown[name] += 1
            placed += 1
    pruned: dict[str, list[int]] = {name: [] for name in names}
    for _, position, index in sorted(pool)[:placed]:
        pruned[names[position]].append(index)
    return pruned, grown


class ElaLoRAAllocator(AdaLoRAAllocator):
    """ElaLoRA's prune-and-expand rounds over the layers of one adapted model (module docstring).

    It shares AdaLoRA's importance statistics, scores and orthogonal regulariser; the budget is the
    constant Σ_l r_l the layers start with. ``rankwise.allocator(model)`` builds it from an
    ``ElaLoRAConfig`` (:meth:`from_config`); it runs on any adapter with rank components.

    Args:
        model: the adapted model.
        total_step: T, the number of optimizer steps of the run.
        b: components moved per round (b₀ of the scheduler).
        k: lowest-scored components each layer offers per round.
        scheduler: decay b_t cubically to 0 at T − t_final (the official ``enable_scheduler``).
        tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, orth_reg: as for AdaLoRA.
        seed: seed of the generator that draws the new components.
        config: the adapter config whose ``rank_pattern`` follows the ranks (None: not tracked).
    """

    label = "ElaLoRA"
    sharded_problem = ("it resizes the adapters' tensors (moves rank between layers), and FSDP2's sharded parameters "
                       "keep the shapes they were sharded with")
    resizes = True

    def __init__(self, model: nn.Module, *, total_step: int, b: int = 4, k: int = 2, scheduler: bool = True,
                 tinit: int = 1, tfinal: int = 1, deltaT: int = 10, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.1, orth_reg: str = "peft", seed: int = 0, config: Any = None) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "b", b)
        check_positive_int(owner, "k", k)
        layers = rank_layers(model, owner)
        budget = sum(adapter.r for adapter in layers.values())
        super().__init__(model, total_step=total_step, target_r=budget // len(layers), tinit=tinit, tfinal=tfinal,
                         deltaT=deltaT, beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight,
                         orth_reg=orth_reg, init_budget=budget)
        self.b, self.k, self.scheduler, self.config = b, k, bool(scheduler), config
        self.generator = torch.Generator().manual_seed(seed)
        for adapter in self.layers.values():
            if hasattr(adapter, "generator"):  # ElaLoRA's adapter draws its new components from it
                adapter.generator = self.generator
        self.optimizer: torch.optim.Optimizer | None = None
        #: the step of the last round taken under DDP whose resize no wrapper has caught up with yet
        self.awaiting_rewrap: int | None = None

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> ElaLoRAAllocator:
        """The allocator of a model adapted with an ``ElaLoRAConfig``."""
        unknown = sorted(set(config.rank_pattern or {}) - set(rank_layers(model, cls.__name__)))
        if unknown:
            raise ValueError(f"ElaLoRAConfig: rank_pattern names {unknown}, which are not adapted layers of this "
                             "model; use the names rankwise.ranks(model) reports")
        return cls(model, total_step=config.total_step, b=config.b, k=config.k, scheduler=config.scheduler,
                   tinit=config.tinit, tfinal=config.tfinal, deltaT=config.deltaT, beta1=config.beta1,
                   beta2=config.beta2, orth_reg_weight=config.orth_reg_weight, orth_reg=config.orth_reg,
                   seed=config.expansion_seed, config=config)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose per-parameter state is resized with the adapter's tensors at every round."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [f"{name}.{tensor}" for name, adapter in self.layers.items()
                   for tensor, (p, _) in adapter.rank_tensors().items() if id(p) not in held]
        if missing:
            raise ValueError(f"ElaLoRA attach_optimizer: the optimizer does not hold {missing[:4]}; pass the "
                             "optimizer that trains the adapter (built after rankwise.adapt / rankwise.load)")
        self.optimizer = optimizer

    # -- the schedule ----------------------------------------------------------------------------

    def moved(self, step: int) -> int:
        """b_t, the number of components a round at ``step`` moves (before clipping to the pool)."""
        if not self.scheduler:
            return self.b
        span = self.total_step - self.tfinal - self.tinit
        progress = min(max((step - self.tinit) / span, 0.0), 1.0)
        return round(self.b * (1 - progress**3))

    def is_round(self, step: int) -> bool:
        """Whether ``step`` falls in the adjustment window on the ΔT grid and moves at least one component."""
        return (self.tinit < step < self.total_step - self.tfinal and (step - self.tinit) % self.deltaT == 0
                and self.moved(step) > 0)

    def step(self, global_step: int) -> None:
        """Update the statistics (t < T − t_final) and run a round where the schedule says so.

        ``ValueError`` if the previous round ran under DDP and the wrapper was not rebuilt since (module
        docstring)."""
        self._check_unsharded(global_step)
        self._check_rewrapped(global_step)
        if global_step < self.total_step - self.tfinal:
            round_now = self.is_round(global_step)
            if round_now and self.optimizer is None:
                raise ValueError(
                    f"ElaLoRA allocator.step({global_step}) resizes the adapter, but it does not know the "
                    "optimizer whose state must follow; call rankwise.allocator(model).attach_optimizer(optimizer) "
                    "before training (RankwiseCallback and rankwise's training loop do it)"
                )
            self._check_gradients(global_step)
            self._update_importance()
            if round_now and self._reallocate(self.moved(global_step)):
                self.awaiting_rewrap = global_step
        self.last_step = global_step

    def ranks(self) -> dict[str, int]:
        """``{layer: current rank}`` (the tensors' size)."""
        return {name: adapter.r for name, adapter in self.layers.items()}

    def _check_rewrapped(self, global_step: int) -> None:
        if self.awaiting_rewrap is None:
            return
        stale = [f"{name}.{tensor}" for name, adapter in self.layers.items()
                 for tensor, (p, _) in adapter.rank_tensors().items() if resized_since_wrapped(p)]
        if stale:
            raise ValueError(
                f"ElaLoRA allocator.step({global_step}): the round at step {self.awaiting_rewrap} resized {stale[:4]} "
                "under DistributedDataParallel, and the wrapper was not rebuilt, so since then their gradients are "
                "not all-reduced and the processes' weights drift apart. Call ddp = "
                "rankwise.allocation.rewrap_ddp(ddp) after every allocator.step"
            )
        self.awaiting_rewrap = None

    # -- a round ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _reallocate(self, moved: int) -> bool:
        """One round (module docstring); whether it resized tensors under DDP."""
        gradients = [p.grad for adapter in self.layers.values() for p, _ in adapter.rank_tensors().values()]
        under_ddp = world_size() > 1 and in_sync(gradients)  # DDP averaged them; separate processes differ
        caps = {}
        for name, adapter in self.layers.items():
            a, b = adapter.factors()
            caps[name] = min(a.shape[1], b.shape[0])
        pruned, grown = plan(self.agreed_scores(), caps, moved, self.k)
        for name, adapter in self.layers.items():
            if pruned[name]:
                keep = torch.ones(adapter.r, dtype=torch.bool)
                keep[pruned[name]] = False
                index = keep.nonzero().view(-1)
                adapter.keep_components(keep, self.optimizer)
                self._resize_statistics(name, adapter, lambda t, d, index=index: t.index_select(d, index.to(t.device)))
            if grown[name]:
                adapter.grow_components(grown[name], self.optimizer)
                self._resize_statistics(name, adapter, lambda t, d, count=grown[name]: zero_padded(t, d, count))
        self.allocations += 1
        if self.config is not None:
            self.config.rank_pattern = self.ranks()
        return under_ddp and (any(pruned.values()) or any(grown.values()))

    def _resize_statistics(self, name: str, adapter: RankComponents, follow: Callable[[Tensor, int], Tensor]) -> None:
        """Resize the layer's Ī and Ū like its tensors (kept components keep theirs, new ones start at 0)."""
        for tensor, (_, dim) in adapter.rank_tensors().items():
            for stats in (self.exp_avg_ipt, self.exp_avg_unc):
                stats[f"{name}.{tensor}"] = follow(stats[f"{name}.{tensor}"], dim)

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """AdaLoRA's statistics at the current shapes, plus the expansion generator's state."""
        tensors, values = super().state_dict()
        tensors["generator"] = self.generator.get_state()
        return tensors, values

    def load_state_dict(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        tensors = dict(tensors)
        generator = tensors.pop("generator", None)
        super().load_state_dict(tensors, values)
        if generator is not None:
            self.generator.set_state(generator)

