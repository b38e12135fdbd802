"""One meta-step: the paper's Algorithm 1 for φ, with the exact meta-gradient in place of its double backward.

    w      = φ(D)                          token weights of this rank's documents
    dL/dw  = meta_gradient(θ, D, w, T)     one weighted inner step of θ on D, the task loss under θ'
                                           (+ λ × the known facts' loss under θ', with meta.retain_weight)
    φ     <- step on (w · stopgrad(dL/dw)).sum()

The surrogate's gradient with respect to φ is the exact meta-gradient, because φ reaches the
task loss only through w. ``meta.py`` runs this once per TA step; the benchmarks time it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ckl_toolkit.core.losses import token_nll
from ckl_toolkit.metalearn.episodes import EpisodeBatch
from ckl_toolkit.metalearn.metagrad import MetaGradConfig, meta_gradient
from ckl_toolkit.training.engine import Engine


@dataclass
class MetaStepResult:
    """What one meta-step reports; the losses are this rank's, for logging."""

    outer_loss: float  # mean object-token NLL of the tasks under θ'
    outer_loss_before: float  # the same at θ (nan unless asked for)
    inner_loss: float  # the token-weighted loss on the documents at θ
    grad_norm: float  # φ's gradient norm before clipping (over all ranks under DeepSpeed)
    w: torch.Tensor  # (B, T-1) the token weights φ gave, detached
    retain_loss: float = float("nan")  # L_R (KL or NLL) of the known facts under θ' (nan without retention)
    retain_loss_before: float = float("nan")  # the same at θ: 0 for KL, nan for NLL unless logged


def meta_step(
    engine: Engine,
    base: nn.Module,
    params: dict[str, nn.Parameter],
    batch: EpisodeBatch,
    cfg: MetaGradConfig,
    log: bool = True,
    surprise: bool = False,
    retain: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> MetaStepResult:
    """One step of φ on this rank's episodes; θ is left exactly as found.

    Args:
        engine: φ's engine (plain, or DeepSpeed ZeRO over ranks).
        base: the base model θ.
        params: the trainable subset of θ the inner step moves (all of θ, or LoRA adapters).
        batch: this rank's episodes, B of them.
        cfg: the inner step and how dL/dw is computed.
        log: also compute the task loss at θ (``outer_loss_before``; nan otherwise), a forward
            that only logging reads.
        surprise: φ also reads θ's own per-token loss on D (``ta.surprise``): one more forward of
            the base, without a graph (a constant input of φ: dL/dw is unchanged).
        retain: known-fact probes (ids, mask, object mask) of the retention term (meta.retain_weight).
    """
    target_nll = None
    if surprise:  # what θ already predicts, before the inner step                 (B, T-1)
        with torch.no_grad():
            target_nll = token_nll(base, batch.doc_ids, batch.doc_mask)
    # 1. w = φ(D): position t weights target token x_t, so drop the first.       (B, T-1) in (0, 1)
    inputs = (batch.doc_ids, batch.doc_mask) + ((None, target_nll) if surprise else ())
    w = engine.module(*inputs)[:, 1:]
    # 2. dL/dw from one inner step per episode (or one for the batch), this rank's episodes
    #    only: no inner step, direction or dL/dw is reduced across ranks.        (B, T-1)
    task = (batch.task_ids, batch.task_mask, batch.task_obj)
    out = meta_gradient(
        base, params, batch.doc_ids, batch.doc_mask, w.detach(), *task, cfg, log_before=log, retain=retain
    )
    # 3. The surrogate: its gradient with respect to φ is the exact meta-gradient.  scalar
    surrogate = (w * out.dL_dw).sum()
    # 4. Backward, clip, step. Under ZeRO φ's gradient is averaged over ranks, which is the mean
    #    over the global meta-batch (each rank's dL/dw carries its local 1/B); a sync point.
    grad_norm = engine.step(surrogate)
    return MetaStepResult(
        out.outer_loss, out.outer_loss_before, out.inner_loss, grad_norm, w.detach(),
        out.retain_loss, out.retain_loss_before,
    )  # fmt: skip
