"""Token weights across tokenizers: map a TA model's weights onto the target's tokens (ARCHITECTURE.md §4).

When φ and the target share a tokenizer, φ runs on the target's token ids (identity). Otherwise both
tokenise the same text and a target token takes the max (or mean) weight of the φ tokens whose
character ranges overlap its own. The update loop holds only token ids (rows cut from documents,
possibly packed), so :func:`decode_spans` first recovers each row's text and the character span of
every target token in it, by incremental decoding (exact for byte-level BPE and SentencePiece, where
decoding one token alone would drop leading spaces or split multi-byte characters).
"""

from __future__ import annotations

import torch

from ckl_toolkit.core.ta_model import tokenizer_identity

REDUCE = ("max", "mean")
REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


def decode_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of a token row and each token's (start, end) character span in it.

    Special tokens are skipped (empty span). A token that ends inside a multi-byte character shares
    the span of the token that completes it. Cost: two short decodes per token.

    Args:
        tokenizer: a Hugging Face tokenizer.
        ids: one row of token ids (no padding).

    Returns:
        (text, spans) with ``len(spans) == len(ids)``; ``text[s:e]`` is what token i contributes.
    """
    special = set(tokenizer.all_special_ids)
    text, spans, pending = "", [(0, 0)] * len(ids), []
    prefix = read = 0  # ids[prefix:read] were emitted; decoding from `prefix` keeps one token of context

    def decode(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    for i, tok in enumerate(ids):
        if tok in special:
            spans[i] = (len(text), len(text))
            continue
        before, now = decode(prefix, read), decode(prefix, i + 1)
        pending.append(i)
        if now.endswith(REPLACEMENT) or not now.startswith(before):
            continue  # the character is not complete yet: emit it with a later token
        start, text = len(text), text + now[len(before) :]
        for j in pending:
            spans[j] = (start, len(text))
        pending, prefix, read = [], read, i + 1
    if pending:  # a row cut inside a character: give the rest to the tokens still waiting
        start, text = len(text), text + decode(prefix, len(ids))[len(decode(prefix, read)) :]
        for j in pending:
            spans[j] = (start, len(text))
    return text, spans


def align_weights(
    src_spans: list[tuple[int, int]],
    src_weights: torch.Tensor,
    tgt_spans: list[tuple[int, int]],
    reduce: str = "max",
    fill: float | None = None,
) -> torch.Tensor:
    """Weights of target tokens from the weights of source tokens over the same text.

    Args:
        src_spans: (S,) character spans of the source (φ) tokens.
        src_weights: (S,) their weights.
        tgt_spans: (T,) character spans of the target tokens.
        reduce: "max" or "mean" over the overlapping source tokens.
        fill: weight of a target token that overlaps no source token (special tokens, empty spans);
            None: the mean source weight, i.e. neither favoured nor suppressed.

    Returns:
        (T,) float weights.
    """
    if reduce not in REDUCE:
        raise ValueError(f"weights.reduce={reduce!r}: must be one of {list(REDUCE)}")
    w = src_weights.float().flatten()
    if fill is None:
        fill = float(w.mean()) if w.numel() else 0.0
    if not tgt_spans:
        return torch.zeros(0)
    src = torch.tensor(src_spans, dtype=torch.long).view(-1, 2)  # (S, 2)
    tgt = torch.tensor(tgt_spans, dtype=torch.long).view(-1, 2)  # (T, 2)
    nonempty = (src[:, 1] > src[:, 0])[None, :] & (tgt[:, 1] > tgt[:, 0])[:, None]  # (T, S)
    overlap = nonempty & (tgt[:, None, 0] < src[None, :, 1]) & (tgt[:, None, 1] > src[None, :, 0])
    count = overlap.sum(dim=1)  # (T,)
    if reduce == "max":
        vals = torch.where(overlap, w[None, :], torch.full_like(overlap, -1.0, dtype=w.dtype)).amax(dim=1)
    else:
        vals = (overlap.to(w.dtype) * w[None, :]).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, vals, torch.full_like(vals, fill))


def same_tokenizer(ta_sidecar: dict, tokenizer) -> bool | None:
    """Whether the TA sidecar records ``tokenizer`` (None when it records no tokenizer)."""
    recorded = ta_sidecar.get("tokenizer")
    if not recorded:
        return None
    mine = tokenizer_identity(tokenizer)
    return (
        recorded["vocab_size"] == mine["vocab_size"]
        and recorded["vocab_sha256_16"] == mine["vocab_sha256_16"]
    )
