"""One weighted step of a target: the single step function ``ckl update`` and ``ckl eval`` share.

    w    = token weights of the rows (frozen φ, uniform, oracle or RHO-1)     (b, T-1)
    loss = the weigher's loss of the target's per-token NLL under w           scalar
    skip the step if the loss is not finite on any rank, else backward + clip + optimizer step

TA-gated sparse updates (``Sparsity``, default off): the weights come first, from the TA model alone;
tokens under ``token_min_weight`` leave the loss, rows whose remaining weight mass is under
``doc_min_mass`` (or zero) are dropped before the target's forward, and with ``weighted_head`` the LM
head and cross-entropy run only at the targets that still carry weight. A batch left without rows
takes no forward, backward or optimizer step; its documents still count as processed.

Under several ranks each rank takes rows ``rank::world`` of the global batch; every decision that
must agree across ranks (skip or step) is taken on an all-reduced loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ckl_toolkit.core.errors import DivergenceError
from ckl_toolkit.core.losses import LOSS_CHUNK_TOKENS, target_mask, token_nll
from ckl_toolkit.core.text import Encoded
from ckl_toolkit.training.batching import Batch
from ckl_toolkit.training.weighers import TextBatch, Weigher, row_text_batch

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Skip steps whose loss is NaN or inf; abort after ``max_consecutive`` of them in a row.

    Under data or model parallelism, check a loss that is already all-reduced: every rank must
    take the same decision, or the ranks that step will wait forever for the ones that skip.
    """

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive: must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def check(self, loss: Any, step: int | None = None) -> bool:
        """True if the step may be applied; False if it must be skipped (the loss is not finite).

        Raises:
            DivergenceError: on the ``max_consecutive``-th non-finite loss in a row.
        """
        value = float(loss)
        if math.isfinite(value):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise DivergenceError(
                f"loss {value} at step {step}: {self.consecutive} non-finite losses in a row "
                f"(max_consecutive={self.max_consecutive}); lower the learning rate or check the data"
            )
        logger.warning("step %s: loss %s, step skipped (%d in a row)", step, value, self.consecutive)
        return False

    def state_dict(self) -> dict:
        return {
            "max_consecutive": self.max_consecutive,
            "consecutive": self.consecutive,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])


@dataclass
class Sparsity:
    """TA-gated sparse updates; the defaults change nothing (``weights.sparse`` of a recipe)."""

    doc_min_mass: float = 0.0  # drop rows whose weight mass Σw (in tokens) is below this
    token_min_weight: float = 0.0  # weights below this become 0: those tokens leave the loss
    weighted_head: bool = False  # LM head + cross-entropy only where a weight is > 0
    doc_token_weight: float = 0.0  # a row's mass counts only tokens weighted at least this (loss unchanged)

    @property
    def active(self) -> bool:
        return self.doc_min_mass > 0 or self.token_min_weight > 0 or self.weighted_head


@dataclass
class StepResult:
    loss: float  # the batch's loss, mean over ranks
    weights: torch.Tensor  # (b, T-1) this rank's token weights
    mask: torch.Tensor  # (b, T-1) bool, this rank's real target tokens
    applied: bool  # False: the loss was not finite and the step was skipped
    grad_norm: float | None  # before clipping (None when skipped)
    stepped: bool = True  # False: sparse, every row was dropped (no forward, backward or step)
    rows_dropped: int = 0  # sparse: this rank's rows left out of the forward
    head_targets: int = -1  # sparse: targets the LM head ran on (this rank); -1: every real target

    @property
    def mean_weight(self) -> float:
        return float(self.weights[self.mask].mean()) if self.mask.any() else math.nan


def rank_rows(batch: Batch, rank: int, world: int) -> tuple[Encoded, list[int]]:
    """This rank's rows ``rank::world`` of a global batch (ids, mask, packed positions), and their indices.

    A rank left without rows (a short last batch) trains on one fully masked row, so it still takes
    part in the collectives of forward and backward, at weight 0.
    """
    index = list(range(rank, batch.input_ids.size(0), world))
    pos = batch.position_ids
    if not index:
        empty = torch.zeros_like(batch.attention_mask[:1])
        return Encoded(batch.input_ids[:1], empty, [], None if pos is None else pos[:1]), []
    ids, mask = batch.input_ids[index], batch.attention_mask[index]
    return Encoded(ids, mask, [], None if pos is None else pos[index]), index


def text_batch(
    batch: Batch, rank: int, world: int, tokenizer, needs_text: bool, object_field: str
) -> TextBatch:
    """This rank's rows as a TextBatch; texts and objects are read only for weighers that need them."""
    enc, index = rank_rows(batch, rank, world)  # (b, T)
    if not needs_text:
        return TextBatch(enc, [])
    tb = row_text_batch(tokenizer, enc.input_ids, enc.attention_mask)
    tb.enc.position_ids = enc.position_ids
    members = [batch.rows[i] for i in index] or [[]]
    tb.objects = [[o for d in docs for o in _as_list(d.meta.get(object_field))] for docs in members]
    return tb


def _as_list(value) -> list[str]:
    """A document's object field: one string, or a list of them (every one is marked)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else [v for v in value if v]


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: a DeepSpeed engine or HF model says so; else its first parameter."""
    device = getattr(module, "device", None)
    return device if isinstance(device, torch.device) else next(module.parameters()).device


def weighted_step(
    engine,
    batch: Batch,
    weigher: Weigher,
    tokenizer,
    guard: NonFiniteGuard,
    object_field: str = "object",
    step: int | None = None,
    loss_chunk: int = LOSS_CHUNK_TOKENS,
    sparsity: Sparsity | None = None,
) -> StepResult:
    """One optimizer step of ``engine`` on this rank's rows of ``batch``, tokens weighted by ``weigher``.

    Args:
        engine: the target's engine (``module``, ``rank``, ``world``, ``all_mean``, ``step``).
        batch: the global batch (every rank holds all of it).
        weigher: the token weights and their loss.
        tokenizer: the target's tokenizer (decodes rows for weighers that read text).
        guard: skips a non-finite step (and raises after too many in a row).
        object_field: the documents' field naming the object (the oracle's).
        step: the step number, for the guard's log line.
        loss_chunk: targets per LM-head chunk (0: the full (b, T, V) logits; ``core.losses.token_nll``).
        sparsity: TA-gated sparse updates (None or inactive: the dense step).
    """
    tb = text_batch(batch, engine.rank, engine.world, tokenizer, weigher.needs_text, object_field)
    tb = tb.to(module_device(engine.module))
    if sparsity is not None and sparsity.active:
        return sparse_step(engine, tb, weigher, guard, sparsity, step, loss_chunk)
    ids, mask, pos = tb.enc.input_ids, tb.enc.attention_mask, tb.enc.position_ids  # (b, T); pos: packed
    nll = token_nll(engine.module, ids, mask, pos, loss_chunk)  # (b, T-1) nats per target token
    w = weigher.weights(tb, nll.detach()).to(nll.device)  # (b, T-1) token weights in [0, 1]
    real = target_mask(mask, pos)  # (b, T-1); a packed document's first token is no target
    loss = weigher.loss(nll, w, real)
    mean_loss = engine.all_mean(float(loss.detach()))  # sync point: every rank decides alike
    if not guard.check(mean_loss, step):
        return StepResult(mean_loss, w.detach(), real, False, None)
    grad_norm = engine.step(loss)  # backward, clip, optimizer step (RecAdam: the pull to θ* included)
    return StepResult(mean_loss, w.detach(), real, True, grad_norm)


def sparse_rows(w: torch.Tensor, real: torch.Tensor, sparsity: Sparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights with tokens under ``token_min_weight`` zeroed, (b,) bool rows kept)."""
    if sparsity.token_min_weight > 0:
        w = torch.where(w >= sparsity.token_min_weight, w, torch.zeros_like(w))
    keep = ((w * real).sum(dim=1) > 0) & (row_mass(w, real, sparsity) >= sparsity.doc_min_mass)
    return w, keep


def row_mass(w: torch.Tensor, real: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """(b,) weight mass per row, in tokens, over the tokens weighted at least ``doc_token_weight``.

    With a TA model whose floor weight is small but not 0, the floor summed over a long row would
    otherwise outweigh a new fact.
    """
    counted = w * real
    if sparsity.doc_token_weight > 0:
        counted = torch.where(w >= sparsity.doc_token_weight, counted, torch.zeros_like(counted))
    return counted.sum(dim=1)


def sparse_step(
    engine,
    tb: TextBatch,
    weigher: Weigher,
    guard: NonFiniteGuard,
    sparsity: Sparsity,
    step: int | None,
    loss_chunk: int,
) -> StepResult:
    """``weighted_step`` with the weights first: rows and LM-head targets without weight are never run."""
    ids, mask, pos = tb.enc.input_ids, tb.enc.attention_mask, tb.enc.position_ids  # (b, T)
    real = target_mask(mask, pos)  # (b, T-1)
    w = weigher.weights(tb, None).to(ids.device)  # (b, T-1) from the TA model alone: no target forward
    w, keep = sparse_rows(w, real, sparsity)
    dropped = int((~keep).sum())
    if engine.all_mean(float(keep.sum())) == 0:  # sync point: no rank has a row left, nobody steps
        return StepResult(0.0, w, real, True, None, stepped=False, rows_dropped=dropped, head_targets=0)
    index = keep.nonzero().squeeze(1)  # (k,) the rows kept
    dummy = index.numel() == 0  # others have rows: take part in the collectives with one row at weight 0
    if dummy:
        index = torch.zeros(1, dtype=torch.long, device=ids.device)
    ids, mask, real = ids[index], mask[index], real[index]
    pos = None if pos is None else pos[index]
    w = torch.zeros_like(w[index]) if dummy else w[index]  # (k, T-1)
    heads = ((w > 0) & real) if sparsity.weighted_head and not dummy else None
    nll = token_nll(engine.module, ids, mask, pos, loss_chunk, heads)  # (k, T-1), 0 where not computed
    loss = weigher.loss(nll, w, real)
    mean_loss = engine.all_mean(float(loss.detach()))  # sync point: every rank decides alike
    head_targets = int(real.sum()) if heads is None else int(heads.sum())
    if not guard.check(mean_loss, step):
        return StepResult(
            mean_loss, w.detach(), real, False, None, rows_dropped=dropped, head_targets=head_targets
        )
    grad_norm = engine.step(loss)
    return StepResult(
        mean_loss, w.detach(), real, True, grad_norm, rows_dropped=dropped, head_targets=head_targets
    )
