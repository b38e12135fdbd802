"""RHO-1 selective language modelling (Lin et al., 2024) as 0/1 token weights.

Train only on the tokens the model has most left to learn: rank every non-padding target token of
the batch by its excess loss ℓ_θ − ℓ_ref (ℓ_ref from the reference model, here the model before the
update) and keep the top ``keep_ratio`` of them. Two defects of the released TAALM baseline are
avoided (ARCHITECTURE.md §7): it used ``argsort`` indices as if they were ranks, which scrambles the kept set,
and it kept the largest probability gain, i.e. the opposite sign of excess loss.

Per-token tensors are (B, T-1) over target tokens, as in ``ckl_toolkit.core.losses``.
"""

from __future__ import annotations

import math

import torch

# keep_ratio·n is computed in floating point: 0.6·10 = 6.000000000000001 must keep 6, not 7.
CEIL_SLACK = 1e-9


def rho1_keep_count(n_valid: int, keep_ratio: float) -> int:
    """Tokens kept out of ``n_valid``: ceil(keep_ratio · n_valid), so any non-empty batch keeps >= 1."""
    return min(n_valid, math.ceil(keep_ratio * n_valid - CEIL_SLACK))


def rho1_weights(
    nll: torch.Tensor, ref_nll: torch.Tensor, mask: torch.Tensor, keep_ratio: float
) -> torch.Tensor:
    """0/1 weights selecting the top ``keep_ratio`` tokens of the batch by excess loss.

    The ranking is over the whole batch, not per sequence. Ties are broken by position: the token
    earlier in row-major (batch, time) order wins, so the selection is deterministic.

    Args:
        nll: (B, T-1) per-token loss of the model being trained (ℓ_θ); not differentiated through.
        ref_nll: (B, T-1) per-token loss of the reference model (ℓ_ref).
        mask: (B, T-1) bool, the targets that count; padding is never kept.
        keep_ratio: fraction in (0, 1] of the non-padding tokens to keep; the count is
            ``rho1_keep_count(n_valid, keep_ratio)`` (ceil).

    Returns:
        (B, T-1) float weights in {0, 1} (dtype of ``nll``), exactly ``rho1_keep_count`` ones.

    Raises:
        ValueError: on a keep_ratio outside (0, 1], mismatched shapes, or NaN in a counted loss.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"rho1.keep_ratio={keep_ratio}: must be in (0, 1]")
    if nll.shape != ref_nll.shape or nll.shape != mask.shape:
        raise ValueError(
            f"rho1: nll {tuple(nll.shape)}, ref_nll {tuple(ref_nll.shape)}, mask {tuple(mask.shape)}"
        )
    excess = (nll.detach() - ref_nll.detach()).flatten()  # (B·(T-1),) high = still to learn
    valid = mask.flatten().to(torch.bool).nonzero().squeeze(1)  # (n_valid,) flat positions
    scores = excess[valid]
    if torch.isnan(scores).any():
        raise ValueError("rho1: NaN in the per-token losses of counted tokens")
    # Stable sort: equal scores keep their position order, which is the tie-break.
    order = torch.sort(scores, descending=True, stable=True).indices  # (n_valid,) best first
    kept = valid[order[: rho1_keep_count(valid.numel(), keep_ratio)]]  # flat positions of the top k
    weights = torch.zeros(nll.numel(), dtype=nll.dtype, device=nll.device)
    weights[kept] = 1.0
    return weights.view_as(nll)


def rho1_loss(nll: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ kept ℓ / n_kept over the whole batch (0 when nothing is kept).

    Args:
        nll: (B, T-1) per-token losses, differentiable.
        weights: (B, T-1) 0/1 weights from ``rho1_weights``.

    Returns:
        A scalar: the mean loss of the kept tokens.
    """
    return (weights * nll).sum() / weights.sum().clamp(min=1)
