"""The plan of a nightly run: which documents it learns, fixed before the first step.

A run fixes its documents (and its rehearsal pool) in ``work/plan.json`` before training, so a
killed run resumes over exactly the same documents, epochs and rehearsal draws even if more arrived
since; those wait for the next run, which finds them after the published watermarks. A plan is
valid only for the version it was planned on and the recipe settings that decide the model.

The plan names documents by reference, ``{"id", "shard", "line", "offset", "fp"}`` (``offset``: the
byte where the record starts in a JSONL or CSV shard, null otherwise; ``fp``: the text's
fingerprint), not by text: a resumed run reads them back from their shards and refuses one whose
text changed since. It also holds the watermarks the night reached (``watermarks``) and those it
started from (``previous``), for the shards it read.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.documents import Document, Position
from ckl_toolkit.core.hashing import text_hash
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.nightly.sources import SEEKABLE, DocumentStream, StreamConfig, _shard_format
from ckl_toolkit.nightly.watermarks import Watermark
from ckl_toolkit.training.mix_review import reservoir_sample

if TYPE_CHECKING:
    from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec

logger = logging.getLogger(__name__)

PLAN_FORMAT = "ckl-update-plan/3"
PLAN_FORMAT_V2 = "ckl-update-plan/2"  # documents with their texts; still resumed
PLAN_FILE = "plan.json"


@dataclass
class Plan:
    """What one run learns; ``period`` counts the versions before it (mix-review decays per period).

    ``offsets`` maps (shard, line) of a JSONL or CSV document to the byte where its record starts.
    """

    run: str
    base_version: str | None
    period: int
    recipe_hash: str
    stream_end: Position
    stream_stats: dict
    new: list[Document] = field(default_factory=list)
    pool: list[Document] = field(default_factory=list)
    watermarks: dict[str, Watermark] = field(default_factory=dict)
    previous: dict[str, Watermark | None] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "run": self.run,
            "base_version": self.base_version,
            "period": self.period,
            "recipe_hash": self.recipe_hash,
            "stream_end": self.stream_end.to_json(),
            "stream_stats": self.stream_stats,
            "new": [self._ref(d) for d in self.new],
            "pool": [self._ref(d) for d in self.pool],
            "watermarks": {k: w.to_json() for k, w in self.watermarks.items()},
            "previous": {k: w.to_json() if w else None for k, w in self.previous.items()},
        }

    def _ref(self, d: Document) -> dict:
        offset = self.offsets.get((d.shard, d.line))
        return {"id": d.id, "shard": d.shard, "line": d.line, "offset": offset, "fp": text_hash(d.text)}

    @classmethod
    def from_json(cls, obj: dict, stream: StreamConfig, pool: StreamConfig | None) -> Plan:
        """The plan ``to_json`` wrote, its documents read back from their shards.

        Raises:
            ValueError: a document whose record is gone or whose text changed since it was planned.
        """
        if obj.get("format") == PLAN_FORMAT_V2:  # texts inline
            new, rehearsal = ([Document.from_json(d) for d in obj[k]] for k in ("new", "pool"))
        else:
            new, rehearsal = resolve_refs(obj["new"], stream), resolve_refs(obj["pool"], pool)
        plan = cls(
            obj["run"],
            obj["base_version"],
            obj["period"],
            obj["recipe_hash"],
            Position.from_json(obj["stream_end"]),
            obj["stream_stats"],
            new,
            rehearsal,
            {k: Watermark.from_json(w) for k, w in obj.get("watermarks", {}).items()},
            {k: Watermark.from_json(w) if w else None for k, w in obj.get("previous", {}).items()},
        )
        refs = [r for k in ("new", "pool") for r in obj[k] if r.get("offset") is not None]
        plan.offsets = {(r["shard"], r["line"]): r["offset"] for r in refs}
        return plan

    def save(self, work: Path) -> None:
        write_json_atomic(work / PLAN_FILE, self.to_json())

    def epoch_documents(
        self, mix_review: MixReviewSpec, batching: BatchSpec, seed: int, epoch: int
    ) -> tuple[list[Document], float]:
        """The documents of ``epoch`` in training order (new + rehearsal draws), and the rehearsal ratio."""
        shuffle = batching.shuffle_key(seed, self.period, epoch)
        return mix_review.epoch(self.new, self.pool, self.period, epoch, shuffle)

    def published_watermarks(self, learned) -> dict[str, Watermark | None]:
        """The watermarks to publish once ``learned(doc)`` says which planned documents were learned.

        A shard holding a planned document that was not learned (its step was skipped) keeps the
        watermark it had, so the next night reads that document again (and skips the learned ones).
        """
        marks: dict[str, Watermark | None] = dict(self.watermarks)
        for d in self.new:
            if d.shard in marks and not learned(d):
                marks[d.shard] = self.previous.get(d.shard)
        return marks


def resolve_refs(refs: list[dict], config: StreamConfig | None) -> list[Document]:
    """The documents ``refs`` name, read from their shards (one pass per parquet or hf shard)."""
    if not refs:
        return []
    stream = DocumentStream(config)
    rows: dict[tuple[str, int], Document | None] = {}
    by_shard = defaultdict(set)
    for r in refs:
        seekable = r.get("offset") is not None and _shard_format(r["shard"], config.format) in SEEKABLE
        if seekable:
            rows[r["shard"], r["line"]] = _read(stream, r["shard"], r["line"], r["offset"])
        else:
            by_shard[r["shard"]].add(r["line"])
    for shard, lines in by_shard.items():
        rows.update(_read_lines(stream, shard, lines))
    out = []
    for r in refs:
        doc = rows.get((r["shard"], r["line"]))
        same_id = doc is not None and (doc.id == r["id"] or r["id"].startswith(doc.id + "#"))  # new_version
        if not same_id or text_hash(doc.text) != r["fp"]:
            raise ValueError(
                f"{r['shard']}:{r['line']}: document {r['id']!r} is gone or its text changed since this run "
                "was planned, so the run cannot resume over the same documents; restore the shard, or "
                "remove the work directory to plan the night again"
            )
        out.append(Document(r["id"], doc.text, doc.shard, doc.line, doc.meta))
    return out


def _read(stream: DocumentStream, shard: str, line: int, offset: int | None) -> Document | None:
    try:
        return stream.read_at(shard, line, offset)
    except (OSError, ValueError):  # a vanished shard or a changed record: reported by the caller
        return None


def _read_lines(stream: DocumentStream, shard: str, lines: set[int]) -> dict[tuple[str, int], Document]:
    try:
        return {(shard, d.line): d for d in stream._read_shard(shard, 0) if d.line in lines}
    except (OSError, ValueError):
        return {}


def collect_plan(
    stream: StreamConfig,
    pool: StreamConfig | None,
    ledger,
    version: Path | None,
    run_id: str,
    recipe_hash: str,
    max_documents: int = 0,
    object_field: str | None = None,
    tokenizer=None,
    pool_sample: int = 0,
    pool_per_new: float = 0.0,
    pool_seed: int = 0,
) -> Plan:
    """One pass over what is new in the stream: the unseen documents (at most ``max_documents``),
    and a sample of the pool.

    The pass starts every shard at the ledger's watermark for it (``nightly.watermarks``). Bad
    records are quarantined or fatal here, before any training.

    Args:
        ledger: an ``IdStore`` state (or a ``DocumentLedger``: no watermarks, every shard read whole).
        object_field: when set (oracle weights), every document (and pool document) must carry it.
        tokenizer: when given, a document it cannot tokenise is bad input (quarantined or fatal like a
            malformed line), so a plan never holds a document that would fail every later run.
        pool_sample: pool documents kept, at least ``pool_per_new`` per new document (a seeded
            reservoir sample over the pool's shards, in their order; the whole pool when smaller).
            0 keeps the whole pool.
        pool_seed: seed of that sample (with the period).

    Raises:
        StreamError: bad input with on_error='fatal'.
        ConfigError: a document without ``object_field``.
    """
    marks = ledger.watermarks()
    source = DocumentStream(stream, watermarks=marks)
    new: list[Document] = []
    offsets: dict[tuple[str, int], int] = {}
    for doc in ledger.unseen(source, source.stats, on_changed=source.changed_text):
        if tokenizer is not None and not _tokenizes(tokenizer, doc, source):
            continue
        new.append(doc)
        if source.record_offset is not None:
            offsets[doc.shard, doc.line] = source.record_offset
        if max_documents and len(new) >= max_documents:
            break
    period = 0
    if version is not None:
        period = json.loads((version / "version.json").read_text()).get("period", 0) + 1
    rehearsal = []
    if pool is not None:
        size = max(pool_sample, math.ceil(pool_per_new * len(new))) if pool_sample else 0
        rehearsal = sample_pool(pool, size, f"pool:{pool_seed}:{period}", offsets)
    if object_field is not None:
        for doc in new + rehearsal:  # a rehearsed row without an object would train on nothing
            if not doc.meta.get(object_field):
                raise ConfigError(
                    f"weights.method=oracle: {doc.shard}:{doc.line}: document has no "
                    f"'{object_field}' field (weights.object_field)"
                )
    base = version.name if version else None
    stats = source.stats.to_dict()
    reached = source.new_watermarks()
    plan = Plan(run_id, base, period, recipe_hash, source.position, stats, new, rehearsal, reached)
    plan.previous, plan.offsets = {s: marks.get(s) for s in reached}, offsets
    return plan


def sample_pool(config: StreamConfig, size: int, seed: str, offsets: dict) -> list[Document]:
    """``size`` pool documents (0: all), a reservoir sample in pool order; their offsets go to ``offsets``."""
    stream = DocumentStream(config)

    def located():
        for doc in stream:
            yield doc, stream.record_offset

    picked = [item for _, item in reservoir_sample(located(), size or math.inf, random.Random(seed))]
    for doc, offset in picked:
        if offset is not None:
            offsets[doc.shard, doc.line] = offset
    return [doc for doc, _ in picked]


def _tokenizes(tokenizer, doc: Document, source: DocumentStream) -> bool:
    try:
        tokenizer(doc.text)
    except Exception as e:  # noqa: BLE001  (tokenizers raise several types on text they cannot read)
        source.reject(doc, "untokenizable", f"the tokenizer cannot read it ({type(e).__name__}: {e})")
        return False
    return True


def load_plan(
    work: Path, version: Path | None, recipe_hash: str, stream: StreamConfig, pool: StreamConfig | None
) -> Plan | None:
    """The plan of an interrupted run that may resume, or None (no plan, or a stale one).

    Raises:
        ValueError: a planned document whose text changed in its shard since (see ``resolve_refs``).
    """
    path = work / PLAN_FILE
    if not path.is_file():
        return None
    obj = json.loads(path.read_text(encoding="utf-8"))
    base = version.name if version else None
    if obj.get("format") not in (PLAN_FORMAT, PLAN_FORMAT_V2) or obj.get("base_version") != base:
        logger.info(
            "discarding %s: it was planned on version %s, current is %s", work, obj.get("base_version"), base
        )
        return None
    if obj.get("recipe_hash") != recipe_hash:
        logger.warning("discarding the interrupted run in %s: the recipe changed since; starting over", work)
        return None
    return Plan.from_json(obj, stream, pool)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S")
