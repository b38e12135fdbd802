"""The second-order reference for the meta-gradient: what the paper's code does (ARCHITECTURE.md §2).

Differentiates the outer loss through the inner step with ``create_graph=True`` over
``functional_call`` (double backward; eager attention). It shares only the loss definitions with
``ckl_toolkit.metalearn.metagrad`` (``weighted_loss``, ``masked_mean_nll``), so it checks that module's
algebra, its Adam update and its directional derivatives. Used by tests/test_metagrad.py and
benchmarks/bench_metastep.py.

Also here: ``exact_fp64_llama``, a tiny Llama whose forward really is fp64. HF's Llama runs RMSNorm
and the eager softmax in fp32 even for an fp64 model, which caps any comparison at ~1e-7.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ckl_toolkit.core.losses import masked_mean_nll, target_mask, weighted_loss
from ckl_toolkit.metalearn.metagrad import MetaGradConfig


def _nll(base: nn.Module, theta: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) per-token NLL at parameters ``theta`` (the rest of the base as it is), in model precision."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    logits = functional_call(base, theta, args=(), kwargs=kwargs).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    return nll * target_mask(mask).to(nll.dtype)


def _step(theta: dict, grads, m, v2, t: int, cfg) -> tuple[dict, list, list]:
    """One SGD or AdamW step, written out; differentiable in ``grads`` (m, v2 are constants)."""
    new_theta, new_m, new_v2 = {}, [], []
    for (name, p), g, m_i, v_i in zip(theta.items(), grads, m, v2):
        if cfg.optimizer == "sgd":
            upd = cfg.lr * g
        else:
            b1, b2 = cfg.betas
            m_i, v_i = b1 * m_i + (1 - b1) * g, b2 * v_i + (1 - b2) * g * g
            denom = torch.sqrt(v_i + cfg.second_moment_eps) / math.sqrt(1 - b2**t) + cfg.eps
            upd = cfg.lr * (m_i / (1 - b1**t)) / denom
        new_theta[name] = p * (1 - cfg.lr * cfg.weight_decay) - upd
        new_m.append(m_i)
        new_v2.append(v_i)
    return new_theta, new_m, new_v2


def reference_outer_loss(base, theta0: dict, doc, w, task, cfg: MetaGradConfig, retain=None) -> torch.Tensor:
    """The task loss under θ' as a differentiable function of w (create_graph through the step),
    plus ``cfg.retain_weight`` × the retention probes' object NLL under the same θ' when given."""
    (doc_ids, doc_mask), (task_ids, task_mask, obj_mask) = doc, task
    tmask = target_mask(doc_mask)
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in theta0.items()}
    m = [torch.zeros_like(p) for p in theta.values()]
    v2 = [torch.zeros_like(p) for p in theta.values()]
    for t in range(1, cfg.inner.warmup_steps + 1):  # detached warm-up steps (w held fixed)
        loss = weighted_loss(_nll(base, theta, doc_ids, doc_mask), w.detach(), tmask, cfg.normalize)
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta, m, v2 = _step(theta, grads, m, v2, t, cfg.inner)
        theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
    loss = weighted_loss(_nll(base, theta, doc_ids, doc_mask), w, tmask, cfg.normalize)
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)  # g(w), second order
    theta1, _, _ = _step(theta, grads, m, v2, cfg.inner.warmup_steps + 1, cfg.inner)
    loss = masked_mean_nll(_nll(base, theta1, task_ids, task_mask), obj_mask)
    if retain is not None:
        loss = loss + cfg.retain_weight * _retention(base, theta0, theta1, retain, cfg.retain_loss)
    return loss


def _retention(base, theta0: dict, theta1: dict, retain: tuple, kind: str) -> torch.Tensor:
    """The known facts' NLL under θ', or KL(p_θ ‖ p_θ') at their object tokens, written out."""
    ids, mask, obj = retain
    if kind == "nll":
        return masked_mean_nll(_nll(base, theta1, ids, mask), obj)
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    with torch.no_grad():
        p_log = torch.log_softmax(functional_call(base, theta0, args=(), kwargs=kwargs).logits[:, :-1], -1)
    q_log = torch.log_softmax(functional_call(base, theta1, args=(), kwargs=kwargs).logits[:, :-1], -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1) * obj.to(p_log.dtype)  # (R, Tr-1), 0 off the objects
    return masked_mean_nll(kl, obj)


def reference_meta_gradient(
    base,
    params: dict,
    doc_ids,
    doc_mask,
    w,
    task_ids,
    task_mask,
    task_obj_mask,
    cfg: MetaGradConfig,
    retain=None,
) -> tuple[torch.Tensor, float]:
    """(dL/dw (B, T-1), outer loss) by double backward. ``w`` must require grad; base in eval mode.

    ``independent``: each document's step from the same θ, outer loss the mean over the tasks.
    ``retain``: (ids, mask, objects) probes of the retention term, scored after every step.
    """
    doc, task = (doc_ids, doc_mask), (task_ids, task_mask, task_obj_mask)
    if cfg.mode == "batched":
        loss = reference_outer_loss(base, params, doc, w, task, cfg, retain)
        return torch.autograd.grad(loss, w)[0], loss.item()
    n, total, grad = doc_ids.shape[0], 0.0, torch.zeros_like(w)
    for b in range(n):  # one graph at a time keeps the peak memory that of one document
        doc_b, task_b = (tuple(t[b : b + 1] for t in ts) for ts in (doc, task))
        loss = reference_outer_loss(base, params, doc_b, w[b : b + 1], task_b, cfg, retain) / n
        grad += torch.autograd.grad(loss, w)[0]
        total += loss.item()
    return grad, total


# ---------------------------------------------------------------------------------------------
# A tiny Llama that is really fp64


def _exact_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention with the softmax kept in the input dtype (HF rounds it to fp32)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _exact_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_fp64_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 2):
    """A random-init LlamaForCausalLM computing every op in fp64 (norm and softmax included); causal,
    and padded positions (attention_mask 0) are never attended to."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    AttentionInterface.register("eager_fp64", _exact_eager_attention)
    # Without a mask function of its own transformers passes no mask to a registered attention: the
    # model would be bidirectional and read padding. eager's additive mask (0 / dtype min) keeps it
    # causal and padding-aware, in fp64 since the mask takes the embeddings' dtype.
    AttentionMaskInterface.register("eager_fp64", eager_mask)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attn_implementation="eager_fp64",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    for mod in model.modules():
        if isinstance(mod, LlamaRMSNorm):  # per instance: nothing global is patched
            mod.forward = types.MethodType(_exact_rms_norm, mod)
    return model
