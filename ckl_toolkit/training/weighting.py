"""Where token weights come from: uniform, oracle, or a frozen Train-Attention model.

Every source answers the same question, ``weights(batch) -> (B, T-1)``, for the target tokens of a
tokenised batch; the trainer multiplies them into the token-weighted loss (losses.weighted_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ckl_toolkit.core.losses import target_mask
from ckl_toolkit.core.ta_model import TrainAttentionModel
from ckl_toolkit.core.text import Encoded, object_target_mask


@dataclass
class TextBatch:
    """A tokenised batch with the raw texts (and, for the oracle, the objects to learn)."""

    enc: Encoded
    texts: list[str]
    objects: list[str] | None = None


class WeightSource(Protocol):
    name: str

    def weights(self, batch: TextBatch) -> torch.Tensor:
        """(B, T-1) weights in [0, 1] for the batch's target tokens, 0 on padding."""
        ...


class UniformWeights:
    """Ordinary fine-tuning: every real token counts the same."""

    name = "uniform"

    def weights(self, batch: TextBatch) -> torch.Tensor:
        return target_mask(batch.enc.attention_mask).float()


class OracleWeights:
    """Weight 1 on the object's tokens (every occurrence in the document), 0 elsewhere (DESIGN §7)."""

    name = "oracle"

    def weights(self, batch: TextBatch) -> torch.Tensor:
        if batch.objects is None:
            raise ValueError("oracle weighting needs the object of each document (field 'object')")
        return object_target_mask(batch.enc, batch.texts, batch.objects, which="all").float()


class TrainAttentionWeights:
    """A frozen TA model φ; the weight of target x_t is φ's output at x_t (same tokenizer as the target)."""

    name = "taalm"

    def __init__(self, ta: TrainAttentionModel):
        self.ta = ta.eval().requires_grad_(False)

    @torch.no_grad()
    def weights(self, batch: TextBatch) -> torch.Tensor:
        device = next(self.ta.parameters()).device
        enc = batch.enc.to(device)
        w = self.ta(enc.input_ids, enc.attention_mask)[:, 1:]  # (B, T-1)
        return w.float() * target_mask(enc.attention_mask).float()
