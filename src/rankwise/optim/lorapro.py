"""LoRA-Pro: AdamW on the low-rank "equivalent gradient" closest to the full fine-tuning gradient.

Paper: "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", Wang, Liang, He, Wang, Tan, ICLR 2025,
arXiv:2407.18242. Official code: mrflogs/LoRA-Pro (``peta/optim.py`` at 2d8f44a for both modes, the
DeepSpeed ZeRO fork at fe26027 for the current full mode).

Per adapted layer, W = W₀ + s·B·A with A ∈ R^{r×n}, B ∈ R^{m×r}, and G = ∂L/∂W (m×n, never
formed): the factor gradients are g_A = s·Bᵀ·G and g_B = s·G·Aᵀ. A step of (g_A, g_B) moves W, to
first order, along the equivalent gradient s·(B·g_A + g_B·A). LoRA-Pro replaces the pair by the one
whose equivalent gradient is closest to G in Frobenius norm (Theorem 2.1), for any X ∈ R^{r×r}
(the adapters are found through their ``TwoFactors`` declaration, :mod:`rankwise.optim.factors`; for
DoRA and BoRA, accepted only with ``directions=True``, W is their direction V and G = ∂L/∂V)::

    ĝ_A = (1/s²)·(BᵀB)⁻¹·g_A + X·A
    ĝ_B = (1/s²)·(I − P_B)·g_B·(AAᵀ)⁻¹ − B·X,          P_B = B(BᵀB)⁻¹Bᵀ
    s·(B·ĝ_A + ĝ_B·A) = P_B·G + (I − P_B)·G·P_A,        P_A = Aᵀ(AAᵀ)⁻¹A   (whatever X is)

and X is chosen to keep (ĝ_A, ĝ_B) closest to (g_A, g_B): the solution of the Sylvester equation
(BᵀB)·X + X·(AAᵀ) = −(1/s²)·(BᵀB)⁻¹·g_A·Aᵀ. With eigendecompositions BᵀB = U·diag(λ)·Uᵀ and
AAᵀ = V·diag(μ)·Vᵀ, X = U·[(Uᵀ·C·V)_ij / (λ_i + μ_j)]·Vᵀ. Everything above is computed from r×r
matrices and factor-sized products (P_B·g_B = B·((BᵀB)⁻¹·(Bᵀg_B))), so no m×n matrix is built.

Every Gram matrix is damped by δ (``damping``, 1e-8 as in the official code): BᵀB + δI and AAᵀ + δI,
in the inverses and in the Sylvester equation alike. This keeps the first step defined when B = 0
(standard LoRA init); otherwise it moves the result by O(δ/λ_min). Layers of one shape are adjusted
together: the r×r work runs batched in float64, the factor-sized products as batched matmuls in the
factors' dtype (float32 for half-precision factors). A non-finite Gram matrix or gradient raises
``ValueError`` before anything is updated.

Two modes (both in the official ``peta/optim.py``; the spec is /work/shared/methods/lorapro.md):

* ``"efficient"`` (default): ĝ_A, ĝ_B with the Sylvester X, then ordinary AdamW on A and B with
  those gradients (moments shaped like A and B; decoupled weight decay A, B ← (1 − ηλ)·A, B).
  Memory: LoRA's.
* ``"full"``: Adam in W space. G̃ = s·(B·ĝ_A + ĝ_B·A) with X = 0; M ← β₁M + (1−β₁)G̃,
  V ← β₂V + (1−β₂)G̃²; D = M̂/(√V̂ + ε); then D is treated as the full gradient: g_A' = s·BᵀD,
  g_B' = s·D·Aᵀ, adjusted again (Sylvester X) and applied as plain SGD, A ← A − η·ĝ_A. Weight decay
  multiplies A and B by √(1 − ηλ), so s·B·A decays by (1 − ηλ) as AdamW would decay it. **This mode
  keeps two m×n moments per layer (the mode's definition: full fine-tuning's Adam memory) and builds
  G̃ and D transiently, one layer at a time**; everything else stays r×r or factor-sized.

Other trainable tensors (DoRA's magnitude, a LoRA bias, ``modules_to_save`` heads) get plain AdamW in
the same optimizer, with the same hyper-parameters (they sit in the last parameter group).

Step 0 is step 0: Adam's bias correction uses t = 1 on the first update, and the first adjustment
is the general (damped) formula, which at B = 0 is exactly the paper's step-0 case (ĝ_A = g_A = 0,
ĝ_B = (1/s²)·g_B·(AAᵀ + δI)⁻¹). Where the official code differs:

* its DeepSpeed path increments the step counter before the adjustment, so its step-0 branch never
  runs and the bias correction is one step late (first normalised full-mode step ≈ 0.74, not 1);
* it keeps the full-mode moments and step counter outside ``state_dict`` (lost on resume); here all
  of it is optimizer state and ``load_state_dict`` resumes exactly;
* it hard-codes s = 2 in the DeepSpeed path; here s is read from every layer (rsLoRA included);
* its older full mode also decays the frozen base weight W₀ in place; here the base is never
  modified (decay acts on the adapter, i.e. towards the pretrained weights);
* it solves the Sylvester equation with a complex ``torch.linalg.eig`` on undamped Gram matrices in
  the factors' dtype; here symmetric eigendecompositions in float64 on damped ones (same X up to
  O(δ/λ));
* it pairs A with B by parameter order; here pairs come from the adapted layers
  (:func:`~rankwise.optim.factors.two_factor_pairs`).

Gradient clipping (``torch.nn.utils.clip_grad_norm_`` before ``step()``) acts on the raw factor
gradients; the adjustment sees the clipped ones.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .factors import FactorPair, two_factor_pairs

MODES = ("efficient", "full")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factor-sized products run in float32 for half-precision factors, else in the factors' dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_finite(stacked: Tensor, names: Sequence[str], what: str) -> None:
    """``ValueError`` naming the first layer whose r×r matrices (last two dims of ``stacked``) are not finite."""
    finite = torch.isfinite(stacked).flatten(start_dim=-2).all(dim=-1)
    if bool(finite.all()):
        return
    bad = int((~finite).reshape(-1, len(names)).any(dim=0).nonzero()[0])
    raise ValueError(
        f"LoRA-Pro: non-finite {what} in layer '{names[bad]}'; no parameter was updated. Lower the learning "
        "rate, check the loss for inf/NaN, or clip gradients"
    )


class _Geometry:
    """The adjustment for a batch of factor pairs of one shape, dtype and device, as batched matmuls.

    Stacks the factors (A: N×r×n, B: N×m×r), eigendecomposes the damped Gram matrices
    BᵀB + δI = U·diag(λ)·Uᵀ and AAᵀ + δI = V·diag(μ)·Vᵀ (float64) and derives the r×r operators
    (1/s²)(BᵀB + δI)⁻¹ and (1/s²)(AAᵀ + δI)⁻¹ of every pair.
    """

    def __init__(self, pairs: Sequence[FactorPair], dampings: Sequence[float], dtype: torch.dtype) -> None:
        self.names = [pair.name for pair in pairs]
        self.dtype = dtype
        self.A = torch.stack([pair.A.detach() for pair in pairs]).to(dtype)
        self.B = torch.stack([pair.B.detach() for pair in pairs]).to(dtype)
        grams = torch.stack([self.A @ self.A.mT, self.B.mT @ self.B]).double()
        _check_finite(grams, self.names, "factor (A or B)")
        eigenvalues, vectors = torch.linalg.eigh(grams)
        damping = torch.tensor(dampings, dtype=torch.float64, device=grams.device)[:, None]
        eigenvalues = eigenvalues.clamp_min(0) + damping
        (self.mu, self.lam), (self.V, self.U) = eigenvalues, vectors
        k = torch.tensor([1 / pair.scaling**2 for pair in pairs], dtype=torch.float64, device=grams.device)
        self.k = k[:, None, None]
        self.inv_A = (self.V / self.mu[:, None, :]) @ self.V.mT  # (AAᵀ + δI)⁻¹
        self.inv_B = (self.U / self.lam[:, None, :]) @ self.U.mT  # (BᵀB + δI)⁻¹
        self.left = (self.k * self.inv_B).to(dtype)
        self.right = (self.k * self.inv_A).to(dtype)

    def adjust(self, grads_A: Tensor, grads_B: Tensor, optimal_x: bool) -> tuple[Tensor, Tensor]:
        """Stacked (ĝ_A, ĝ_B) from stacked (g_A, g_B), with the Sylvester X (``optimal_x``) or X = 0."""
        grads_A, grads_B = grads_A.to(self.dtype), grads_B.to(self.dtype)
        products = torch.stack([grads_A @ self.A.mT, self.B.mT @ grads_B]).double()  # g_A·Aᵀ, Bᵀ·g_B
        _check_finite(products, self.names, "gradient")
        gA_At, Bt_gB = products.unbind(0)
        # ĝ_B = (1/s²)·g_B·(AAᵀ)⁻¹ − B·T with T = (1/s²)·(BᵀB)⁻¹·Bᵀg_B·(AAᵀ)⁻¹ + X
        T = self.k * self.inv_B @ Bt_gB @ self.inv_A
        hat_A = self.left @ grads_A
        if optimal_x:
            X = self.sylvester(gA_At)
            T = T + X
            hat_A = hat_A.baddbmm_(X.to(self.dtype), self.A)
        hat_B = torch.baddbmm(grads_B @ self.right, self.B, T.to(self.dtype), alpha=-1)
        return hat_A, hat_B

    def sylvester(self, gA_At: Tensor) -> Tensor:
        """X solving (BᵀB + δI)·X + X·(AAᵀ + δI) = C, C = −(1/s²)·(BᵀB + δI)⁻¹·g_A·Aᵀ (batched, float64).

        In the eigenbases X̃ = Uᵀ·X·V solves λ_i·X̃_ij + X̃_ij·μ_j = (Uᵀ·C·V)_ij, and Uᵀ·C·V is
        −(1/s²)·diag(1/λ)·Uᵀ·(g_A·Aᵀ)·V.
        """
        rhs = -self.k * (self.U.mT @ gA_At @ self.V) / self.lam[:, :, None]
        return self.U @ (rhs / (self.lam[:, :, None] + self.mu[:, None, :])) @ self.V.mT


def adjusted_gradients(
    A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scaling: float, damping: float = 1e-8,
    optimal_x: bool = True,
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's (ĝ_A, ĝ_B) for one layer (see the module docstring); X from the Sylvester equation or 0.

    A is (r, n), B is (m, r), the gradients have the factors' shapes; nothing m×n is formed.
    """
    geometry = _Geometry([FactorPair(A, B, scaling, "")], [damping], _work_dtype(A.dtype))
    hat_A, hat_B = geometry.adjust(grad_A[None], grad_B[None], optimal_x)
    return hat_A[0], hat_B[0]


class LoRAPro(torch.optim.Optimizer):
    """AdamW on LoRA-Pro's adjusted gradients, for every two-factor adapter of a model.

    ``LoRAPro(model, lr=..., ...)`` takes the adapted model, not a parameter list: the optimizer has to
    know which tensors pair up as (A, B) and each pair's scaling s, which a parameter list does not
    say (PEFT's LoRA+ and Riemannian optimizers take the model for the same reason). It builds one
    parameter group per adapted layer (``params = [A, B]``, ``name`` = the layer's path) and one last
    group ``"other trainable tensors"`` for everything else that requires grad (plain AdamW). Groups
    behave as in any torch optimizer: learning-rate schedulers set every group's ``lr``, a group's
    hyper-parameters can be edited, and ``add_param_group`` adds plain-AdamW groups. Everything the
    optimizer keeps (moments, step counts, hyper-parameters) is in ``state_dict()``, so saving it with
    the adapter (``rankwise.save``) and loading both back resumes training exactly::

        model = rankwise.adapt(model, rankwise.LoRAConfig(r=8, alpha=16, targets="all-linear"))
        optimizer = rankwise.LoRAPro(model, lr=2e-4)          # mode="full" for Adam in W space
        loss.backward(); optimizer.step(); optimizer.zero_grad()

    Args:
        model: a model adapted with a two-factor method whose update is ΔW = s·B·A (``lora``, rsLoRA,
            rank patterns, PiSSA / OLoRA, ``gora``).
        lr: η.
        betas: (β₁, β₂) of Adam.
        eps: ε of Adam.
        weight_decay: λ, decoupled as in AdamW (see the module docstring for the full mode).
        mode: ``"efficient"`` (default; moments shaped like A and B) or ``"full"`` (m×n moments).
        damping: δ added to the Gram matrices AAᵀ and BᵀB before they are inverted.
        directions: also adjust adapters whose s·B·A is added to a rescaled direction (``dora``,
            ``bora``): the equivalent gradient then approximates ∂L/∂V, the direction's gradient, not
            the full fine-tuning gradient of W' (:mod:`rankwise.optim.factors`). Off by default, and
            such a model is then a ``ValueError``.

    Raises:
        ValueError: a bad hyper-parameter, or a model without trainable two-factor adapters (the
            message names the methods found and the supported ones), or a DoRA / BoRA model without
            ``directions=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "efficient",
        damping: float = 1e-8,
        directions: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, mode, damping)
        pairs = [pair for pair in two_factor_pairs(model, directions) if pair.A.requires_grad]
        if not pairs:
            raise ValueError(f"{type(model).__name__}: every two-factor adapter is frozen; LoRA-Pro has nothing to "
                             "adjust. Make the adapters trainable (rankwise.adapt does) or use plain AdamW")
        paired = {id(t) for pair in pairs for t in (pair.A, pair.B)}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
        groups = [{"params": [pair.A, pair.B], "name": pair.name} for pair in pairs]
        if others:
            groups.append({"params": others, "name": "other trainable tensors"})
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "mode": mode,
                    "damping": damping}
        super().__init__(groups, defaults)
        self.pairs = pairs

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, after checking that the saved groups are this model's layers, in order."""
        saved = [group.get("name") for group in state_dict["param_groups"]]
        ours = [group.get("name") for group in self.param_groups]
        if saved != ours:
            raise ValueError(f"LoRAPro.load_state_dict: the state was saved for the parameter groups {saved}, this "
                             f"optimizer has {ours}; build the optimizer on a model adapted like the saved one")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter that has a gradient (a pair is skipped when neither factor has one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pair_groups = self.param_groups[: len(self.pairs)]
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i, (group, pair) in enumerate(zip(pair_groups, self.pairs)):
            if pair.A.grad is None and pair.B.grad is None:
                continue
            if pair.A.grad is None or pair.B.grad is None:
                raise ValueError(f"LoRA-Pro: layer '{pair.name}' has a gradient for only one factor; both A and B "
                                 "must take part in the backward pass")
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["mode"],
                                   group["damping"])
            batches[group["mode"], pair.A.shape, pair.B.shape, pair.A.device, _work_dtype(pair.A.dtype)].append(i)
        # Every check (hyper-parameters, finiteness of factors and gradients) runs before any update.
        prepared = []
        for (mode, *_, dtype), indices in batches.items():
            pairs = [self.pairs[i] for i in indices]
            geometry = _Geometry(pairs, [pair_groups[i]["damping"] for i in indices], dtype)
            grads = [torch.stack([getattr(p, factor).grad for p in pairs]) for factor in "AB"]
            prepared.append((mode, indices, geometry, *geometry.adjust(*grads, optimal_x=mode == "efficient")))
        adamw: dict[tuple, tuple[dict, list[Tensor], list[Tensor]]] = {}
        for mode, indices, geometry, hat_A, hat_B in prepared:
            if mode == "full":
                self._full_step([pair_groups[i] for i in indices], [self.pairs[i] for i in indices], geometry,
                                hat_A, hat_B)
                continue
            for i, grad_A, grad_B in zip(indices, hat_A.unbind(0), hat_B.unbind(0)):
                _add_update(adamw, pair_groups[i], [self.pairs[i].A, self.pairs[i].B], [grad_A, grad_B])
        for group in self.param_groups[len(self.pairs):]:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                _add_update(adamw, group, params, [p.grad for p in params])
        for group, params, grads in adamw.values():
            self._adamw(group, params, grads)
        return loss

    def _adamw(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """torch's AdamW update (decoupled decay, bias-corrected moments) of ``params`` with ``grads``.

        ``group`` gives the hyper-parameters; every tensor keeps its own step count.
        """
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        grads = [g.to(p.dtype) for g, p in zip(grads, params)]
        if decay:
            torch._foreach_mul_(params, 1 - lr * decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in steps])

    def _full_step(
        self, groups: list[dict], pairs: list[FactorPair], geometry: _Geometry, grads_A: Tensor, grads_B: Tensor
    ) -> None:
        """Full mode: Adam on G̃ = s(B·ĝ_A + ĝ_B·A) in W space, then SGD with the re-adjusted s·BᵀD, s·D·Aᵀ.

        The m×n tensors (G̃, D) are built one layer at a time, so the transient memory is one layer's.
        """
        weight_grads_A, weight_grads_B = [], []
        for group, pair, A, B, hat_A, hat_B in zip(groups, pairs, geometry.A, geometry.B, grads_A, grads_B):
            (beta1, beta2), s = group["betas"], pair.scaling
            state = self.state[pair.A]
            if "weight_exp_avg" not in state:
                shape = (B.shape[0], A.shape[1])
                state.update(step=0, weight_exp_avg=A.new_zeros(shape), weight_exp_avg_sq=A.new_zeros(shape))
            state["step"] += 1
            t = state["step"]
            equivalent = torch.addmm(torch.mm(B, hat_A), hat_B, A, beta=s, alpha=s)  # G̃, m×n
            state["weight_exp_avg"].lerp_(equivalent, 1 - beta1)
            state["weight_exp_avg_sq"].mul_(beta2).addcmul_(equivalent, equivalent, value=1 - beta2)
            del equivalent
            denom = state["weight_exp_avg_sq"].sqrt().div_(math.sqrt(1 - beta2**t)).add_(group["eps"])
            scaled_direction = state["weight_exp_avg"].div(denom).mul_(s / (1 - beta1**t))  # s·D, m×n
            del denom
            weight_grads_A.append(torch.mm(B.T, scaled_direction))
            weight_grads_B.append(torch.mm(scaled_direction, A.T))
        steps_A, steps_B = geometry.adjust(torch.stack(weight_grads_A), torch.stack(weight_grads_B), optimal_x=True)
        for group, pair, step_A, step_B in zip(groups, pairs, steps_A, steps_B):
            lr, decay = group["lr"], group["weight_decay"]
            for factor, update in ((pair.A, step_A), (pair.B, step_B)):
                if decay:
                    factor.mul_(math.sqrt(1 - lr * decay))
                factor.add_(update.to(factor.dtype), alpha=-lr)


def _add_update(
    buckets: dict[tuple, tuple[dict, list[Tensor], list[Tensor]]], group: dict, params: list[Tensor],
    grads: list[Tensor],
) -> None:
    """Queue an AdamW update, bucketed by hyper-parameters so that each bucket is one set of foreach calls."""
    key = (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
    _, queued_params, queued_grads = buckets.setdefault(key, (group, [], []))
    queued_params.extend(params)
    queued_grads.extend(grads)


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, mode: str, damping: float
) -> None:
    problems = []
    if not lr >= 0:
        problems.append(f"lr={lr} (needs lr >= 0)")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        problems.append(f"betas={betas} (needs two values in [0, 1))")
    if not eps >= 0:
        problems.append(f"eps={eps} (needs eps >= 0)")
    if not (weight_decay >= 0 and lr * weight_decay <= 1):
        problems.append(f"weight_decay={weight_decay} (needs 0 <= weight_decay and lr·weight_decay <= 1)")
    if mode not in MODES:
        problems.append(f"mode={mode!r} (choose one of {list(MODES)})")
    if not damping > 0:
        problems.append(f"damping={damping} (needs damping > 0: B = 0 at LoRA's init makes BᵀB singular)")
    if problems:
        raise ValueError("LoRAPro: invalid " + "; ".join(problems))
