"""Per-token losses and the token-weighted loss (ARCHITECTURE.md §2, §4).

Conventions used across the package:
- A batch holds ``input_ids`` and ``attention_mask`` of shape (B, T).
- Per-token quantities live on the *targets* x_1..x_{T-1}, so they have shape (B, T-1):
  position t-1 holds the loss of predicting x_t from x_{<t}.
- The weight of target token x_t comes from the TA model's hidden state at x_t, i.e. the TA output
  at position t, so TA weights (B, T) are sliced to ``w[:, 1:]`` before use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Added to the per-sequence weight sum, as in the paper's code, so an all-zero row does not divide by 0.
WEIGHT_SUM_EPS = 1e-6


def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B, T-1) mask of the target tokens that count."""
    return attention_mask[:, 1:].to(torch.bool) & attention_mask[:, :-1].to(torch.bool)


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


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run a causal LM and return its (B, T-1) per-target-token NLL (zero on padding)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_nll_from_logits(logits, input_ids, attention_mask)


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
