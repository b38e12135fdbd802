"""Token weights and the loss they go into: one ``Weigher`` protocol for every job.

    weigher.weights(batch, nll)  -> (B, T-1) weights of the batch's target tokens, 0 on padding
    weigher.loss(nll, w, mask)   -> the scalar the step minimises

    uniform   1 on every real token                     token-weighted loss Σwℓ/Σw per row, batch mean
    oracle    1 on the tokens of each row's objects     the same loss
    taalm     a frozen Train-Attention model φ          the same loss (φ's own or another tokenizer)
    rho1      top keep_ratio of the batch's tokens      mean NLL of the kept tokens (RHO-1)
              by excess loss over the pre-update model

``needs_text`` says whether the weigher reads the rows' texts (the oracle finds its objects in
them, a TA model with another tokenizer re-tokenises them); the step decodes them only then.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.losses import LOSS_CHUNK_TOKENS, target_mask, token_nll, weighted_loss
from ckl_toolkit.core.ta_model import TrainAttentionModel, load_ta_model, load_ta_tokenizer
from ckl_toolkit.core.text import Encoded, char_spans, token_mask_for_spans
from ckl_toolkit.training.rho1 import rho1_loss, rho1_weights
from ckl_toolkit.training.token_align import align_weights, decode_spans, same_tokenizer

if TYPE_CHECKING:
    from ckl_toolkit.training.sections import WeightSpec
    from ckl_toolkit.training.targets import Target


@dataclass
class TextBatch:
    """A tokenised batch with each row's text (and, for the oracle, each row's objects to learn)."""

    enc: Encoded
    texts: list[str]
    objects: list[list[str]] | None = None  # per row, the object strings of its documents

    def to(self, device) -> TextBatch:
        return TextBatch(self.enc.to(device), self.texts, self.objects)


def row_text_batch(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextBatch:
    """A ``TextBatch`` for token rows: the decoded texts, with each token's span as its offsets."""
    texts, offsets = [], []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        text, spans = decode_spans(tokenizer, real)
        texts.append(text)
        offsets.append(spans + [(0, 0)] * (len(ids) - len(real)))  # padding: empty spans
    return TextBatch(Encoded(input_ids, attention_mask, offsets), texts)


class Weigher(Protocol):
    name: str
    needs_text: bool

    def weights(self, batch: TextBatch, nll: torch.Tensor) -> torch.Tensor:
        """(B, T-1) weights in [0, 1] for the batch's target tokens, 0 on padding."""
        ...

    def loss(self, nll: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The scalar the step minimises, from the (B, T-1) losses, weights and target mask."""
        ...


# ---------------------------------------------------------------------------------------------
# Weight sources: TextBatch -> (B, T-1)


def uniform_weights(batch: TextBatch) -> torch.Tensor:
    """Ordinary fine-tuning: every real target token counts the same."""
    return target_mask(batch.enc.attention_mask, batch.enc.position_ids).float()


def oracle_weights(batch: TextBatch) -> torch.Tensor:
    """1 on the tokens of each row's objects (every occurrence), 0 elsewhere."""
    if batch.objects is None:
        raise ValueError("oracle weighting needs the object of each document (weights.object_field)")
    rows = []
    for b, (text, objects) in enumerate(zip(batch.texts, batch.objects)):
        spans = [s for obj in objects if obj for s in char_spans(text, obj, "all")]
        rows.append(token_mask_for_spans(batch.enc.offsets[b], batch.enc.attention_mask[b].cpu(), spans))
    return torch.stack(rows)[:, 1:].float()


class TrainAttentionWeights:
    """A frozen TA model φ on the target's own token ids: the weight of x_t is φ's output at x_t."""

    def __init__(self, ta: TrainAttentionModel):
        self.ta = ta.eval().requires_grad_(False)
        self.reads_target_nll = ta.surprise  # φ also reads the target's own per-token loss

    @torch.no_grad()
    def __call__(self, batch: TextBatch, nll: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.ta.parameters()).device
        enc = batch.enc.to(device)
        nll = nll.to(device) if nll is not None else None
        w = self.ta(enc.input_ids, enc.attention_mask, enc.position_ids, nll)[:, 1:]  # (B, T-1)
        return w.float() * target_mask(enc.attention_mask, enc.position_ids).float()


class CrossTokenizerTAWeights:
    """A frozen TA model with its own tokenizer; weights reach target tokens through character offsets.

    Args:
        ta: the TA model φ.
        ta_tokenizer: φ's tokenizer.
        reduce: "max" or "mean" over the φ tokens a target token overlaps.
        max_length: φ tokens per row (longer rows: the tail takes the fill weight).
    """

    def __init__(self, ta: TrainAttentionModel, ta_tokenizer, reduce: str = "max", max_length: int = 4096):
        self.ta = ta.eval().requires_grad_(False)
        self.tok, self.reduce, self.max_length = ta_tokenizer, reduce, max_length

    @torch.no_grad()
    def __call__(self, batch: TextBatch) -> torch.Tensor:
        """(B, T-1) weights of the batch's target tokens; needs ``batch.texts`` and spans as offsets."""
        enc = self.tok(
            batch.texts, return_offsets_mapping=True, padding=True, truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )  # fmt: skip
        device = next(self.ta.parameters()).device
        w_phi = self.ta(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()  # (B, S)
        out = torch.zeros(batch.enc.input_ids.shape, dtype=torch.float32)  # (B, T)
        for b, spans in enumerate(batch.enc.offsets):
            real = enc["attention_mask"][b].bool()
            src_spans = [tuple(s) for s in enc["offset_mapping"][b][real].tolist()]
            out[b] = align_weights(src_spans, w_phi[b][real], spans, self.reduce)
        mask = target_mask(batch.enc.attention_mask, batch.enc.position_ids).float().cpu()
        return (out[:, 1:] * mask).to(batch.enc.input_ids.device)


# ---------------------------------------------------------------------------------------------
# Weighers: a source and its loss


@dataclass
class TokenWeigher:
    """Weights from ``source`` into the token-weighted loss: Σwℓ/Σw per row (or Σwℓ/n), batch mean."""

    name: str
    source: Callable[[TextBatch], torch.Tensor]
    needs_text: bool = False
    normalize: bool = True
    floor: float = 0.0  # every real token weighs at least this: w' = floor + (1 - floor)·w

    def weights(self, batch: TextBatch, nll: torch.Tensor) -> torch.Tensor:
        if getattr(self.source, "reads_target_nll", False):  # a TA model with the surprise feature
            w = self.source(batch, nll)
        else:
            w = self.source(batch)  # (B, T-1)
        if self.floor:
            mask = target_mask(batch.enc.attention_mask, batch.enc.position_ids).to(w)
            w = (self.floor + (1.0 - self.floor) * w) * mask  # padding stays 0
        return w

    def loss(self, nll: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weighted_loss(nll, w, mask, normalize=self.normalize)


class Rho1Weigher:
    """RHO-1: keep the batch's top ``keep_ratio`` tokens by excess loss ℓ_θ − ℓ_ref; mean loss of the kept.

    The reference is the frozen model before the update (a second copy in memory).
    """

    name, needs_text = "rho1", False

    def __init__(self, reference: nn.Module, keep_ratio: float):
        self.reference = reference.eval().requires_grad_(False)
        self.keep_ratio = keep_ratio

    def weights(self, batch: TextBatch, nll: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            enc = batch.enc  # the chunked loss: the reference never holds full logits either
            ref_nll = token_nll(
                self.reference, enc.input_ids, enc.attention_mask, enc.position_ids, LOSS_CHUNK_TOKENS
            )  # (B, T-1)
        mask = target_mask(batch.enc.attention_mask, batch.enc.position_ids)
        return rho1_weights(nll, ref_nll, mask, self.keep_ratio)  # (B, T-1) in {0, 1}

    def loss(self, nll: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return rho1_loss(nll, w)


def build_weigher(spec: WeightSpec, target: Target, version: Path | None, seed: int, device) -> Weigher:
    """The weigher of a ``WeightSpec`` for ``target`` (a run starting from ``version``)."""
    if spec.method == "uniform":
        return TokenWeigher("uniform", uniform_weights, normalize=spec.normalize)
    if spec.method == "oracle":
        return TokenWeigher(
            "oracle", oracle_weights, needs_text=True, normalize=spec.normalize, floor=spec.floor
        )
    if spec.method == "taalm":
        source, needs_text = ta_source(spec.ta_path, spec.align, spec.reduce, target.tokenizer, device)
        return TokenWeigher(
            "taalm", source, needs_text=needs_text, normalize=spec.normalize, floor=spec.floor
        )
    # rho1: the reference is the model this run starts from, frozen
    reference = target.spec.build(version, seed).model.to(device)
    return Rho1Weigher(reference, spec.keep_ratio)


def ta_source(ta_path: str, align: str, reduce: str, tokenizer, device) -> tuple[Callable, bool]:
    """A frozen TA model's weights on ``tokenizer``'s tokens, and whether they need the rows' texts.

    Raises:
        ConfigError: naming ``weights.ta_path`` / ``weights.align`` when the TA model cannot serve.
    """
    path = Path(ta_path)
    if not (path / "ta_config.json").is_file():
        raise ConfigError(f"weights.ta_path: {path} is not a TA model directory (no ta_config.json)")
    ta = load_ta_model(path).to(device)
    if align == "auto":
        same = same_tokenizer(json.loads((path / "ta_config.json").read_text()), tokenizer)
        if same is None:
            raise ConfigError(
                f"weights.ta_path: {path} records no tokenizer; set weights.align=identity if it uses "
                "the target's tokenizer, or save the TA model with its tokenizer"
            )
        align = "identity" if same else "offsets"
    if align == "identity":
        if ta.config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"weights.align=identity: the TA model's vocabulary ({ta.config.vocab_size}) is "
                f"smaller than the target's ({len(tokenizer)}); use weights.align=offsets"
            )
        return TrainAttentionWeights(ta), False
    if not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"weights.align=offsets: {path} has no tokenizer files to tokenise with")
    if ta.surprise:
        raise ConfigError(
            f"weights.ta_path: {path} reads the target's per-token loss (surprise), which needs the "
            "target's tokenizer (weights.align=identity)"
        )
    return CrossTokenizerTAWeights(ta, load_ta_tokenizer(path), reduce), True
