"""RHO-1: exactly the top-k excess-loss tokens of the batch, with the right sign, never padding."""

from __future__ import annotations

import math

import pytest
import torch

from ckl_toolkit.training.rho1 import rho1_keep_count, rho1_loss, rho1_weights


def _brute_force(nll: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Python sort of (−excess, row-major position) over the counted tokens; take the first ceil(k·n)."""
    B, T = nll.shape
    cands = [(-(nll[b, t] - ref[b, t]).item(), b * T + t) for b in range(B) for t in range(T) if mask[b, t]]
    cands.sort()
    k = math.ceil(round(keep_ratio * len(cands), 9))
    out = torch.zeros(B * T)
    for _, pos in cands[:k]:
        out[pos] = 1.0
    return out.view(B, T)


def _mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding


@pytest.mark.parametrize("keep_ratio", [0.1, 0.3, 0.6, 1.0])
def test_keeps_exactly_the_top_k_by_excess_loss(keep_ratio):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        nll, ref = torch.rand(4, 13, generator=gen) * 5, torch.rand(4, 13, generator=gen) * 5
        mask = _mask(4, 13, gen)
        w = rho1_weights(nll, ref, mask, keep_ratio)
        assert torch.equal(w, _brute_force(nll, ref, mask, keep_ratio))
        assert w.sum().item() == rho1_keep_count(int(mask.sum()), keep_ratio)


def test_ties_are_broken_by_position_deterministically():
    nll, ref = torch.full((2, 5), 2.0), torch.ones(2, 5)  # every excess loss is 1
    mask = torch.ones(2, 5, dtype=torch.bool)
    w = rho1_weights(nll, ref, mask, 0.3)  # ceil(3.0) = 3 of 10
    assert torch.equal(w, torch.tensor([[1.0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    # Quantised losses with many ties still match the brute force exactly.
    gen = torch.Generator().manual_seed(1)
    nll, ref = (
        torch.randint(0, 3, (3, 9), generator=gen).float(),
        torch.randint(0, 3, (3, 9), generator=gen).float(),
    )
    mask = _mask(3, 9, gen)
    assert torch.equal(rho1_weights(nll, ref, mask, 0.4), _brute_force(nll, ref, mask, 0.4))


def test_never_keeps_padding():
    nll = torch.tensor([[1.0, 2.0, 100.0, 100.0], [0.5, 0.4, 0.3, 100.0]])  # padding has huge loss
    ref = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    w = rho1_weights(nll, ref, mask, 1.0)
    assert torch.equal(w, mask.float())
    w = rho1_weights(nll, ref, mask, 0.5)  # ceil(2.5) = 3 of 5 counted tokens
    assert torch.equal(w, torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]]))


def test_sign_keeps_high_excess_not_high_reference_loss():
    # Token 0: already learned (ℓ_θ low) though the reference found it hard -> excess −4.9: drop.
    # Token 1: still hard for θ though the reference knew it -> excess +2.9: keep.
    nll = torch.tensor([[0.1, 3.0, 1.0, 1.0]])
    ref = torch.tensor([[5.0, 0.1, 1.0, 1.0]])
    w = rho1_weights(nll, ref, torch.ones(1, 4, dtype=torch.bool), 0.25)
    assert torch.equal(w, torch.tensor([[0.0, 1, 0, 0]]))


def test_keep_count_is_ceil_without_float_noise():
    assert rho1_keep_count(10, 0.6) == 6  # 0.6·10 = 6.000000000000001 in floating point
    assert rho1_keep_count(10, 0.61) == 7
    assert rho1_keep_count(3, 0.01) == 1  # a non-empty batch keeps at least one token
    assert rho1_keep_count(0, 0.5) == 0
    assert (
        rho1_weights(torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), 0.5).sum() == 0
    )


def test_loss_is_mean_over_kept_tokens_and_differentiable():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    w = torch.tensor([[0.0, 1, 0], [1, 0, 1]])
    loss = rho1_loss(nll, w)
    assert loss.item() == pytest.approx((2 + 4 + 6) / 3)
    loss.backward()
    assert torch.equal(nll.grad, w / 3)
    assert rho1_loss(nll, torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_rejects_bad_keep_ratio(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        rho1_weights(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), ratio)
