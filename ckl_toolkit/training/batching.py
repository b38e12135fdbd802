"""One batching policy for every job: documents -> token rows -> (B, T) batches, never truncated.

A document longer than ``max_length`` tokens is split into consecutive windows: a cut-off tail would
be knowledge silently not learned. ``pack=False``: every row holds one window of one document.
``pack=True``: documents, each followed by EOS, are concatenated and cut into rows of exactly
``max_length`` (the last row may be shorter). A packed batch carries ``position_ids`` that restart at 0
for every document of a row, so a document attends only to itself and its first token is no target
(``core.losses.target_mask``): its loss is the loss it has alone in a row, as with axolotl's or
torchtune's packing and HF's flattening collator.

A pass over a list of documents can stop after any batch and resume from its ``Cursor`` (documents
fully consumed, tokens of the next one already trained): the resumed pass tokenises only what is
left and yields the same batches an uninterrupted pass would.

The order of an epoch's documents (arrival order, a seeded shuffle, or new documents mixed with
mix-review's rehearsal draw) is :func:`epoch_documents`; both ``ckl update`` and ``ckl eval`` use it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.text import ensure_pad_token
from ckl_toolkit.training.mix_review import MixReviewConfig, mix_epoch

TOKENIZE_CHUNK = 64  # documents tokenised per call: a fast tokenizer batches well


@dataclass(frozen=True)
class Cursor:
    """Where a pass over a document list stands: ``docs`` fully consumed, ``tokens`` of the next."""

    docs: int = 0
    tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict | None) -> Cursor:
        cur = cls(**obj) if obj else cls()
        if cur.docs < 0 or cur.tokens < 0:
            raise ValueError(f"Cursor: invalid {obj!r}")
        return cur


@dataclass
class BatchStats:
    """What batching met: real tokens batched, documents split into windows, documents without tokens."""

    tokens: int = 0
    split_docs: int = 0
    no_tokens: int = 0

    def add(self, other: BatchStats) -> None:
        self.tokens += other.tokens
        self.split_docs += other.split_docs
        self.no_tokens += other.no_tokens


@dataclass
class Batch:
    """A right-padded batch of token rows and the documents behind them."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    rows: list[list[Document]]  # per row, the documents with tokens in it
    completed: list[Document]  # documents whose last token is in this batch
    cursor: Cursor  # where the pass stands after this batch
    position_ids: torch.Tensor | None = None  # (B, T) packed rows: positions restart per document

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # per token, its position in its own document piece
    members: list[Document] = field(default_factory=list)
    completed: list[Document] = field(default_factory=list)
    cursor: Cursor = Cursor()


def batches(
    docs: Sequence[Document],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    pack: bool = False,
    start: Cursor = Cursor(),
    stats: BatchStats | None = None,
) -> Iterator[Batch]:
    """Tokenise ``docs[start.docs:]`` (the first from token ``start.tokens`` on) into batches.

    Args:
        docs: the documents of this pass, in training order.
        tokenizer: a Hugging Face tokenizer (special tokens as its defaults add them).
        max_length: tokens per row.
        batch_size: rows per batch.
        pack: pack documents (EOS-separated) into full rows instead of padding each.
        start: the ``cursor`` of the batch to resume after.
        stats: counts tokens, split and token-less documents into it.

    Yields:
        Batches; a document without tokens is skipped (counted), never marked completed.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"batches: max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
    ensure_pad_token(tokenizer)
    stats = stats if stats is not None else BatchStats()
    group: list[_Row] = []
    for row in _rows(_tokenised(docs, tokenizer, pack, start.docs), max_length, pack, start, stats):
        group.append(row)
        if len(group) == batch_size:
            yield _collate(group, tokenizer.pad_token_id, pack)
            group = []
    if group:
        yield _collate(group, tokenizer.pad_token_id, pack)


def count_rows(docs: Sequence[Document], tokenizer: Any, max_length: int, pack: bool) -> tuple[int, int]:
    """(rows, real tokens) that :func:`batches` makes of ``docs``: a run's planned work, without tensors."""
    ensure_pad_token(tokenizer)
    stats, rows = BatchStats(), 0
    for _ in _rows(_tokenised(docs, tokenizer, pack, 0), max_length, pack, Cursor(), stats):
        rows += 1
    return rows, stats.tokens


def _tokenised(docs: Sequence[Document], tokenizer: Any, pack: bool, first: int) -> Iterator[tuple]:
    """(index, document, token ids) from ``docs[first]`` on, EOS appended when packing."""
    eos = [tokenizer.eos_token_id] if pack and tokenizer.eos_token_id is not None else []
    for lo in range(first, len(docs), TOKENIZE_CHUNK):
        chunk = docs[lo : lo + TOKENIZE_CHUNK]
        for i, (doc, ids) in enumerate(zip(chunk, tokenizer([d.text for d in chunk])["input_ids"]), lo):
            yield i, doc, list(ids) + eos


def _rows(pieces: Iterable, max_length: int, pack: bool, start: Cursor, stats: BatchStats) -> Iterator[_Row]:
    """Cut token lists into rows of at most ``max_length``; each row knows the cursor after it."""
    row = _Row()
    for i, doc, ids in pieces:
        if not ids:  # nothing to learn
            stats.no_tokens += 1
            continue
        done = start.tokens if i == start.docs else 0  # the first document may resume mid-way
        stats.split_docs += int(len(ids) > max_length and done == 0)  # counted once, not again on resume
        ids = ids[done:]
        while ids:
            take, ids = ids[: max_length - len(row.ids)], ids[max_length - len(row.ids) :]
            row.ids += take
            row.positions += range(len(take))
            done += len(take)
            row.members.append(doc)
            if ids:
                row.cursor = Cursor(i, done)
            else:
                row.completed.append(doc)
                row.cursor = Cursor(i + 1, 0)
            if len(row.ids) == max_length or (not pack and not ids):
                stats.tokens += len(row.ids)
                yield row
                row = _Row()
    if row.ids:
        stats.tokens += len(row.ids)
        yield row


def _collate(group: list[_Row], pad_id: int, pack: bool) -> Batch:
    width = max(len(r.ids) for r in group)
    input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(group), width), dtype=torch.long)
    position_ids = torch.zeros((len(group), width), dtype=torch.long) if pack else None
    for b, r in enumerate(group):
        input_ids[b, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        attention_mask[b, : len(r.ids)] = 1
        if position_ids is not None:  # padding continues the last document's positions (it is masked)
            last = r.positions[-1]
            pad = range(last + 1, last + 1 + width - len(r.ids))
            position_ids[b] = torch.tensor(r.positions + list(pad), dtype=torch.long)
    completed = [d for r in group for d in r.completed]
    rows = [list(r.members) for r in group]
    return Batch(input_ids, attention_mask, rows, completed, group[-1].cursor, position_ids)


def epoch_documents(
    new: Sequence[Document],
    pool: Sequence[Document],
    mix_ratio: float,
    mix_decay: float,
    mix_seed: int,
    exponent: int,
    shuffle_key: str | None,
) -> tuple[list[Document], float]:
    """The documents of one epoch in training order, and the mix-review ratio used.

    Mix-review (ratio > 0): all new documents plus ``round(mix_ratio · mix_decay**exponent · |new|)``
    drawn from the pool, shuffled together (the draw and order fixed by ``mix_seed`` and
    ``exponent``). Otherwise the new documents, shuffled by ``shuffle_key`` when given.
    """
    if mix_ratio > 0:
        cfg = MixReviewConfig(mix_ratio, mix_decay, seed=mix_seed)
        return mix_epoch(list(new), list(pool), cfg, exponent), mix_ratio * mix_decay**exponent
    docs = list(new)
    if shuffle_key is not None:
        random.Random(shuffle_key).shuffle(docs)
    return docs, 0.0
