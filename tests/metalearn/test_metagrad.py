"""ckl_toolkit.metalearn.metagrad against the second-order reference (reference_metagrad.py).

A tiny Llama that really computes in fp64 (see ``exact_fp64_llama``), B=2 documents of 10 tokens
with padding in one row, tasks of 8 tokens with padding in the other. jvp must agree with the
double backward to rounding (measured ~1e-15 relative); central differences in fp64 with
fd_eps=1e-5 to ~1e-9 (truncation O(fd_eps²) ~1e-10, rounding O(1e-16/fd_eps) ~1e-11).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ckl_toolkit.core.losses import masked_mean_nll, target_mask, token_nll, weighted_loss
from ckl_toolkit.metalearn.metagrad import (
    AdamState,
    InnerStepConfig,
    MetaGradConfig,
    advance_state,
    apply_step,
    fresh_state,
    meta_gradient,
    step_jacobian_diag,
    update_fn,
)
from ckl_toolkit.metalearn.subset import decoder_layers, prefix_layer, select_inner_params
from tests.metalearn.reference_metagrad import exact_fp64_llama, reference_meta_gradient

B, T, TT, VOCAB = 2, 10, 8, 64
TOL = {"jvp": 1e-9, "central": 1e-7}  # relative to max |dL/dw|; measured ~1e-15 and ~1e-9
FD_EPS_FP64 = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    doc_mask = torch.ones(B, T, dtype=torch.long)
    doc_mask[1, 7:] = 0  # padding in one document
    task_mask = torch.ones(B, TT, dtype=torch.long)
    task_mask[0, 6:] = 0  # and in the other task
    obj = torch.zeros(B, TT - 1, dtype=torch.bool)
    obj[0, 3:5], obj[1, 4:7] = True, True
    return {
        "doc_ids": torch.randint(0, VOCAB, (B, T), generator=g),
        "doc_mask": doc_mask,
        "w": torch.rand(B, T - 1, generator=g, dtype=torch.float64) * 0.98 + 0.01,  # in (0, 1)
        "task_ids": torch.randint(0, VOCAB, (B, TT), generator=g),
        "task_mask": task_mask,
        "task_obj_mask": obj,
    }


def _lora(model: nn.Module) -> nn.Module:
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).to(torch.float64)
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, which makes every grad of A zero
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict:
    return {"full": exact_fp64_llama(), "lora": _lora(exact_fp64_llama())}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_cfg(optimizer: str, method: str, mode: str, **kw) -> MetaGradConfig:
    if optimizer == "sgd":
        inner = InnerStepConfig(optimizer="sgd", lr=0.3)
    else:  # the paper's: one detached warm-up step; decay to check it adds nothing to dL/dw
        inner = InnerStepConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, warmup_steps=1)
    return MetaGradConfig(inner=inner, method=method, mode=mode, fd_eps=FD_EPS_FP64, **kw)


def run_both(model: nn.Module, batch: dict, cfg: MetaGradConfig, params=None):
    params = trainable(model) if params is None else params
    out = meta_gradient(model, params, cfg=cfg, **batch)
    w = batch["w"].clone().requires_grad_(True)
    named = params if isinstance(params, dict) else trainable(model)
    ref, ref_loss = reference_meta_gradient(model, named, cfg=cfg, **{**batch, "w": w})
    return out, ref, ref_loss


@pytest.mark.parametrize("which", ["full", "lora"])
@pytest.mark.parametrize("mode", ["independent", "batched"])
@pytest.mark.parametrize("method", ["jvp", "central"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_matches_second_order_reference(models, batch, optimizer, method, mode, which):
    model = models[which]
    out, ref, ref_loss = run_both(model, batch, make_cfg(optimizer, method, mode))
    assert ref.abs().max() > 1e-6  # a non-trivial gradient
    assert rel_err(out.dL_dw, ref) < TOL[method]
    assert out.dL_dw.shape == batch["w"].shape and out.dL_dw.dtype == batch["w"].dtype
    assert torch.all(out.dL_dw[~target_mask(batch["doc_mask"])] == 0)  # zero on padding
    assert out.outer_loss == pytest.approx(ref_loss, rel=1e-12)
    with torch.no_grad():  # the logged losses are the ones at θ
        nll = token_nll(model, batch["doc_ids"], batch["doc_mask"])
        inner = weighted_loss(nll, batch["w"], target_mask(batch["doc_mask"])).item()
        before = masked_mean_nll(
            token_nll(model, batch["task_ids"], batch["task_mask"]), batch["task_obj_mask"]
        )
    assert out.inner_loss == pytest.approx(inner, rel=1e-12)
    assert out.outer_loss_before == pytest.approx(before.item(), rel=1e-12)
    assert out.outer_loss != pytest.approx(out.outer_loss_before, rel=1e-9)  # the step did something


@pytest.mark.parametrize(
    "optimizer,method,mode", [("sgd", "jvp", "batched"), ("adamw", "central", "independent")]
)
def test_unnormalized_twl_matches_reference(models, batch, optimizer, method, mode):
    out, ref, _ = run_both(models["full"], batch, make_cfg(optimizer, method, mode, normalize=False))
    assert rel_err(out.dL_dw, ref) < TOL[method]


def test_params_as_list_equals_dict(models, batch):
    model, cfg = models["lora"], make_cfg("sgd", "jvp", "batched")
    as_list = meta_gradient(model, list(trainable(model).values()), cfg=cfg, **batch)
    as_dict = meta_gradient(model, trainable(model), cfg=cfg, **batch)
    assert torch.equal(as_list.dL_dw, as_dict.dL_dw)


@pytest.mark.parametrize("method,fd_eps,tol", [("central", 1e-3, 1e-2), ("jvp", 1e-3, 1e-5)])
def test_fp32_error_is_what_we_claim(models, batch, method, fd_eps, tol):
    """fp32 is what users run. Central differences there trade truncation (fd_eps²) against
    rounding of the two forwards (~1e-7·ℓ/fd_eps): measured 7e-4 (SGD) and 2.3e-3 (AdamW) relative
    at the default fd_eps=1e-3, best ~2e-4 near fd_eps=3e-3..1e-2. jvp in fp32: ~3e-7."""
    model32 = copy.deepcopy(models["full"]).float()
    for optimizer in ("sgd", "adamw"):
        cfg = make_cfg(optimizer, method, "batched")
        cfg.fd_eps = fd_eps
        out = meta_gradient(model32, trainable(model32), cfg=cfg, **{**batch, "w": batch["w"].float()})
        w = batch["w"].clone().requires_grad_(True)
        ref, _ = reference_meta_gradient(
            models["full"], trainable(models["full"]), cfg=cfg, **{**batch, "w": w}
        )
        assert rel_err(out.dL_dw, ref) < tol


@pytest.mark.parametrize("which", ["full", "lora"])
@pytest.mark.parametrize("method", ["jvp", "central"])
def test_base_left_exactly_as_found(models, batch, which, method):
    model = models[which]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    first = next(m for m in model.modules() if m is not model)
    first.eval()  # a mixed train/eval state must come back as it was
    modes = {m: m.training for m in model.modules()}
    try:
        cfg = make_cfg("adamw", method, "independent")
        meta_gradient(model, trainable(model), cfg=cfg, **batch)
        after_modes = {m: m.training for m in model.modules()}
    finally:
        model.eval()
    assert after_modes == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


class EmbeddingPhi(nn.Module):
    """A tiny φ: one logit per vocabulary entry, w = sigmoid."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 1, dtype=torch.float64)
        nn.init.normal_(self.emb.weight, 1.0, 1.0, generator=torch.Generator().manual_seed(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.emb(ids).squeeze(-1))[:, 1:]  # (B, T-1): position t weights target x_t


@pytest.mark.parametrize("optimizer,mode", [("adamw", "independent"), ("sgd", "batched")])
def test_surrogate_backward_gives_phi_the_reference_gradient(models, batch, optimizer, mode):
    model, cfg = models["full"], make_cfg(optimizer, "jvp", mode)
    phi = EmbeddingPhi()
    w = phi(batch["doc_ids"])  # (B, T-1), carries φ's graph
    out = meta_gradient(model, trainable(model), cfg=cfg, **{**batch, "w": w})
    assert phi.emb.weight.grad is None  # meta_gradient built no graph into w
    (w * out.dL_dw).sum().backward()  # the surrogate
    ours = phi.emb.weight.grad.clone()

    phi.zero_grad(set_to_none=True)
    ref, _ = reference_meta_gradient(
        model, trainable(model), cfg=cfg, **{**batch, "w": phi(batch["doc_ids"])}
    )
    theirs = torch.autograd.grad((phi(batch["doc_ids"]) * ref).sum(), phi.emb.weight)[
        0
    ]  # = dL/dφ by the chain rule through w
    assert theirs.abs().max() > 0
    assert rel_err(ours, theirs) < 1e-9


def test_zero_outer_signal_gives_zero_gradient(models, batch):
    no_objects = {**batch, "task_obj_mask": torch.zeros_like(batch["task_obj_mask"])}
    for method in ("jvp", "central"):
        out = meta_gradient(
            models["full"], trainable(models["full"]), cfg=make_cfg("sgd", method, "batched"), **no_objects
        )
        assert torch.all(out.dL_dw == 0)


def test_adamw_effective_eps_from_fresh_state():
    """The paper's 1e-8 inside the sqrt: from a fresh state u = lr·g/sqrt(g² + 1e-8/(1−β2)),
    an effective eps of sqrt(1e-5) ≈ 3.16e-3; a stock Adam step is ≈ lr·sign(g) however small g is."""
    cfg = InnerStepConfig(optimizer="adamw", lr=1.0)
    fresh = AdamState((torch.zeros(4, dtype=torch.float64),), (torch.zeros(4, dtype=torch.float64),))
    g = torch.tensor([1e-5, 1e-3, math.sqrt(1e-5), 1.0], dtype=torch.float64)
    u = update_fn(cfg, fresh)(0, g)
    assert torch.allclose(u, g / torch.sqrt(g**2 + 1e-5), rtol=1e-4)
    assert u[2].item() == pytest.approx(1 / math.sqrt(2), rel=1e-4)  # |u| = lr/√2 at |g| = eps_eff
    stock = update_fn(InnerStepConfig(optimizer="adamw", lr=1.0, second_moment_eps=0.0), fresh)(0, g)
    assert stock[0].item() > 0.99 and stock[1].item() > 0.99


def test_adamw_without_inner_eps_is_torch_adamw():
    """With second_moment_eps=0 our step (and state) is torch.optim.AdamW's, decoupled decay included."""
    cfg = InnerStepConfig(
        optimizer="adamw", lr=0.05, betas=(0.8, 0.95), weight_decay=0.1, second_moment_eps=0.0
    )
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    ours, state = p.detach().clone(), AdamState((torch.zeros_like(p),), (torch.zeros_like(p),))
    opt = torch.optim.AdamW([p], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    for _ in range(3):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        apply_step([ours], (ours.clone(),), [g], update_fn(cfg, state), cfg)
        state = advance_state(cfg, state, [g])
        p.grad = g
        opt.step()
    assert torch.allclose(ours, p.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"inner": {"optimizer": "adam"}}, "inner.optimizer"),
        ({"inner": {"lr": 0.0}}, "inner.lr"),
        ({"inner": {"betas": (0.9, 1.0)}}, "inner.betas"),
        ({"inner": {"warmup_steps": -1}}, "inner.warmup_steps"),
        ({"method": "fd"}, "method"),
        ({"mode": "joint"}, "mode"),
        ({"fd_eps": 0.0}, "fd_eps"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}[=:]"):
        MetaGradConfig(**kwargs)


def test_recipe_loader_names_the_dotted_field():
    """Through the recipe loader the section prefix is added: meta.inner.optimizer."""
    from ckl_toolkit.core.config import ConfigError, from_dict

    cfg = from_dict(MetaGradConfig, {"inner": {"optimizer": "adamw", "betas": [0.9, 0.99]}}, prefix="meta.")
    assert cfg.inner.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="meta.inner.optimizer"):
        from_dict(MetaGradConfig, {"inner": {"optimizer": "adam"}}, prefix="meta.")


def test_rejects_bad_inputs(models, batch):
    model = models["full"]
    with pytest.raises(ValueError, match="w must be"):
        meta_gradient(model, trainable(model), cfg=MetaGradConfig(), **{**batch, "w": batch["w"][:, 1:]})
    with pytest.raises(ValueError, match="not parameters of the base"):
        meta_gradient(model, [nn.Parameter(torch.zeros(1))], cfg=MetaGradConfig(), **batch)


def test_dict_params_are_validated_like_a_list(models, batch):
    """A dict of another model's parameters (same names, same shapes) used to give all zeros; two
    same-shape tensors swapped behind their names a wrong directional derivative."""
    model, cfg = models["full"], make_cfg("sgd", "jvp", "batched")
    other = exact_fp64_llama(seed=5)
    with pytest.raises(ValueError, match="not parameters of the base"):
        meta_gradient(model, trainable(other), cfg=cfg, **batch)
    with pytest.raises(ValueError, match="not parameters of the base"):
        meta_gradient(model, list(trainable(other).values()), cfg=cfg, **batch)
    named = trainable(model)
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert named[a].shape == named[b].shape
    swapped = {**named, a: named[b], b: named[a]}
    with pytest.raises(ValueError, match="named differently"):
        meta_gradient(model, swapped, cfg=cfg, **batch)


def test_reference_model_is_causal_and_ignores_padding(models, batch):
    """The equality tests above are only meaningful on a causal, padding-aware model."""
    for model in models.values():
        ids, mask = batch["doc_ids"], batch["doc_mask"]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            last = ids.clone()
            last[:, -1] = (last[:, -1] + 1) % VOCAB
            changed = model(input_ids=last, attention_mask=mask).logits
            assert torch.equal(changed[:, :-1], logits[:, :-1])  # position 0..T-2 never see token T-1
            assert not torch.equal(changed[0, -1], logits[0, -1])  # (row 0 is unpadded: it does)
            left = torch.ones_like(mask)
            left[1, :3] = 0  # left padding: causality alone would let positions 3.. read it
            before = model(input_ids=ids, attention_mask=left).logits
            padded = ids.clone()
            padded[1, :3] = (padded[1, :3] + 3) % VOCAB  # only row 1's padding changes
            after = model(input_ids=padded, attention_mask=left).logits
            assert torch.equal(after[1, 3:], before[1, 3:]) and torch.equal(after[0], before[0])


# ---------------------------------------------------------------------------------------------
# The cheaper meta-step: closed-form AdamW derivative, logging forward on demand, inner subsets


@pytest.mark.parametrize("warm", [0, 2])
def test_closed_form_adamw_derivative_equals_jvp(warm):
    """u'(g) in closed form is the jvp of the update along ones, from a fresh or a warmed state."""
    gen = torch.Generator().manual_seed(7)
    cfg = InnerStepConfig(optimizer="adamw", lr=3e-3, betas=(0.8, 0.95), eps=1e-6, second_moment_eps=1e-8)
    shapes = [(5, 3), (7,)]
    state = fresh_state(cfg, ())
    for _ in range(warm):
        state = advance_state(
            cfg, state, [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        )
    g = [torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 0, s) for s in shapes]
    update = update_fn(cfg, state)
    closed = step_jacobian_diag(cfg, update, [x.clone() for x in g], state)
    jvp = step_jacobian_diag(replace(cfg, jacobian="jvp"), update, [x.clone() for x in g], state)
    for a, b in zip(closed, jvp):  # both round the cancelling terms differently at large |g|
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12 * b.abs().max().item())
    # and the fresh-state form written out: u' = lr·c/(g²+c)^{3/2}, c = ε_in/(1−β2), with ε = 0
    if warm == 0:
        cfg0 = replace(cfg, eps=0.0)
        du = step_jacobian_diag(cfg0, update_fn(cfg0, state), [x.clone() for x in g], state)[0]
        c = cfg.second_moment_eps / (1 - cfg.betas[1])
        assert torch.allclose(du, cfg.lr * c / (g[0] ** 2 + c) ** 1.5, rtol=1e-12)


@pytest.mark.parametrize("which", ["full", "lora"])
@pytest.mark.parametrize("method", ["jvp", "central"])
def test_jvp_jacobian_option_matches_reference(models, batch, method, which):
    cfg = make_cfg("adamw", method, "batched")
    cfg.inner.jacobian = "jvp"
    out, ref, _ = run_both(models[which], batch, cfg)
    assert rel_err(out.dL_dw, ref) < TOL[method]


def test_log_before_false_skips_the_logging_forward(models, batch):
    model, cfg = models["full"], make_cfg("adamw", "jvp", "batched")
    logged = meta_gradient(model, trainable(model), cfg=cfg, **batch)
    quiet = meta_gradient(model, trainable(model), cfg=cfg, log_before=False, **batch)
    assert math.isnan(quiet.outer_loss_before) and not math.isnan(logged.outer_loss_before)
    assert torch.equal(quiet.dL_dw, logged.dL_dw) and quiet.outer_loss == logged.outer_loss


def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


SUBSETS = ["top_k_layers:1", ["layers\\.1\\.mlp", "^model\\.norm"], "top_k_layers:2"]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("spec", SUBSETS)
@pytest.mark.parametrize("which", ["full", "lora"])
@pytest.mark.parametrize(
    "optimizer,method,mode",
    [("adamw", "jvp", "batched"), ("adamw", "central", "independent"), ("sgd", "central", "batched")],
)
def test_inner_subset_matches_reference(batch, optimizer, method, mode, which, spec, cache):
    """The inner step on a subset (with and without the prefix cache) is exact: the reference
    differentiates through a step of that same subset."""
    model = exact_fp64_llama() if which == "full" else _lora(exact_fp64_llama())  # fresh: hooks below
    named = select_inner_params(model, trainable(model), spec)
    assert 0 < len(named) < len(trainable(model)) or (which, spec) == ("lora", "top_k_layers:2")
    assert not any("embed_tokens" in n for n in named)
    cfg = make_cfg(optimizer, method, mode)
    cfg.inner.prefix_cache = cache
    layer0 = _count_calls(decoder_layers(model)[1][0])
    out = meta_gradient(model, named, cfg=cfg, **batch)
    bottom_runs = len(layer0)
    w = batch["w"].clone().requires_grad_(True)
    ref, ref_loss = reference_meta_gradient(model, named, cfg=cfg, **{**batch, "w": w})
    assert ref.abs().max() > 1e-8
    assert rel_err(out.dL_dw, ref) < TOL[method]
    assert out.outer_loss == pytest.approx(ref_loss, rel=1e-10)
    cached = cache and spec != "top_k_layers:2"  # the top 2 of 2 layers leave no prefix
    assert prefix_layer(model, named) == (0 if spec == "top_k_layers:2" else 1)
    # with the cache the bottom layer runs for the documents and the tasks (plus the one-time check)
    assert (bottom_runs <= 3) == cached, bottom_runs


def test_subset_with_tied_embedding_and_bad_selectors(models):
    model = models["full"]
    with_emb = select_inner_params(model, trainable(model), "top_k_layers:1", tied_embedding=True)
    assert "model.embed_tokens.weight" in with_emb and prefix_layer(model, with_emb) == 0
    assert select_inner_params(model, trainable(model), "all") == trainable(model)
    with pytest.raises(ValueError, match="top_k_layers:3 but the base has 2 layers"):
        select_inner_params(model, trainable(model), "top_k_layers:3")
    with pytest.raises(ValueError, match="selects none"):
        select_inner_params(model, trainable(model), ["nothing_here"])
    for bad in ("top_k_layers:0", "top_k_layers:x", ["("]):
        with pytest.raises(ValueError, match="^params"):
            InnerStepConfig(params=bad)


def test_prefix_cache_leaves_the_base_as_found(batch):
    model = exact_fp64_llama()
    layers = list(decoder_layers(model)[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    named = select_inner_params(model, trainable(model), "top_k_layers:1")
    meta_gradient(model, named, cfg=make_cfg("adamw", "central", "batched"), **batch)
    assert list(decoder_layers(model)[1]) == layers  # the skipped layers are back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# The retention term: L_T(θ') + λ·L_R(θ') through the same exact meta-gradient


@pytest.fixture(scope="module")
def retain() -> tuple:
    """3 known-fact probes of 7 tokens, padding in one, objects at different positions."""
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    obj = torch.zeros(3, 6, dtype=torch.bool)
    obj[0, 4:6], obj[1, 2], obj[2, 3] = True, True, True
    return torch.randint(0, VOCAB, (3, 7), generator=g), mask, obj


@pytest.mark.parametrize("kind", ["kl", "nll"])
@pytest.mark.parametrize(
    "which,optimizer,method,mode,spec",
    [
        ("full", "adamw", "jvp", "batched", "all"),
        ("full", "adamw", "central", "independent", "all"),
        ("lora", "sgd", "central", "batched", "all"),
        ("full", "adamw", "central", "batched", "top_k_layers:1"),  # with the prefix cache
    ],
)
def test_retention_term_matches_reference(models, batch, retain, which, optimizer, method, mode, spec, kind):
    model = models[which]
    named = select_inner_params(model, trainable(model), spec)
    cfg = make_cfg(optimizer, method, mode, retain_weight=0.7 if kind == "nll" else 30.0, retain_loss=kind)
    out = meta_gradient(model, named, cfg=cfg, retain=retain, **batch)
    w = batch["w"].clone().requires_grad_(True)
    ref, ref_loss = reference_meta_gradient(model, named, cfg=cfg, retain=retain, **{**batch, "w": w})
    assert rel_err(out.dL_dw, ref) < TOL[method]
    # the term changes dL/dw: without it the reference differs by far more than the tolerance
    plain, _ = reference_meta_gradient(model, named, cfg=replace(cfg, retain_weight=0.0), **{**batch, "w": w})
    assert rel_err(plain, ref) > 1e-3
    # logged parts: L_T + λ·L_R is the objective the reference differentiated
    assert out.outer_loss + cfg.retain_weight * out.retain_loss == pytest.approx(ref_loss, rel=1e-10)
    with torch.no_grad():
        before = masked_mean_nll(token_nll(model, *retain[:2]), retain[2]).item() if kind == "nll" else 0.0
    assert out.retain_loss_before == pytest.approx(before, rel=1e-12)
    assert out.retain_loss > 0 and out.retain_loss != pytest.approx(before, rel=1e-9)  # the step moved them


def test_retention_term_needs_its_weight_and_probes(models, batch, retain):
    model = models["full"]
    with pytest.raises(ValueError, match="retain_weight > 0 needs the retention probes"):
        cfg = make_cfg("sgd", "jvp", "batched", retain_weight=1.0)
        meta_gradient(model, trainable(model), cfg=cfg, **batch)
    with pytest.raises(ValueError, match="retain_weight"):
        meta_gradient(model, trainable(model), cfg=make_cfg("sgd", "jvp", "batched"), retain=retain, **batch)
    with pytest.raises(ValueError, match="retain_weight"):
        MetaGradConfig(retain_weight=-1.0)
    plain = meta_gradient(model, trainable(model), cfg=make_cfg("sgd", "jvp", "batched"), **batch)
    assert math.isnan(plain.retain_loss) and math.isnan(plain.retain_loss_before)
