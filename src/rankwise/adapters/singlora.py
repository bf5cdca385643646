"""SingLoRA: low-rank adaptation with a single matrix, ΔW ∝ A Aᵀ.

Paper: "SingLoRA: Low Rank Adaptation Using a Single Matrix", Bensaïd, Rotstein, Velich, Bensaïd,
Kimmel, arXiv:2507.05566 (no official code; community reference: the ``peft-singlora`` package).

Formula (W ∈ R^{m×n}, y = x Wᵀ + b, d = max(m, n), A ∈ R^{d×r} = ``singlora_A``)::

    ΔW(t) = (α/r) · u(t) · A[:m] A[:n]ᵀ,      u(t) = min(t / T, 1)   (T = ramp_up_steps)
    y     = base(x) + (α/r) · u · (dropout(x) A[:n]) A[:m]ᵀ    (u = u(t + 1) in training, u(t) in eval)

For a square layer this is the paper's Eq. (8), (α/r)·u(t)·A Aᵀ. For m ≠ n it is the paper's §4.4
rule (A sized by the larger side, the smaller side uses its first rows), with α/r and u(t) applied as
in Eq. (8); peft-singlora computes the same matrix in both of its branches. The forward costs
r(m + n) MACs per token, like LoRA, and never builds the m×n matrix (peft-singlora does).
Trainable parameters per layer: max(m, n) · r.

The ramp-up clock (the question every implementation gets wrong):
    * ``singlora_step`` is a persistent int64 buffer: the number of *optimizer steps* that have
      updated A. It is saved by ``rankwise.save`` / any ``state_dict`` and restored on load, so a
      resumed run continues its ramp.
    * It advances by itself: a global ``torch.optim`` step post-hook adds one to the clock of every
      live SingLoRA adapter whose A is in the stepping optimizer and has a gradient. Why the
      optimizer and not a forward counter (kyegomez): the paper's t is the optimisation step
      (§4.1); a forward counter runs ahead under gradient accumulation, gradient checkpointing
      (recomputed forwards) and evaluation inside training; a step skipped by AMP's GradScaler
      (inf gradients) does not call ``optimizer.step`` and so is not counted either. Optimizers that
      do not hold A itself (DeepSpeed's flattened copies) do not see it: call
      :meth:`SingLoRAAdapter.set_step` from the training loop there.
    * Which t a forward uses: a training-mode forward computes the gradient of optimizer step
      ``singlora_step + 1`` (1-based, so the very first step already has a non-zero gradient; with
      t = 0 it would be exactly zero, a wasted step the paper does not discuss), i.e. it uses
      u(t + 1) with t = ``singlora_step``. An eval-mode forward, :meth:`~SingLoRAAdapter.ramp`,
      ``delta_weight`` and ``merge`` use u(t), in either mode: they describe the model after
      ``singlora_step`` updates, the same u as the last training forward; at step 0 the model is
      exactly the base model. So a merged model computes what the unmerged model computes in eval
      mode at that moment (as in peft-singlora, whose forward and merge read one counter).
    * The forward's ramp is a device tensor (no ``.item()``), so there is no host sync and no graph
      break; only merge reads it on the host, for its warning.

Merge bakes in u at merge time and records it; unmerge subtracts exactly what merge added, even if
the clock moved in between. A merged layer never adds its update again (peft-singlora 0.2.0 does).
Merging while u < 1 warns, because the merged weight then holds a partial update.

Decisions and differences from peft-singlora 0.2.0 (each checked against its source):
    * Init ``"paper"`` (default): A ~ U(−1/√d, 1/√d), Kaiming-uniform(a=√5) with fan-in d, the
      Θ(d^{-1/2}) entry scale the paper's width analysis requires (§3.2, §4.2). ``"peft_singlora"``
      reproduces the community scale (fan-in r, bound 1/√r, ≈√(d/r) times larger entries).
    * ``ramp_up_steps`` is honoured (peft-singlora ignores the config value and always uses 1000).
      Default T = 1000, the paper's value for RoBERTa/GPT-2 (§6.1); the paper's main runs use 1% of
      the total steps and find 0.5%–8% equally good (appendix A.1), so set it from the run length.
      ``ramp_up_steps=0`` is the explicit opt-in to no ramp (u ≡ 1): the model then moves away from
      the base model at the first forward, because A Aᵀ ≠ 0 for any non-zero A.
    * α may be negative (the update is then negative semi-definite on square layers); α = 0 is
      rejected because it disables the adapter.
    * r > min(m, n) raises: the update's rank cannot exceed min(m, n), the extra columns are wasted.
    * Linear and transformers Conv1D only (the paper defines weight matrices only).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..core.config import AdapterConfig, check_choice, check_dropout, check_positive_int, config_field
from ..core.layer import Adapter
from ..core.registry import register


@dataclass(kw_only=True)
class SingLoRAConfig(AdapterConfig):
    """SingLoRA hyper-parameters (paper defaults: r = α = 8, lr 1e-3 for A)."""

    method = "singlora"
    quantised_base = True  # runs on a bitsandbytes 4-/8-bit base (rankwise.core.quantised)

    r: int = config_field(8, "rank of A (trainable parameters per layer: max(out, in) * r)")
    alpha: float = config_field(8.0, "scaling numerator: s = alpha / r; negative flips the sign of the update")
    dropout: float = config_field(0.0, "dropout probability on the adapter branch's input")
    ramp_up_steps: int = config_field(
        1000, "T in u(t) = min(t/T, 1), counted in optimizer steps; about 1% of the run; 0 = no ramp (u = 1)"
    )
    init_weights: str = config_field(
        "paper", "'paper': A ~ U(-1/sqrt(d), 1/sqrt(d)), d = max(out, in); 'peft_singlora': bound 1/sqrt(r)"
    )

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha == 0:
            raise ValueError(f"{owner}: alpha must be a finite non-zero number (the paper uses alpha = r), got {self.alpha!r}")
        check_dropout(owner, self.dropout)
        if isinstance(self.ramp_up_steps, bool) or not isinstance(self.ramp_up_steps, int) or self.ramp_up_steps < 0:
            raise ValueError(
                f"{owner}: ramp_up_steps must be an integer >= 0 (about 1% of the training steps; 0 switches the "
                f"ramp off), got {self.ramp_up_steps!r}"
            )
        check_choice(owner, "init_weights", self.init_weights, ["paper", "peft_singlora"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class SingLoRAAdapter(Adapter):
    """ΔW = (α/r)·u(t)·A[:m]A[:n]ᵀ applied as two thin matmuls; the clock advances with the optimizer."""

    conv_as_patches = True  # ungrouped convolutions too, through their flattened kernel (core.layer.conv_patches)

    def __init__(self, base: nn.Module, config: SingLoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        m, n = self.out_features, self.in_features
        if config.r > min(m, n):
            raise self.fail(
                f"rank r={config.r} exceeds min(out, in)={min(m, n)}, so A[:m]A[:n]ᵀ cannot use it",
                f"Use r <= {min(m, n)} or exclude this layer from targets",
            )
        self.r = config.r
        self.scaling = config.scaling
        self.ramp_up_steps = config.ramp_up_steps
        self.singlora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        width = max(m, n)
        bound = 1.0 / math.sqrt(width if config.init_weights == "paper" else self.r)
        self.singlora_A = nn.Parameter(torch.empty(width, self.r).uniform_(-bound, bound))
        self.register_buffer("singlora_step", torch.zeros((), dtype=torch.int64))
        self._merged_ramp: Tensor | None = None
        _track(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies (``copy.deepcopy``, unpickling) skip ``__init__``; they need the clock too."""
        super().__setstate__(state)
        _track(self)

    # -- the clock -----------------------------------------------------------------------------

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """Set the number of optimizer steps taken (for loops whose optimizer does not hold A)."""
        if step < 0:
            raise ValueError(f"SingLoRA layer '{self.layer_name}': the step must be >= 0, got {step}")
        self.singlora_step.fill_(step)

    def ramp(self, ahead: bool = False) -> Tensor:
        """u(t) = min(t / T, 1) as a 0-dim tensor, t = steps taken; ``ahead``: u(t + 1), the step
        a training forward computes the gradient of."""
        dtype = self.singlora_A.dtype
        if self.ramp_up_steps == 0:
            return torch.ones((), dtype=dtype, device=self.singlora_A.device)
        t = self.singlora_step.to(dtype) + (1 if ahead else 0)
        return (t / self.ramp_up_steps).clamp(max=1.0)

    # -- the math ------------------------------------------------------------------------------

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        A = self.singlora_A
        hidden = F.linear(self.singlora_dropout(x), A[: self.in_features].T) * (self.scaling * self.ramp(self.training))
        return torch.addmm(
            base_out.reshape(-1, self.out_features), hidden.reshape(-1, self.r), A[: self.out_features].T
        ).view(base_out.shape)

    def _update(self, ramp: Tensor) -> Tensor:
        A = self.singlora_A
        return (self.scaling * ramp) * (A[: self.out_features] @ A[: self.in_features].T)

    def delta_weight(self) -> Tensor:
        return self._update(self.ramp())

    def merged_weight(self, weight: Tensor) -> Tensor:
        ramp = self.ramp().detach().clone()
        if ramp.item() < 1.0:
            warnings.warn(
                f"SingLoRA layer '{self.layer_name}' is merged at u(t)={ramp.item():.4g} < 1 (step "
                f"{int(self.singlora_step)}, ramp_up_steps={self.ramp_up_steps}); the merged weight holds "
                "that fraction of the update",
                stacklevel=2,
            )
        self._merged_ramp = ramp
        return weight + self._update(ramp).to(weight.dtype)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        if self._merged_ramp is None:
            raise ValueError(f"SingLoRA layer '{self.layer_name}' was not merged by rankwise, so it cannot be unmerged")
        delta = self._update(self._merged_ramp).to(weight.dtype)
        self._merged_ramp = None
        return weight - delta

    @classmethod
    def expected_num_params(cls, out_features: int, in_features: int, config: SingLoRAConfig) -> int:
        return max(out_features, in_features) * config.r

    def describe(self) -> str:
        return f"r={self.r}, s={self.scaling:g}, T={self.ramp_up_steps}, step={int(self.singlora_step)}"


# ----------------------------------------------------------------------------------------------
# The optimizer-step clock: one global hook, a weak set of live adapters.
# ----------------------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[SingLoRAAdapter] = weakref.WeakSet()
_HOOK: list[Any] = []


def _track(adapter: SingLoRAAdapter) -> None:
    _LIVE.add(adapter)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))


@torch.no_grad()
def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Advance the clock of every adapter whose A this optimizer has just updated."""
    if not _LIVE:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    for adapter in list(_LIVE):
        if id(adapter.singlora_A) in stepped:
            adapter.singlora_step.add_(1)


register("singlora", SingLoRAConfig, SingLoRAAdapter)
