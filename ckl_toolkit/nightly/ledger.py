"""The seen-set as one JSON file: which document ids a model has learned (a small, standalone ledger).

``ckl update`` keeps its ledger in the SQLite id store (``nightly.idstore``), which reads and migrates
these files (``ckl-ledger/1`` and ``/2``); this class stays for small jobs and tools. Commit it
together with the model that learned its ids: ids committed before that model is saved would be
lost by a crash in between.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.hashing import text_hash
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.nightly.sources import StreamStats

LEDGER_FORMAT = "ckl-ledger/2"
LEDGER_FORMAT_V1 = "ckl-ledger/1"


class MarkedIds:
    """What both ledgers (this JSON file, ``nightly.idstore``'s SQLite store) share: ids marked by a step
    stay pending until ``commit``, each with a fingerprint of its text so a changed text is caught.

    Subclasses hold ``_pending`` and answer ``_fingerprint(id)`` for committed or pending ids.
    """

    _pending: dict[str, str | None]

    def _fingerprint(self, key: str) -> str | None:
        raise NotImplementedError

    def changed(self, doc: Document) -> bool:
        """True if the id was learned with another text (unknown for ids migrated from ckl-ledger/1)."""
        known = self._fingerprint(doc.id)
        return known is not None and known != text_hash(doc.text)

    def mark(self, docs: Iterable[Document | str]) -> None:
        for d in docs:
            if isinstance(d, str):
                self._pending.setdefault(d, None)
            else:
                self._pending[d.id] = text_hash(d.text)

    def unseen(
        self,
        docs: Iterable[Document],
        stats: StreamStats | None = None,
        on_changed: Callable[[Document, str], Document | None] | None = None,
    ) -> Iterator[Document]:
        """Documents not in the ledger, each id once per pass (see ``unseen_documents``)."""
        return unseen_documents(self, docs, stats, on_changed)


class DocumentLedger(MarkedIds):
    """Ids of the documents already learned (with a fingerprint of their text), so consecutive runs
    learn each exactly once.

    Stored as JSON ``{"format": "ckl-ledger/2", "count", "ids": {id: text fingerprint}}`` and only ever
    replaced atomically; a ``ckl-ledger/1`` file (a list of ids, no fingerprints) is read as well. ``mark``
    what a step has learned, ``commit`` together with the checkpoint or version that holds it: ids
    committed before the model that learned them is saved would be lost by a crash in between.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._committed = self._load(self.path)
        self._pending: dict[str, str | None] = {}

    @staticmethod
    def _load(path: Path) -> dict[str, str | None]:
        if not path.exists():
            return {}
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            # Never start empty over a damaged ledger: that would learn every document again.
            raise ValueError(f"{path}: unreadable ledger ({e}); restore it from the current version") from e
        if isinstance(obj, dict) and obj.get("format") == LEDGER_FORMAT and isinstance(obj.get("ids"), dict):
            return dict(obj["ids"])
        if (
            isinstance(obj, dict)
            and obj.get("format") == LEDGER_FORMAT_V1
            and isinstance(obj.get("ids"), list)
        ):
            return dict.fromkeys(obj["ids"])  # no fingerprints: texts were not recorded
        raise ValueError(f"{path}: not a {LEDGER_FORMAT} (or {LEDGER_FORMAT_V1}) ledger")

    def __len__(self) -> int:
        return len(self._committed.keys() | self._pending.keys())

    def _fingerprint(self, key: str) -> str | None:
        return self._pending.get(key, self._committed.get(key))

    def seen(self, doc: Document | str) -> bool:
        """True if the document's id was committed or marked."""
        key = doc if isinstance(doc, str) else doc.id
        return key in self._committed or key in self._pending

    def commit(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write committed + marked ids to ``path`` (default: the ledger's own)."""
        self._committed.update(self._pending)
        self._pending.clear()
        target = Path(path) if path else self.path
        ids = dict(sorted(self._committed.items()))
        write_json_atomic(target, {"format": LEDGER_FORMAT, "count": len(ids), "ids": ids})
        return target

    def watermarks(self) -> dict:
        """A JSON ledger keeps no shard watermarks: every shard is read whole."""
        return {}

    def ids(self) -> list[str]:
        return sorted(self._committed.keys() | self._pending.keys())


def unseen_documents(
    ledger,
    docs: Iterable[Document],
    stats: StreamStats | None = None,
    on_changed: Callable[[Document, str], Document | None] | None = None,
) -> Iterator[Document]:
    """Documents not in ``ledger`` (anything with ``seen`` and ``changed``), each id once per pass.

    An id met again with the same text is skipped (``seen`` earlier, or a ``duplicate`` in this
    pass). An id met again with *another* text goes to ``on_changed(doc, why)``, which returns
    the document to learn instead (e.g. under a new id) or None; without it, it is skipped.
    """
    passed: dict[str, str] = {}
    for doc in docs:
        fingerprint = text_hash(doc.text)
        if doc.id in passed or ledger.seen(doc):
            same = passed[doc.id] == fingerprint if doc.id in passed else not ledger.changed(doc)
            if stats is not None and (same or on_changed is None):  # else the handler reports it
                stats.skipped[("duplicate" if doc.id in passed else "seen") if same else "changed_text"] += 1
            if same or on_changed is None:
                continue
            doc = on_changed(doc, "learned before" if doc.id not in passed else "met earlier in this run")
            if doc is None or doc.id in passed or ledger.seen(doc):
                continue
        passed[doc.id] = fingerprint  # on_changed keeps the text
        yield doc
