"""The plan of a nightly run: which documents it learns, fixed before the first step.

A run fixes its documents (and its rehearsal pool) in ``work/plan.json`` before training, so a
killed run resumes over exactly the same documents, epochs and rehearsal draws even if more arrived
since; those wait for the next run, which finds them unseen in the published ledger. A plan is
valid only for the version it was planned on and the recipe settings that decide the model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.documents import Document, Position
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.nightly.ledger import DocumentLedger
from ckl_toolkit.nightly.sources import DocumentStream, StreamConfig

if TYPE_CHECKING:
    from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec

logger = logging.getLogger(__name__)

PLAN_FORMAT = "ckl-update-plan/2"
PLAN_FILE = "plan.json"


@dataclass
class Plan:
    """What one run learns; ``period`` counts the versions before it (mix-review decays per period)."""

    run: str
    base_version: str | None
    period: int
    recipe_hash: str
    stream_end: Position
    stream_stats: dict
    new: list[Document] = field(default_factory=list)
    pool: list[Document] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT, "run": self.run, "base_version": self.base_version, "period": self.period,
            "recipe_hash": self.recipe_hash, "stream_end": self.stream_end.to_json(),
            "stream_stats": self.stream_stats, "new": [d.to_json() for d in self.new],
            "pool": [d.to_json() for d in self.pool],
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict) -> Plan:
        return cls(
            obj["run"], obj["base_version"], obj["period"], obj["recipe_hash"],
            Position.from_json(obj["stream_end"]), obj["stream_stats"],
            [Document.from_json(d) for d in obj["new"]], [Document.from_json(d) for d in obj["pool"]],
        )  # fmt: skip

    def save(self, work: Path) -> None:
        write_json_atomic(work / PLAN_FILE, self.to_json())

    def epoch_documents(
        self, mix_review: MixReviewSpec, batching: BatchSpec, seed: int, epoch: int
    ) -> tuple[list[Document], float]:
        """The documents of ``epoch`` in training order (new + rehearsal draws), and the rehearsal ratio."""
        shuffle = batching.shuffle_key(seed, self.period, epoch)
        return mix_review.epoch(self.new, self.pool, self.period, epoch, shuffle)


def collect_plan(
    stream: StreamConfig,
    pool: StreamConfig | None,
    ledger: DocumentLedger,
    version: Path | None,
    run_id: str,
    recipe_hash: str,
    max_documents: int = 0,
    object_field: str | None = None,
    tokenizer=None,
) -> Plan:
    """One pass over the stream: the unseen documents (at most ``max_documents``), and the pool.

    Bad records are quarantined or fatal here, before any training.

    Args:
        object_field: when set (oracle weights), every document (and pool document) must carry it.
        tokenizer: when given, a document it cannot tokenise is bad input (quarantined or fatal like a
            malformed line), so a plan never holds a document that would fail every later run.

    Raises:
        StreamError: bad input with on_error='fatal'.
        ConfigError: a document without ``object_field``.
    """
    source = DocumentStream(stream)
    new: list[Document] = []
    for doc in ledger.unseen(source, source.stats, on_changed=source.changed_text):
        if tokenizer is not None and not _tokenizes(tokenizer, doc, source):
            continue
        new.append(doc)
        if max_documents and len(new) >= max_documents:
            break
    rehearsal = list(DocumentStream(pool)) if pool is not None else []
    if object_field is not None:
        for doc in new + rehearsal:  # a rehearsed row without an object would train on nothing
            if not doc.meta.get(object_field):
                raise ConfigError(
                    f"weights.method=oracle: {doc.shard}:{doc.line}: document has no "
                    f"'{object_field}' field (weights.object_field)"
                )
    period = 0
    if version is not None:
        period = json.loads((version / "version.json").read_text()).get("period", 0) + 1
    base = version.name if version else None
    stats = source.stats.to_dict()
    return Plan(run_id, base, period, recipe_hash, source.position, stats, new, rehearsal)


def _tokenizes(tokenizer, doc: Document, source: DocumentStream) -> bool:
    try:
        tokenizer(doc.text)
    except Exception as e:  # noqa: BLE001  (tokenizers raise several types on text they cannot read)
        source.reject(doc, "untokenizable", f"the tokenizer cannot read it ({type(e).__name__}: {e})")
        return False
    return True


def load_plan(work: Path, version: Path | None, recipe_hash: str) -> Plan | None:
    """The plan of an interrupted run that may resume, or None (no plan, or a stale one)."""
    path = work / PLAN_FILE
    if not path.is_file():
        return None
    obj = json.loads(path.read_text(encoding="utf-8"))
    base = version.name if version else None
    if obj.get("format") != PLAN_FORMAT or obj.get("base_version") != base:
        logger.info(
            "discarding %s: it was planned on version %s, current is %s", work, obj.get("base_version"), base
        )
        return None
    if obj.get("recipe_hash") != recipe_hash:
        logger.warning("discarding the interrupted run in %s: the recipe changed since; starting over", work)
        return None
    return Plan.from_json(obj)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S")
