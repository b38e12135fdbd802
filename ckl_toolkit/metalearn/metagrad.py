"""The exact meta-gradient of one inner step, without second-order autograd (ARCHITECTURE.md §2).

φ reaches θ' only through the token weights w, and θ' is an explicit function of w, so one
meta-step reads like the paper's algorithm with the double backward replaced by one
directional derivative:

  1. g  = ∇θ L_in(θ; D, w)             inner gradient of the TWL on the documents (w held fixed)
  2. θ' = θ − u(g)                      one SGD or AdamW step; u is elementwise in g
  3. v  = ∇θ' L_T(θ')                   outer gradient: object-token NLL of the tasks
                                        (+ λ·L_R(θ'): known facts' KL or NLL, the retention term)
  4. z  = u'(g) ⊙ v                     the step's Jacobian is diagonal
  5. d  = ∂/∂ε ℓ(θ + εz) at ε = 0       per-token losses on D along z (forward-mode AD or central differences)
  6. dL/dw_i = −(1/(B·S)) (d_i − Σ_j w_j d_j / S)   per sequence, S = Σ w + 1e-6

The caller pushes the result into φ with ``(w * out.dL_dw).sum().backward()``. Every tensor here
lives on the trainable subset of θ (all base parameters, or LoRA adapters).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.core.losses import (
    WEIGHT_SUM_EPS,
    masked_mean_nll,
    target_mask,
    token_nll,
    token_nll_from_logits,
    weighted_loss,
)
from ckl_toolkit.metalearn.subset import PrefixCache, parse_selector, prefix_layer

Tensors = tuple[torch.Tensor, ...]


@dataclass
class InnerStepConfig:
    """The differentiated inner step θ' = θ − u(g) of the base on the documents."""

    optimizer: str = fld("sgd", "Inner optimizer: plain SGD, or the paper's AdamW.", choices=("sgd", "adamw"))
    lr: float = fld(0.3, "Inner learning rate.")
    betas: tuple[float, float] = fld((0.9, 0.999), "AdamW (β1, β2).")
    weight_decay: float = fld(
        0.0, "Decoupled decay θ ← θ(1 − lr·wd); independent of w, adds nothing to dL/dw."
    )
    eps: float = fld(1e-8, "AdamW: added to the denominator.")
    second_moment_eps: float = fld(
        1e-8, "AdamW: added to the second moment inside the sqrt, as the paper (effective eps ~3e-3)."
    )
    warmup_steps: int = fld(
        0, "Detached steps of the same optimizer on D before the differentiated one (paper: 1); they move θ."
    )
    jacobian: str = fld(
        "closed_form",
        "AdamW's u'(g): closed_form (one fused elementwise expression) or jvp (forward-mode AD per "
        "tensor, the slower check; same numbers).",
        choices=("closed_form", "jvp"),
    )
    params: str | list = fld(
        "all",
        "What the inner step moves, within the trainable parameters: all | top_k_layers:K (last K "
        "decoder layers + final norm) | a list of regex patterns over parameter names.",
    )
    tied_embedding: bool = fld(
        False, "top_k_layers / patterns: also move the input embedding (with tied weights: the LM head)."
    )
    prefix_cache: bool = fld(
        True, "When every moved parameter is at or above layer L0, run layers below L0 once per step."
    )

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        self.betas = tuple(self.betas)
        ok = len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)
        require(ok, "betas", f"must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "eps", "second_moment_eps"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(
            self.optimizer == "sgd" or self.eps + self.second_moment_eps > 0,
            "eps",
            "eps and second_moment_eps cannot both be 0 for adamw (u'(g) is infinite at g=0)",
        )
        ok = isinstance(self.warmup_steps, int) and self.warmup_steps >= 0
        require(ok, "warmup_steps", f"must be an int >= 0, got {self.warmup_steps!r}")
        parse_selector(self.params)  # ValueError "params: ..."


@dataclass
class MetaGradConfig:
    """How the exact meta-gradient dL/dw is computed (ARCHITECTURE.md §2)."""

    inner: InnerStepConfig = field(default_factory=InnerStepConfig)
    method: str = fld(
        "central",
        "jvp: forward-mode AD, exact, needs eager attention; central: fp32 central differences, any kernel.",
        choices=("jvp", "central"),
    )
    fd_eps: float = fld(1e-3, "Central differences: a step of length fd_eps along z (ε = fd_eps / ||z||).")
    mode: str = fld(
        "batched",
        "batched: one joint inner step for the batch; independent: one step per document (the paper).",
        choices=("batched", "independent"),
    )
    normalize: bool = fld(True, "TWL per sequence Σwℓ/Σw (TAALM); false: Σwℓ/n_tokens (CaMeLS).")
    retain_weight: float = fld(
        0.0,
        "λ of the retention term (beyond the paper): the outer loss becomes L_T(θ') + λ·L_R(θ'), L_R "
        "scored on facts the base already knows (data.retain) under the same θ', so φ also learns what "
        "a step costs them. 0: off, the paper's objective.",
    )
    retain_loss: str = fld(
        "kl",
        "L_R: kl = KL(p_θ ‖ p_θ') of the next-token distribution at the known facts' object tokens "
        "(any shift of what the model answers costs, also one that lowers their NLL: a step on text of "
        "the same form lowers it while flipping answers); nll = their object-token NLL under θ'.",
        choices=("kl", "nll"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.inner, dict):  # built by hand from a mapping
            try:
                self.inner = InnerStepConfig(**self.inner)
            except ValueError as e:
                raise ConfigError(f"inner.{e}") from None
        check_choices(self)
        require(self.fd_eps > 0, "fd_eps", f"must be > 0, got {self.fd_eps}")
        require(self.retain_weight >= 0, "retain_weight", f"must be >= 0, got {self.retain_weight}")


@dataclass
class MetaGradOutput:
    """What one meta-step returns; the losses are floats for logging."""

    dL_dw: torch.Tensor  # (B, T-1) d(outer loss)/dw; zero on padding
    outer_loss: float  # mean over the tasks of the object-token NLL under θ'
    inner_loss: float  # TWL on D at θ (before any step)
    outer_loss_before: float  # the same task loss at θ, for logging (nan when not asked for)
    retain_loss: float = math.nan  # L_R under θ' (nan without a retention term)
    retain_loss_before: float = math.nan  # L_R at θ, for logging (nan when not asked for)


@dataclass
class AdamState:
    """Adam moments from the detached warm-up steps; ``step`` counts the steps already taken.

    At ``step`` 0 the moments are zero and ``m``, ``v2`` may be empty: no buffers for a fresh state.
    """

    m: Tensors
    v2: Tensors
    step: int = 0


# ---------------------------------------------------------------------------------------------
# Losses and parameter placement


@torch.no_grad()
def _place(params: Sequence, point: Tensors, deltas: Sequence | None = None, alpha: float = 1.0) -> None:
    """Set the parameters in place to ``point − alpha·deltas``; copying from a saved point is exact."""
    for i, p in enumerate(params):
        p.copy_(point[i])
        if deltas is not None:
            p.sub_(deltas[i], alpha=alpha)


def _named_params(base: nn.Module, params: Sequence[nn.Parameter] | dict[str, nn.Parameter]) -> dict:
    """Names (as ``functional_call`` wants them) of the trainable subset of θ.

    A list and a dict are validated alike: every tensor must be a parameter of ``base``, and a
    dict's name must be the one ``base`` gives that very tensor (another model's parameters would
    silently get zero gradients, and two same-shape tensors swapped behind their names a wrong
    directional derivative).
    """
    by_id = {id(p): n for n, p in base.named_parameters()}
    if isinstance(params, dict):
        foreign = [n for n, p in params.items() if id(p) not in by_id]
        if foreign:
            raise ValueError(f"params {foreign[:3]} are not parameters of the base model")
        misnamed = [f"{n!r} is {by_id[id(p)]!r}" for n, p in params.items() if by_id[id(p)] != n]
        if misnamed:
            raise ValueError(f"params named differently from the base model's parameters: {misnamed[:3]}")
        named = dict(params)
    else:
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"params {missing} are not parameters of the base model")
        named = {by_id[id(p)]: p for p in params}
    frozen = [n for n, p in named.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"trainable params must have requires_grad=True: {frozen[:3]}")
    return named


def _nll(base: nn.Module, ids: torch.Tensor, mask: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1) per-token NLL; from cached bottom-layer states h (B, T, H) when given (prefix cache)."""
    if h is None:
        return token_nll(base, ids, mask)
    return token_nll_from_logits(base(**PrefixCache.kwargs(mask, h)).logits, ids, mask)


def inner_loss(base: nn.Module, doc: tuple, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """L_in = TWL(ℓ(θ; D), w), w a constant. ``doc`` = (ids (B, T), mask (B, T)[, cached states])."""
    return weighted_loss(_nll(base, *_doc3(doc)), w, target_mask(doc[1]), normalize)


def outer_loss(base: nn.Module, task: tuple) -> torch.Tensor:
    """L_T = mean over tasks of the object-token NLL.

    ``task`` = (ids, mask (B, Tt), objects (B, Tt-1)[, cached states (B, Tt, H)]).
    """
    h = task[3] if len(task) > 3 else None
    return masked_mean_nll(_nll(base, task[0], task[1], h), task[2])


def _logits(base: nn.Module, probes: tuple) -> torch.Tensor:
    """(R, Tr-1, V) next-token logits, at least fp32; ``probes`` = (ids, mask, objects[, cached states])."""
    ids, mask = probes[0], probes[1]
    h = probes[3] if len(probes) > 3 else None
    kwargs = PrefixCache.kwargs(mask, h) if h is not None else {"input_ids": ids, "attention_mask": mask}
    logits = base(**kwargs).logits[:, :-1]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def object_log_probs(base: nn.Module, probes: tuple) -> torch.Tensor:
    """(N, V) log p(· | prefix) at the N object tokens of the probes (``probes[2]``, (R, Tr-1) bool)."""
    return torch.log_softmax(_logits(base, probes)[probes[2]], dim=-1)


def retention_loss(base: nn.Module, retain: tuple, teacher: torch.Tensor | None) -> torch.Tensor:
    """L_R on the known facts ``retain`` (shaped like a task batch): with ``teacher`` ((N, V) log p_θ at
    their object tokens, :func:`object_log_probs` at θ) the mean over facts of the mean KL(p_θ ‖ p_θ')
    over each fact's object tokens; without it, their object-token NLL (:func:`outer_loss`)."""
    if teacher is None:
        return outer_loss(base, retain)
    student = object_log_probs(base, retain)  # (N, V)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)  # (N,)
    per_token = torch.zeros(retain[2].shape, dtype=kl.dtype, device=kl.device)
    per_token[retain[2]] = kl  # (R, Tr-1), the KL at object tokens
    return masked_mean_nll(per_token, retain[2])


def outer_objective(base: nn.Module, task: tuple, retain: tuple | None, weight: float, teacher=None):
    """L = L_T + λ·L_R: the tasks' object NLL, plus λ × the known facts' :func:`retention_loss`.
    Returns (L, L_T, L_R or nan) with the two parts as floats for logging.
    """
    loss_t = outer_loss(base, task)
    if retain is None:
        return loss_t, loss_t.item(), math.nan
    loss_r = retention_loss(base, retain, teacher)
    return loss_t + weight * loss_r, loss_t.item(), loss_r.item()


def _doc3(doc: tuple) -> tuple:
    return (doc[0], doc[1], doc[2] if len(doc) > 2 else None)


def value_and_grad(loss: torch.Tensor, params: list) -> tuple[float, Tensors]:
    """(loss, ∇ loss) over the trainable params, into fresh tensors (no ``.grad``); unused params get 0."""
    return loss.item(), torch.autograd.grad(loss, params, materialize_grads=True)


# ---------------------------------------------------------------------------------------------
# The inner step u(g) and its diagonal Jacobian. Everything here works one parameter tensor at a
# time, so the step needs no parameter-sized buffer beyond g, v and the saved θ.

Update = Callable[[int, torch.Tensor], torch.Tensor]  # (tensor index i, g_i) -> u_i(g_i)


def update_fn(cfg: InnerStepConfig, state: AdamState | None) -> Update:
    """u(g) without weight decay: the part of θ − θ' that depends on g (hence on w); elementwise."""
    if cfg.optimizer == "sgd":
        return lambda i, g: cfg.lr * g
    (b1, b2), t = cfg.betas, state.step + 1
    bc1, sqrt_bc2 = 1 - b1**t, math.sqrt(1 - b2**t)

    def adamw(i: int, g: torch.Tensor) -> torch.Tensor:
        m1, v1 = _moments(cfg, state, i, g)
        # The paper's eps inside the sqrt: from a fresh state denom ≈ sqrt(g² + sme/(1−β2)) = sqrt(g² + 1e-5),
        # so |g| ≪ 3e-3 is not blown up to lr·sign(g), and u'(g) is neither ~0 nor infinite at small g.
        denom = torch.sqrt(v1 + cfg.second_moment_eps) / sqrt_bc2 + cfg.eps
        return cfg.lr * (m1 / bc1) / denom

    return adamw


@torch.no_grad()
def apply_step(params: Sequence, point: Tensors, g: Sequence, update: Update, cfg: InnerStepConfig) -> None:
    """In place: θ' = θ − u(g) − lr·wd·θ with θ = point (decoupled decay, as torch.optim.AdamW)."""
    for i, p in enumerate(params):
        p.copy_(point[i]).sub_(update(i, g[i]))
        if cfg.weight_decay:
            p.sub_(point[i], alpha=cfg.lr * cfg.weight_decay)


def _moments(cfg: InnerStepConfig, state: AdamState, i: int, g: torch.Tensor) -> Tensors:
    """(m₁, v₁) of tensor i after this step's gradient g; a fresh state (step 0) has zero moments."""
    b1, b2 = cfg.betas
    if state.step == 0:
        return (1 - b1) * g, (1 - b2) * g * g
    return b1 * state.m[i] + (1 - b1) * g, b2 * state.v2[i] + (1 - b2) * g * g


def fresh_state(cfg: InnerStepConfig, like: Tensors) -> AdamState | None:
    """Zero Adam moments (None for SGD); no buffers: step 0 means zero moments."""
    if cfg.optimizer == "sgd":
        return None
    return AdamState((), (), 0)


def advance_state(cfg: InnerStepConfig, state: AdamState | None, g: Sequence) -> AdamState | None:
    """The Adam moments after one more (detached) step with gradient g."""
    if state is None:
        return None
    moments = [_moments(cfg, state, i, gi) for i, gi in enumerate(g)]
    return AdamState(tuple(m for m, _ in moments), tuple(v for _, v in moments), state.step + 1)


Derivative = Callable[[int, torch.Tensor], torch.Tensor]  # (tensor index i, g_i) -> u_i'(g_i)


def derivative_fn(cfg: InnerStepConfig, state: AdamState) -> Derivative:
    """AdamW's u'(g) in closed form, elementwise (ARCHITECTURE.md §2), for the state ``state``.

    With m₁ = β₁m + (1−β₁)g, v₁ = β₂v₂ + (1−β₂)g², r = √(v₁ + ε_in), q = r/√(1−β₂ᵗ) + ε:
        u  = lr·m₁ / ((1−β₁ᵗ)·q)
        u' = lr/(1−β₁ᵗ) · [ (1−β₁)/q − m₁·(1−β₂)·g / (r·√(1−β₂ᵗ)·q²) ]
    From a fresh state (t = 1, m₁ = (1−β₁)g, v₁ = (1−β₂)g²) and ε = 0, with c = ε_in/(1−β₂):
    u = lr·g/√(g² + c) and u' = lr·c/(g² + c)^{3/2}. Costs a few elementwise passes, no autograd.
    """
    (b1, b2), t = cfg.betas, state.step + 1
    bc1, sqrt_bc2 = 1 - b1**t, math.sqrt(1 - b2**t)
    scale = cfg.lr / bc1

    def du(i: int, g: torch.Tensor) -> torch.Tensor:
        m1, v1 = _moments(cfg, state, i, g)
        r = v1.add_(cfg.second_moment_eps).sqrt_()  # v1's buffer becomes r
        q = r / sqrt_bc2 + cfg.eps
        # (1−β₁)/q − m₁(1−β₂)g/(r·√bc2·q²), built in m₁'s and q's buffers
        second = m1.mul_(g).mul_((1 - b2) / sqrt_bc2).div_(r).div_(q).div_(q)
        return q.reciprocal_().mul_(1 - b1).sub_(second).mul_(scale)

    return du


def step_jacobian_diag(cfg: InnerStepConfig, update: Update, g: list, state: AdamState | None = None) -> list:
    """D = u'(g), the diagonal of ∂θ'/∂g (minus sign aside). Consumes g, reusing its slots.

    SGD: u = lr·g, so D = lr (a number, no buffer). AdamW, ``jacobian: closed_form``: the fused
    elementwise formula of :func:`derivative_fn`; ``jvp``: forward-mode AD of the elementwise update
    with a tangent of ones, tensor by tensor (the same numbers, several times slower; kept as a check).
    """
    closed = cfg.optimizer == "adamw" and cfg.jacobian == "closed_form"
    du = derivative_fn(cfg, state) if closed else None
    for i, gi in enumerate(g):
        if cfg.optimizer == "sgd":
            g[i] = cfg.lr
        elif closed:
            g[i] = du(i, gi)
        else:
            g[i] = torch.func.jvp(lambda x, i=i: update(i, x), (gi,), (torch.ones_like(gi),))[1]
    return g


def inner_step_direction(diag: list, v: list) -> list:
    """z = D ⊙ v = (∂θ'/∂g)ᵀ v up to sign, the direction along which ℓ is differentiated. In place into v."""
    for vi, di in zip(v, diag):
        vi.mul_(di)
    return v


# ---------------------------------------------------------------------------------------------
# The directional derivative of the per-token losses, and dL/dw


def directional_derivative(
    base: nn.Module, named: dict, doc: tuple, z: list, point: Tensors, cfg: MetaGradConfig
) -> torch.Tensor:
    """d = ∂/∂ε ℓ(θ + εz) at ε=0 on the documents, θ = point: d_i = g_i · z. Returns (B, T-1).

    ``jvp`` is exact (forward-mode AD through ``functional_call``; needs ops with forward-mode
    support, e.g. eager attention). ``central`` is (ℓ(θ+εz) − ℓ(θ−εz)) / 2ε with ε = fd_eps/||z||,
    editing the parameters in place and copying θ back: two forwards, any kernel or sharding;
    truncation error O(fd_eps²), rounding O(u·ℓ/fd_eps) with u the unit roundoff (fp32, not bf16).
    """
    ids, mask, h = _doc3(doc)
    with torch.no_grad():
        if cfg.method == "jvp":
            return _jvp_losses(base, named, doc, z)
        params = list(named.values())
        norm = torch.sqrt(sum((zi.double() ** 2).sum() for zi in z)).item()
        # a step of length fd_eps in parameter space. With z = 0 (no outer signal) both forwards still
        # run and give d = 0 exactly: a partitioned base needs every rank in every gathering forward.
        eps = cfg.fd_eps / norm if norm > 0 else cfg.fd_eps
        try:
            _place(params, point, z, alpha=-eps)  # θ + εz
            plus = _nll(base, ids, mask, h)
            _place(params, point, z, alpha=eps)  # θ − εz
            minus = _nll(base, ids, mask, h)
        finally:
            _place(params, point)
        return (plus - minus) / (2 * eps)


def _jvp_losses(base: nn.Module, named: dict, doc: tuple, z: list) -> torch.Tensor:
    ids, mask, h = _doc3(doc)
    names = list(named)
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if h is not None:
        kwargs = PrefixCache.kwargs(mask, h)

    def losses(*theta: torch.Tensor) -> torch.Tensor:  # ℓ as a function of the trainable θ
        out = torch.func.functional_call(base, dict(zip(names, theta)), args=(), kwargs=kwargs)
        return token_nll_from_logits(out.logits, ids, mask)

    try:
        return torch.func.jvp(losses, tuple(p.detach() for p in named.values()), tuple(z))[1]
    except (NotImplementedError, RuntimeError) as err:
        raise RuntimeError(
            "meta.method='jvp' needs forward-mode AD through the base model; load it with "
            "attn_implementation='eager' or use meta.method='central'"
        ) from err


def dl_dw_from_directional(
    d: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, normalize: bool, n_docs: int
) -> torch.Tensor:
    """dL_T/dw from d_i = g_i · z (ARCHITECTURE.md §2).

    With L_in = (1/B) Σ_b Σ_i w_bi ℓ_bi / S_b, S_b = Σ_i w_bi + 1e-6, we have
    ∂g/∂w_bi = (g_bi − ḡ_b)/(B·S_b) and θ' = θ − u(g), so dL_T/dw_bi = −(d_bi − Σ_j w_bj d_bj / S_b)/(B·S_b).
    Unnormalised (CaMeLS): L_in = (1/B) Σ_b Σ_i w_bi ℓ_bi / n_b, so dL_T/dw_bi = −d_bi/(B·n_b).
    In ``independent`` mode each document has its own step (B=1 inside) and the outer loss is the
    mean over the n_docs tasks: the same 1/n_docs factor.

    Args:
        d: (B, T-1) directional derivatives of the per-token losses.
        w: (B, T-1) token weights (detached).
        mask: (B, T-1) bool, the targets that count.
        normalize: the TWL divides by Σw (TAALM) rather than by the token count.
        n_docs: the number of (document, task) pairs the outer loss averages over.

    Returns:
        (B, T-1) dL_T/dw, zero on padding.
    """
    m = mask.to(d.dtype)
    w, d = w.to(d.dtype) * m, d * m
    if normalize:
        s = w.sum(dim=1, keepdim=True) + WEIGHT_SUM_EPS  # (B, 1)
        dl = -(d - (w * d).sum(dim=1, keepdim=True) / s) / s
    else:
        dl = -d / m.sum(dim=1, keepdim=True).clamp(min=1)
    return dl * m / n_docs


# ---------------------------------------------------------------------------------------------
# One meta-step


def _episode(base, named, origin: Tensors, doc, w, task, retain, teacher, cfg: MetaGradConfig, n_docs: int):
    """One differentiated inner step on ``doc`` (one document or the whole batch) from θ = origin.

    Expects the parameters at origin and leaves them there (copied back exactly).
    Returns (dL/dw rows, task loss under θ', inner loss at θ, retention loss under θ' or nan).
    """
    params, inner = list(named.values()), cfg.inner
    state, point, loss_at_theta = fresh_state(inner, origin), origin, None  # point: θ of the diff. step
    for _ in range(inner.warmup_steps):  # detached: w enters θ' only through the differentiated step
        loss, g = value_and_grad(inner_loss(base, doc, w, cfg.normalize), params)
        loss_at_theta = loss if loss_at_theta is None else loss_at_theta
        apply_step(params, point, g, update_fn(inner, state), inner)
        state, point = advance_state(inner, state, g), tuple(p.detach().clone() for p in params)

    loss, g = value_and_grad(inner_loss(base, doc, w, cfg.normalize), params)  # 1. g = ∇L_in(θ)
    loss_at_theta = loss if loss_at_theta is None else loss_at_theta
    update = update_fn(inner, state)
    apply_step(params, point, g, update, inner)  # 2. θ' = θ − u(g) − lr·wd·θ
    diag = step_jacobian_diag(inner, update, g := list(g), state)  # D = u'(g), freeing g tensor by tensor
    del g
    objective, loss_after, retain_after = outer_objective(base, task, retain, cfg.retain_weight, teacher)
    v = torch.autograd.grad(objective, params, materialize_grads=True)  # 3. v = ∇(L_T + λ·L_R)(θ')
    del objective
    z = inner_step_direction(diag, list(v))  # 4. z = D ⊙ v
    del diag, v
    _place(params, point)
    d = directional_derivative(base, named, doc, z, point, cfg)  # 5. d_i = g_i · z
    dl_dw = dl_dw_from_directional(d, w, target_mask(doc[1]), cfg.normalize, n_docs)  # 6.
    if point is not origin:  # after warm-up steps
        _place(params, origin)
    return dl_dw, loss_after, loss_at_theta, retain_after


def meta_gradient(
    base: nn.Module,
    params: Sequence[nn.Parameter] | dict[str, nn.Parameter],
    doc_ids: torch.Tensor,
    doc_mask: torch.Tensor,
    w: torch.Tensor,
    task_ids: torch.Tensor,
    task_mask: torch.Tensor,
    task_obj_mask: torch.Tensor,
    cfg: MetaGradConfig,
    log_before: bool = True,
    retain: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> MetaGradOutput:
    """The exact d(outer loss)/dw of one inner step of ``base`` on the documents.

    The base is left exactly as found: parameters copied back, no ``.grad`` written, train/eval
    flags restored (it runs in eval mode, so no dropout).

    Args:
        base: the causal LM θ (e.g. a HF model, or a peft model with LoRA adapters).
        params: the trainable subset of θ the inner step updates (list, or name -> parameter).
        doc_ids, doc_mask: (B, T) the documents D.
        w: (B, T-1) token weights for the targets of D (detached; no graph is built into it).
        task_ids, task_mask: (B, Tt) the tasks, task b paired with document b.
        task_obj_mask: (B, Tt-1) bool, the object tokens the outer loss scores.
        cfg: inner step, method and mode.
        log_before: also compute the task loss at θ (one more no-grad forward; only for logging).
        retain: (ids, mask (R, Tr), objects (R, Tr-1)) known facts for the retention term, scored
            under every episode's θ' (needs ``cfg.retain_weight`` > 0; required when it is).

    Returns:
        MetaGradOutput with dL_dw (B, T-1) in w's dtype.
    """
    if w.shape != (doc_ids.shape[0], doc_ids.shape[1] - 1):
        raise ValueError(
            f"w must be (B, T-1) = {(doc_ids.shape[0], doc_ids.shape[1] - 1)}, got {tuple(w.shape)}"
        )
    if (retain is None) != (cfg.retain_weight == 0):
        raise ValueError("retain_weight > 0 needs the retention probes (retain), and retain needs it > 0")
    named = _named_params(base, params)
    if cfg.method == "central" and any(p.element_size() < 4 for p in named.values()):
        raise ValueError(
            "meta.method='central' needs fp32 trainable parameters; use fp32 or meta.method='jvp'"
        )
    w, n_docs = w.detach(), doc_ids.shape[0]
    modes = {m: m.training for m in base.modules()}
    origin = tuple(p.detach().clone() for p in named.values())
    base.eval()
    first = prefix_layer(base, named) if cfg.inner.prefix_cache else 0
    cache = PrefixCache(base, first) if first > 0 else None
    try:
        doc, task = (doc_ids, doc_mask), (task_ids, task_mask, task_obj_mask)
        with contextlib.ExitStack() as stack:
            if cache is not None:  # the frozen bottom runs once; every forward below starts at layer L0
                doc, task = (*doc, cache.hidden(*doc)), (*task, cache.hidden(*task[:2]))
                if retain is not None:
                    retain = (*retain, cache.hidden(*retain[:2]))
                stack.enter_context(cache.skipping())
            before = retain_before = math.nan
            teacher = None  # KL retention: what the base answers at θ, the same for every episode
            if retain is not None and cfg.retain_loss == "kl":
                with torch.no_grad():
                    teacher = object_log_probs(base, retain)  # (N, V)
                retain_before = 0.0  # KL(p_θ ‖ p_θ)
            if log_before:
                with torch.no_grad():
                    before = outer_loss(base, task).item()
                    if retain is not None and teacher is None:
                        retain_before = outer_loss(base, retain).item()
            dl_dw, outer, inner, retained = _episodes(
                base, named, origin, doc, w, task, (retain, teacher), cfg, n_docs
            )
    finally:
        _place(list(named.values()), origin)
        for m, training in modes.items():
            m.training = training
    return MetaGradOutput(dl_dw.to(w.dtype), outer, inner, before, retained, retain_before)


def _episodes(base, named, origin: Tensors, doc, w, task, retain: tuple, cfg: MetaGradConfig, n_docs: int):
    """(dL/dw, task loss, inner loss, retention loss) of the batch: one joint step, or one per
    document (the paper), each of those scored on every retention probe. ``retain`` = (probes or
    None, KL teacher or None)."""
    if cfg.mode == "batched":
        return _episode(base, named, origin, doc, w, task, *retain, cfg, n_docs)
    rows = [
        _episode(base, named, origin, _rows(doc, b), w[b : b + 1], _rows(task, b), *retain, cfg, n_docs)
        for b in range(n_docs)
    ]
    outer, inner, retained = (sum(r[i] for r in rows) / n_docs for i in (1, 2, 3))
    return torch.cat([r[0] for r in rows]), outer, inner, retained


def _rows(tensors: tuple, b: int) -> tuple:
    return tuple(t[b : b + 1] for t in tensors)
