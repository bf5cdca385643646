"""AdaLoRA's rank allocator, step for step as PEFT 0.21.2's ``RankAllocator`` / ``update_and_allocate``.

Paper: "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", Zhang, Chen, Bukharin, He,
Cheng, Chen, Zhao, ICLR 2023, arXiv:2303.10512.

Importance of every entry w of every rank tensor, from the gradient of the step just taken::

    I = |w ⊙ ∇w|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,   s = Ī ⊙ Ū

Score of component i of a layer (paper Eq. 7; λ = ``lora_E``, Q = ``lora_A``, P = ``lora_B``)::

    S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)      (LoRA, without λ: the two means)

Budget, the number of components kept over all L layers (b₀ = L·init_r, b_T = L·target_r)::

    b(t) = b₀                                                          t ≤ t_init
    b(t) = ⌊b_T + (b₀ − b_T) (1 − (t − t_init) / (T − t_final − t_init))³⌋   t_init < t ≤ T − t_final

The paper's Appendix A writes (t − t_init − t_final)/(T − t_init − t_final), which jumps at t_init: a
typo; the official code and PEFT use the continuous form above, and so do we.

``step(t)``, called after ``optimizer.step()`` and before ``optimizer.zero_grad()``:

    * t < T − t_final: update Ī and Ū; if t > t_init and t % ΔT == 0, zero (mask) every component whose
      score is ≤ the k-th smallest score of all layers, k = (number of components) − b(t), and keep
      every component when k ≤ 0;
    * t = T − t_final: mask to b_T with the statistics as they are, fix that pattern and reset Ī, Ū;
    * t > T − t_final: re-apply the fixed pattern.

Under ``torch.distributed`` the scores are averaged over the processes right before each masking
(:func:`rankwise.allocation.distributed.all_reduce_mean`), so every process takes the same decision;
outside a distributed run nothing changes.

Masking zeroes λ_i (for LoRA, column i of B) in place and keeps the tensors at full size; the
optimiser may revive a masked component until the next masking, exactly as in PEFT. Where we differ
from PEFT, on purpose: k counts the components actually present (PEFT uses b₀, which is wrong for an
adapter resized by a rank pattern, peft#2337), and k ≤ 0 masks nothing (PEFT: a ``kthvalue`` error,
e.g. whenever init_r = target_r).

Orthogonal regulariser, :meth:`AdaLoRAAllocator.regularizer` (add it to the loss before ``backward``)::

    "peft" (default; the official code and PEFT):  w · (1/N) Σ_{A, B} ‖A Aᵀ − I‖_F  resp.  ‖Bᵀ B − I‖_F
    "paper" (Eq. 4):                                w · Σ_layers (‖Pᵀ P − I‖²_F + ‖Q Qᵀ − I‖²_F)

with N the number of A and B tensors. PEFT adds it to ``outputs.loss`` inside the model's forward;
rankwise returns it, and ``RankwiseCallback`` adds it for ``transformers.Trainer``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import check_choice, check_positive_int
from ..core.quantised import is_sharded
from ..core.rank import Allocator, RankComponents, rank_layers
from .distributed import all_reduce_mean

ORTH_REG_FORMS = ("peft", "paper")


def check_schedule(owner: str, *, total_step: Any, target_r: Any, tinit: Any, tfinal: Any, deltaT: Any,
                   beta1: Any, beta2: Any, orth_reg_weight: Any, orth_reg: Any) -> None:
    """``ValueError`` naming the field to change when AdaLoRA's schedule values are invalid."""
    if total_step is None:
        raise ValueError(f"{owner}: total_step is required: set it to the number of optimizer steps of the run")
    check_positive_int(owner, "total_step", total_step)
    check_positive_int(owner, "target_r", target_r)
    check_positive_int(owner, "deltaT", deltaT)
    for name, value in (("tinit", tinit), ("tfinal", tfinal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}: {name} must be an integer >= 0, got {value!r}")
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"{owner}: tinit ({tinit}) + tfinal ({tfinal}) must be < total_step ({total_step}) to leave a budget "
            "phase; lower tinit or tfinal, or raise total_step"
        )
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{owner}: {name} must be in (0, 1), got {value!r}")
    if (isinstance(orth_reg_weight, bool) or not isinstance(orth_reg_weight, (int, float))
            or not math.isfinite(orth_reg_weight) or orth_reg_weight < 0):
        raise ValueError(f"{owner}: orth_reg_weight must be a finite number >= 0, got {orth_reg_weight!r}")
    check_choice(owner, "orth_reg", orth_reg, ORTH_REG_FORMS)


class AdaLoRAAllocator(Allocator):
    """AdaLoRA's importance scores, cubic budget and masking over every layer of one adapted model.

    ``rankwise.allocator(model)`` builds it from an AdaLoRA config (:meth:`from_config`). It also runs
    on LoRA / rsLoRA / DoRA adapters, or any adapter with rank components: ``AdaLoRAAllocator(model,
    total_step=..., target_r=...)``, with b₀ the sum of the layers' ranks.

    Args:
        model: the adapted model.
        total_step, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight: as in PEFT's
            ``AdaLoraConfig`` (see the module docstring).
        orth_reg: ``"peft"`` (default) or ``"paper"``, the form of :meth:`regularizer`.
        init_budget: b₀; the sum of the layers' current ranks when None.
        final: ``{layer: bool mask}``, a fixed final pattern to start from (an adapter imported with
            PEFT's ``rank_pattern``), re-applied at every step after T − t_final.
    """

    #: the method named in error messages (subclasses set their own)
    label = "AdaLoRA"
    #: why the allocator cannot work on adapters sharded by FSDP2's ``fully_shard`` (subclasses set their own)
    sharded_problem = ("its importance scores rank every component of a layer from the whole A, E, B and their "
                       "gradients, and under FSDP2 each process holds a shard of them (not supported yet)")

    def __init__(self, model: nn.Module, *, total_step: int, target_r: int, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.5,
                 orth_reg: str = "peft", init_budget: int | None = None,
                 final: dict[str, Tensor] | None = None) -> None:
        owner = type(self).__name__
        check_schedule(owner, total_step=total_step, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                       beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight, orth_reg=orth_reg)
        self.layers = rank_layers(model, owner)
        self.total_step, self.tinit, self.tfinal, self.deltaT = total_step, tinit, tfinal, deltaT
        self.beta1, self.beta2 = beta1, beta2
        self.orth_reg_weight, self.orth_reg = orth_reg_weight, orth_reg
        self.init_budget = sum(a.r for a in self.layers.values()) if init_budget is None else init_budget
        self.target_budget = target_r * len(self.layers)
        if self.target_budget > self.init_budget:
            raise ValueError(
                f"{owner}: target_r={target_r} over {len(self.layers)} layers asks for {self.target_budget} components, "
                f"more than the {self.init_budget} the layers start with; use target_r <= "
                f"{self.init_budget // len(self.layers)}"
            )
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}
        self.masks: dict[str, Tensor] = {}
        self.final: dict[str, Tensor] | None = final
        self.allocations = 0
        self.last_step: int | None = None

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> AdaLoRAAllocator:
        """The allocator of a model adapted with an ``AdaLoRAConfig`` (b₀ = L·init_r, as PEFT)."""
        layers = rank_layers(model, cls.__name__)
        final = None
        if config.rank_pattern:  # imported at the ranks of a pattern: every present component is kept
            final = {name: torch.ones(adapter.r, dtype=torch.bool) for name, adapter in layers.items()}
        return cls(model, total_step=config.total_step, target_r=config.target_r, tinit=config.tinit,
                   tfinal=config.tfinal, deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2,
                   orth_reg_weight=config.orth_reg_weight, orth_reg=config.orth_reg,
                   init_budget=config.init_r * len(layers), final=final)

    # -- the schedule ----------------------------------------------------------------------------

    def budget(self, step: int) -> tuple[int, bool]:
        """``(b(step), whether step is a masking step)`` (PEFT's ``budget_schedule``)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * (mul_coeff**3) + self.target_budget)
        return budget, step % self.deltaT == 0

    def step(self, global_step: int) -> None:
        """One allocation step (see the module docstring); call it for every optimizer step, in order."""
        self._check_unsharded(global_step)
        end = self.total_step - self.tfinal
        if global_step < end:
            self._check_gradients(global_step)
            self._update_importance()
            budget, mask = self.budget(global_step)
            if mask:
                self._mask_to_budget(budget)
        elif global_step == end:
            self._mask_to_budget(self.budget(global_step)[0])
            self.final = {name: mask.clone() for name, mask in self.masks.items()}
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        else:
            if self.final is None:
                raise ValueError(
                    f"AdaLoRA: step {global_step} is after total_step - tfinal = {end}, but the final allocation at "
                    f"step {end} never ran; call allocator.step for every optimizer step, or set total_step to the "
                    "number of steps actually trained"
                )
            for name, adapter in self.layers.items():
                adapter.mask_components(~self.final[name])
        self.last_step = global_step

    def ranks(self) -> dict[str, int]:
        """Components kept by the latest allocation (every component before the first)."""
        return {name: int(self.masks[name].sum()) if name in self.masks else adapter.r
                for name, adapter in self.layers.items()}

    # -- importance and masking ------------------------------------------------------------------

    def _check_unsharded(self, step: int) -> None:
        """``ValueError`` before anything changes if FSDP2 sharded the adapters (:attr:`sharded_problem`)."""
        sharded = [name for name, adapter in self.layers.items() if any(map(is_sharded, adapter.parameters()))]
        if sharded:
            raise ValueError(
                f"{self.label} allocator.step({step}): the adapters of {sharded[:3]}"
                f"{f' ({len(sharded)} in all)' if len(sharded) > 3 else ''} are sharded by FSDP2's fully_shard, "
                f"and {self.label} cannot allocate on shards: {self.sharded_problem}. Train it on one process or with "
                "DDP (every process holds the whole adapter)"
            )

    def _check_gradients(self, step: int) -> None:
        missing = [f"{name}.{tensor}" for name, adapter in self.layers.items()
                   for tensor, (parameter, _) in adapter.rank_tensors().items() if parameter.grad is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise ValueError(
                f"{self.label} allocator.step({step}): no gradient on {shown}. Call it after loss.backward() and "
                "optimizer.step() and before optimizer.zero_grad() (PEFT's order), and make sure the forward "
                "pass uses every adapted layer"
            )

    @torch.no_grad()
    def _update_importance(self) -> None:
        for name, adapter in self.layers.items():
            for tensor, (parameter, _) in adapter.rank_tensors().items():
                key = f"{name}.{tensor}"
                ipt = (parameter * parameter.grad).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(parameter))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(parameter))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def scores(self) -> dict[str, Tensor]:
        """``{layer: S}``, the score of every component (module docstring), from the current statistics."""
        if not self.exp_avg_ipt:
            raise ValueError(
                f"{self.label}: no importance statistics yet, so no component can be scored; the allocator must see "
                "steps of the budget phase (before total_step - tfinal) first"
            )
        return {name: _component_scores(adapter, self.exp_avg_ipt, self.exp_avg_unc, name)
                for name, adapter in self.layers.items()}

    def agreed_scores(self) -> dict[str, Tensor]:
        """:meth:`scores` averaged over the processes of a distributed run, so that every one decides alike."""
        local = self.scores()
        return dict(zip(local, all_reduce_mean(list(local.values()))))

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` best-scored components of all layers (all of them when they fit the budget)."""
        self.allocations += 1
        k = sum(adapter.r for adapter in self.layers.values()) - budget
        if k <= 0:
            self.masks = {name: torch.ones(adapter.r, dtype=torch.bool) for name, adapter in self.layers.items()}
            return
        scores = self.agreed_scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        for name, adapter in self.layers.items():
            drop = scores[name] <= threshold
            adapter.mask_components(drop)
            self.masks[name] = ~drop

    # -- the regulariser -------------------------------------------------------------------------

    def regularizer(self) -> Tensor:
        """The orthogonality term to add to the loss: ``loss = loss + allocator.regularizer()``."""
        terms = []
        for adapter in self.layers.values():
            a, b = adapter.factors()
            for gram in (a @ a.T, b.T @ b):
                eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                norm = torch.linalg.matrix_norm(gram - eye)
                terms.append(norm if self.orth_reg == "peft" else norm.square())
        total = torch.stack(terms).sum()
        return self.orth_reg_weight * (total / len(terms) if self.orth_reg == "peft" else total)

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"exp_avg_ipt.{k}": v for k, v in self.exp_avg_ipt.items()}
        tensors.update({f"exp_avg_unc.{k}": v for k, v in self.exp_avg_unc.items()})
        tensors.update({f"mask.{k}": v for k, v in self.masks.items()})
        tensors.update({f"final.{k}": v for k, v in (self.final or {}).items()})
        values = {"allocations": self.allocations, "last_step": self.last_step, "has_final": self.final is not None}
        return tensors, values

    def load_state_dict(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for name, adapter in self.layers.items():
            expected[f"mask.{name}"] = expected[f"final.{name}"] = (adapter.r,)
            for tensor, (parameter, _) in adapter.rank_tensors().items():
                for stat in ("exp_avg_ipt", "exp_avg_unc"):
                    expected[f"{stat}.{name}.{tensor}"] = tuple(parameter.shape)
        wrong = sorted(k for k, v in tensors.items() if expected.get(k) != tuple(v.shape))
        if wrong:
            raise ValueError(
                f"the {self.label} allocator state does not fit this model: {wrong[:5]} are unknown or of another "
                "shape; it was saved from a different model or adapter"
            )

        def pick(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

        self.exp_avg_ipt = self._on_devices(pick("exp_avg_ipt"))
        self.exp_avg_unc = self._on_devices(pick("exp_avg_unc"))
        self.masks = pick("mask")
        self.final = pick("final") if values.get("has_final") else None
        self.allocations = int(values.get("allocations", 0))
        self.last_step = values.get("last_step")

    def _on_devices(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {f"{name}.{tensor}": parameter for name, adapter in self.layers.items()
                  for tensor, (parameter, _) in adapter.rank_tensors().items()}
        return {k: v.to(params[k]) for k, v in stats.items()}


def _component_scores(adapter: RankComponents, ipt: dict[str, Tensor], unc: dict[str, Tensor], name: str) -> Tensor:
    """S_i for one layer: per-component tensors (λ) added to the sum of the other tensors' means (P, Q).

    The sums are formed in PEFT's order, s(λ) + (mean s(A) + mean s(B)), so the scores agree bit for bit.
    """
    values: list[Tensor] = []
    vectors: list[Tensor] = []
    for tensor, (parameter, dim) in adapter.rank_tensors().items():
        score = ipt[f"{name}.{tensor}"] * unc[f"{name}.{tensor}"]
        if parameter.numel() == adapter.r:
            values.append(score.reshape(-1))
        else:
            others = [d for d in range(score.dim()) if d != dim]
            vectors.append(score.mean(dim=others).reshape(-1, 1))
    total = torch.cat(vectors, dim=1).sum(dim=1) if vectors else torch.zeros_like(values[0])
    for value in values:
        total = value + total
    return total
