"""RecAdam (Chen et al., 2020): Adam with an annealed quadratic pull back to the starting weights.

The objective is λ(t)·L_task + (1−λ(t))·γ/2·‖θ−θ*‖², with θ* the weights training started from.
Adam's moments see only the task gradient; the penalty's gradient (1−λ)·γ·(θ−θ*) is applied as a
plain, un-normalised step::

    θ ← θ − lr·[ λ(t)·m̂/(√v̂ + ε)  +  (1−λ(t))·γ·(θ−θ*)  +  weight_decay·θ ]
    λ(t) = 1 / (1 + exp(−k·(t − t0)))      t = 1 on the first step

Early (t ≪ t0) the pull dominates and θ stays near θ*; late (t ≫ t0) it is AdamW. Every parameter
the optimizer steps gets the penalty (the released TAALM baseline put every LoRA matrix in a group
with anneal weight 0, so it ran plain Adam — ARCHITECTURE.md §7). Set ``gamma=0`` in a param group to exempt
it on purpose.

Where θ* lives. The anchor of a tensor is a copy of that tensor taken the first time the optimizer
steps it, i.e. its value before any update, and it is kept in ``optimizer.state[p]["anchor"]`` so
``state_dict()``/``load_state_dict()`` carry it and a resumed run continues bit-identically. It is
taken at the first step rather than at construction on purpose: DeepSpeed (ZeRO-1/2/3) builds its
own fp32 master copies after the client optimizer exists, empties the client optimizer's param
groups, and at each step puts the rank's flat fp32 partition in them. The first tensor this optimizer
ever steps is therefore that partition, holding the starting weights of exactly the elements this
rank updates, so the anchor is sharded like the Adam moments and costs one fp32 copy of the
partition. A copy taken at construction would instead hold full (or, under ``zero.Init``, empty)
client tensors, and their orphaned state entries would break DeepSpeed's ``optimizer.state_dict()``.
Without DeepSpeed the two choices agree unless the weights change between construction and the first
step — and then the first-step copy is the right one (e.g. a checkpoint loaded after building the
optimizer). DeepSpeed's universal-checkpoint conversion keeps only Adam's known state keys and would
drop the anchors; its regular ZeRO checkpoints keep them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch.optim import Optimizer

# lr·γ is the fraction of θ−θ* one early step removes; at 2 or more the pull overshoots and diverges.
MAX_PULL_STEP = 2.0


def recadam_lambda(step: int, k: float, t0: float) -> float:
    """The annealing coefficient λ(t) = 1 / (1 + exp(−k·(t − t0))), in [0, 1].

    Args:
        step: the optimizer step t (1 on the first update).
        k: steepness of the sigmoid.
        t0: the step at which λ = 0.5.

    Returns:
        λ(t) as a Python float, computed without overflow for any t.
    """
    x = k * (step - t0)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # x < 0: exp(−x) could overflow, exp(x) cannot
    return e / (1.0 + e)


def _check_group(group: dict) -> None:
    lr, gamma = group["lr"], group["gamma"]
    if lr < 0:
        raise ValueError(f"RecAdam: lr={lr} must be >= 0")
    if gamma < 0:
        raise ValueError(f"RecAdam: gamma={gamma} must be >= 0")
    if not 0.0 <= group["betas"][0] < 1.0 or not 0.0 <= group["betas"][1] < 1.0:
        raise ValueError(f"RecAdam: betas={group['betas']} must each be in [0, 1)")
    if group["eps"] <= 0:
        raise ValueError(f"RecAdam: eps={group['eps']} must be > 0")
    if group["weight_decay"] < 0:
        raise ValueError(f"RecAdam: weight_decay={group['weight_decay']} must be >= 0")
    if lr * gamma >= MAX_PULL_STEP:
        raise ValueError(
            f"RecAdam: lr*gamma = {lr}*{gamma} = {lr * gamma:g} >= {MAX_PULL_STEP}: each early step "
            f"multiplies θ−θ* by (1 − lr·γ), so the pull toward the anchors diverges. Lower lr or gamma "
            f"(with gamma={gamma:g}, lr must be below {MAX_PULL_STEP / gamma:g})."
        )


class RecAdam(Optimizer):
    """Adam whose step is annealed between a pull to the anchors θ* and the task update.

    Args:
        params: parameters or param groups. A group may override ``gamma``, ``anneal_k``,
            ``anneal_t0`` (e.g. ``gamma=0`` for a freshly initialised head that has no prior).
        lr: learning rate; scales both the Adam update and the pull.
        betas: Adam's (β1, β2).
        eps: Adam's ε, added to √v̂.
        weight_decay: decoupled (AdamW) decay, applied to θ_t.
        anneal_k: steepness k of λ(t).
        anneal_t0: step t0 at which λ = 0.5.
        gamma: strength γ of the quadratic penalty γ/2·‖θ−θ*‖².
        anchors: optional explicit θ*, a mapping from parameter to a tensor of its shape. Parameters
            not in the mapping are anchored at their first step (see the module docstring). Not for
            DeepSpeed: there the optimizer steps flat partitions, not these parameters.

    Raises:
        ValueError: on an invalid hyper-parameter (naming it), lr·gamma >= 2, or an anchor whose
            shape does not match its parameter.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        anneal_k: float = 0.5,
        anneal_t0: float = 250,
        gamma: float = 5000.0,
        anchors: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, anneal_k=anneal_k, anneal_t0=anneal_t0,
            gamma=gamma,
        )  # fmt: skip
        super().__init__(params, defaults)  # validates each group through add_param_group
        stepped = {id(p) for group in self.param_groups for p in group["params"]}
        for p, anchor in (anchors or {}).items():
            if id(p) not in stepped:
                raise ValueError("RecAdam: anchors has a tensor that is not one of the optimized params")
            if anchor.shape != p.shape:
                raise ValueError(
                    f"RecAdam: anchor of shape {tuple(anchor.shape)} for a parameter of {tuple(p.shape)}"
                )
            self.state[p]["anchor"] = anchor.detach().to(device=p.device, dtype=p.dtype, copy=True)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "anchor" not in state:
            # θ* = the value before this optimizer's first update (under ZeRO: the fp32 partition).
            state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient (others are skipped, as in Adam)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("RecAdam does not support sparse gradients")
        state = self._init_state(p)
        state["step"] += 1
        t = state["step"]
        lr, (beta1, beta2) = group["lr"], group["betas"]
        lam = recadam_lambda(t, group["anneal_k"], group["anneal_t0"])

        # Adam moments from the task gradient only (the penalty is not fed through them).
        grad = p.grad
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])

        pull = (1 - lam) * group["gamma"]
        drift = p.sub(state["anchor"]) if pull != 0 else None  # θ_t − θ*, before θ moves
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr * lam / bias_correction1)
        if drift is not None:
            p.add_(drift, alpha=-lr * pull)
