"""Per-token losses and the token-weighted loss (ARCHITECTURE.md §2, §4).

Conventions used across the package:
- A batch holds ``input_ids`` and ``attention_mask`` of shape (B, T).
- Per-token quantities live on the *targets* x_1..x_{T-1}, so they have shape (B, T-1):
  position t-1 holds the loss of predicting x_t from x_{<t}.
- The weight of target token x_t comes from the TA model's hidden state at x_t, i.e. the TA output
  at position t, so TA weights (B, T) are sliced to ``w[:, 1:]`` before use.
- Packed rows (several documents in one row) carry ``position_ids`` (B, T) that restart at 0 for each
  document; a document then attends only to itself, and its first token is not a target (it has no
  context of its own), exactly as when it is alone in a row.

The training loss never holds the full (B, T, V) logits: :func:`token_nll` with ``chunk_tokens`` runs
the model's trunk, keeps the hidden states of the real targets only, and applies the LM head and the
cross-entropy to ``chunk_tokens`` of them at a time under activation checkpointing, so forward and
backward hold one (chunk, V) block of fp32 logits at a time (SmolLM2: 49,152 × 4 B per token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Added to the per-sequence weight sum, as in the paper's code, so an all-zero row does not divide by 0.
WEIGHT_SUM_EPS = 1e-6
# Targets per LM-head chunk: 1024 x 49,152 fp32 logits = 201 MB for SmolLM2, held once at a time.
LOSS_CHUNK_TOKENS = 1024
# Config fields of models whose logits are not plain lm_head(hidden): they take the full-logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

Trunk = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def target_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) attention mask -> (B, T-1) mask of the target tokens that count.

    With ``position_ids`` (packed rows), a token at position 0 starts a new document and is no target.
    """
    mask = attention_mask[:, 1:].to(torch.bool) & attention_mask[:, :-1].to(torch.bool)
    if position_ids is not None:
        mask &= position_ids[:, 1:] > 0
    return mask


def model_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of an HF forward: packed rows pass their positions and no 2D mask.

    Transformers then builds a causal mask that keeps each document to itself (its "packed sequence"
    format, as HF's flattening collator uses) -- only when no KV cache is passed: call with
    ``use_cache=False``. Padding sits at the end of a row, after every real token, so a causal mask
    never lets a real token see it.
    """
    if position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids}


def token_nll_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token NLL in nats per target token.

    Args:
        logits: (B, T, V) model outputs.
        input_ids: (B, T).
        attention_mask: (B, T); padded targets get loss 0.

    Returns:
        (B, T-1) losses, zero where the target is padding.
    """
    # at least fp32 (bf16 logits lose the loss' small differences); fp64 stays fp64 for exactness tests
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return nll * target_mask(attention_mask).to(nll.dtype)


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int = 0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a causal LM and return its (B, T-1) per-target-token NLL (zero where no target counts).

    Args:
        model: an HF causal LM, a peft model around one, a K-Adapter model, or a DeepSpeed engine of one.
        input_ids: (B, T).
        attention_mask: (B, T).
        position_ids: (B, T) per-document positions of packed rows (None: one document per row).
        chunk_tokens: > 0: the LM head and cross-entropy run over this many targets at a time and the
            full logits never exist (models whose logits are not plain ``lm_head(hidden)`` fall back to
            the full path); 0: the full (B, T, V) logits, as the model's own forward returns them.
        positions: (B, T-1) bool, the only targets to compute (others get 0): on the chunked path the
            LM head and cross-entropy never run elsewhere (TA-gated sparse updates); None: every target.
    """
    mask = target_mask(attention_mask, position_ids)  # (B, T-1)
    if positions is not None:
        mask = mask & positions
    parts = lm_trunk_and_head(model) if chunk_tokens > 0 else None
    if parts is None:
        inputs = model_inputs(input_ids, attention_mask, position_ids)
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        nll = token_nll_from_logits(logits, input_ids, attention_mask)
        return nll if position_ids is None and positions is None else nll * mask.to(nll.dtype)
    trunk, head = parts
    hidden = trunk(input_ids, attention_mask, position_ids)  # (B, T, H)
    return chunked_nll(head, hidden[:, :-1], input_ids[:, 1:], mask, chunk_tokens)


def chunked_nll(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Per-target NLL of ``head(hidden)`` without the full logits.

    Only the masked positions are computed; each chunk's logits are recomputed in backward
    (non-reentrant activation checkpointing), so autograd keeps only the (N, H) hidden states.

    Args:
        head: the LM head (any module mapping (..., H) to (..., V)).
        hidden: (B, T-1, H) the hidden state that predicts each target.
        targets: (B, T-1) token ids.
        mask: (B, T-1) bool, the targets that count.
        chunk_tokens: targets per chunk.

    Returns:
        (B, T-1) NLL in nats (at least fp32), zero where ``mask`` is False.
    """
    h, t = hidden[mask], targets[mask]  # (N, H), (N,) in row-major order
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for lo in range(0, h.size(0), chunk_tokens):
        args = (head, h[lo : lo + chunk_tokens], t[lo : lo + chunk_tokens])
        pieces.append(checkpoint(_head_nll, *args, use_reentrant=False) if grad else _head_nll(*args))
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=dtype)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)  # (B, T-1)


def _head_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # (n, V) in the model's dtype, as its own forward computes them
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="none")  # (n,)


def lm_trunk_and_head(model: nn.Module) -> tuple[Trunk, nn.Module] | None:
    """(trunk, head) with ``logits = head(trunk(ids, mask, positions))``; None if the model has no such split.

    Unwraps a DeepSpeed engine (``.module``) and a peft model (``get_base_model``); a K-Adapter model
    says it itself (``lm_trunk_and_head``); an HF causal LM is its decoder and output embeddings unless
    its config transforms the logits (soft-capping, logit scales).
    """
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model  # DeepSpeed
    if hasattr(inner, "get_base_model"):  # peft: the HF model with the adapters injected
        inner = inner.get_base_model()
    if hasattr(inner, "lm_trunk_and_head"):
        return inner.lm_trunk_and_head()
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is inner:
        return None

    def trunk(input_ids, attention_mask, position_ids):
        inputs = model_inputs(input_ids, attention_mask, position_ids)
        return decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)

    return trunk, head


def weighted_loss(
    nll: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """The token-weighted loss (TWL).

    normalize=True (TAALM): per sequence sum(w*l) / (sum(w) + 1e-6), then the batch mean.
    normalize=False (CaMeLS): per sequence sum(w*l) / n_tokens, so the weights also set the step size.

    Args:
        nll: (B, T-1) per-token losses.
        weights: (B, T-1) token weights (>= 0).
        mask: (B, T-1) bool, the targets that count (padding excluded).
        normalize: divide by the weight sum instead of the token count.

    Returns:
        A scalar.
    """
    w = weights * mask.to(weights.dtype)
    num = (w * nll).sum(dim=1)  # (B,)
    if normalize:
        den = w.sum(dim=1) + WEIGHT_SUM_EPS
    else:
        den = mask.sum(dim=1).clamp(min=1).to(nll.dtype)
    return (num / den).mean()


def masked_mean_nll(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the marked tokens of each row, then over rows: the outer (task) loss.

    Args:
        nll: (B, T-1) per-token losses.
        mask: (B, T-1) bool, e.g. the object tokens of a probe.
    """
    m = mask.to(nll.dtype)
    return ((nll * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
