"""Tokenisation with character spans: which tokens belong to an object string.

Object tokens are found by character offsets, not by re-tokenising the object on its own: BPE
splits " Paris" in context differently from "Paris" alone, and offsets are exact for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """A right-padded batch.

    input_ids: (B, T); attention_mask: (B, T); offsets: per row, a list of (start, end) char spans;
    position_ids: (B, T) for packed rows (positions restart at 0 per document), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Encoded:
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.offsets, pos)


def ensure_pad_token(tokenizer) -> None:
    """Causal-LM tokenizers often ship without a pad token; padding is masked anyway."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def encode(tokenizer, texts: list[str], max_length: int) -> Encoded:
    """Tokenise and right-pad a list of texts (truncating at max_length tokens)."""
    ensure_pad_token(tokenizer)
    enc = tokenizer(
        texts,
        max_length=max_length,
        truncation=True,
        padding="longest",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    offsets = [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"].tolist()]
    return Encoded(enc["input_ids"], enc["attention_mask"], offsets)


def char_spans(text: str, needle: str, which: str = "all") -> list[tuple[int, int]]:
    """Character spans of ``needle`` in ``text``: every occurrence, or only the last."""
    if not needle:
        return []
    if which == "last":
        i = text.rfind(needle)
        return [] if i < 0 else [(i, i + len(needle))]
    spans, i = [], text.find(needle)
    while i >= 0:
        spans.append((i, i + len(needle)))
        i = text.find(needle, i + len(needle))
    return spans


def token_mask_for_spans(
    offsets: list[tuple[int, int]], attention_row: torch.Tensor, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """(T,) bool: real tokens whose character range overlaps any span."""
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    for t, (a, b) in enumerate(offsets):
        if not attention_row[t] or b <= a:
            continue
        mask[t] = any(a < e and b > s for s, e in spans)
    return mask


def object_target_mask(
    enc: Encoded, texts: list[str], objects: list[str], which: str = "all"
) -> torch.Tensor:
    """(B, T-1) bool over targets: the tokens of ``objects[b]`` in ``texts[b]``.

    which="last" marks the object's last occurrence (probes); "all" marks every occurrence (oracle).
    """
    rows = []
    for b, (text, obj) in enumerate(zip(texts, objects)):
        spans = char_spans(text, obj, which)
        rows.append(token_mask_for_spans(enc.offsets[b], enc.attention_mask[b], spans))
    return torch.stack(rows)[:, 1:]
