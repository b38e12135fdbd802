"""The seen-set of the nightly job: which document ids a served version has learned.

Each version commits its ledger beside its model, and each step checkpoint beside its weights: ids
committed before the model that learned them is saved would be lost by a crash in between.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.nightly.sources import StreamStats

LEDGER_FORMAT = "ckl-ledger/1"


class DocumentLedger:
    """Ids of the documents already learned, so consecutive runs learn each exactly once.

    Stored as JSON ``{"format", "count", "ids"}`` and only ever replaced atomically. ``mark`` what
    a step has learned, ``commit`` together with the checkpoint or version that holds it: ids
    committed before the model that learned them is saved would be lost by a crash in between.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._committed = self._load(self.path)
        self._pending: set[str] = set()

    @staticmethod
    def _load(path: Path) -> set[str]:
        if not path.exists():
            return set()
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            # Never start empty over a damaged ledger: that would learn every document again.
            raise ValueError(f"{path}: unreadable ledger ({e}); restore it from the current version") from e
        if (
            not isinstance(obj, dict)
            or obj.get("format") != LEDGER_FORMAT
            or not isinstance(obj.get("ids"), list)
        ):
            raise ValueError(f"{path}: not a {LEDGER_FORMAT} ledger")
        return set(obj["ids"])

    def __len__(self) -> int:
        return len(self._committed | self._pending)

    def seen(self, doc: Document | str) -> bool:
        """True if the document was committed or marked."""
        key = doc if isinstance(doc, str) else doc.id
        return key in self._committed or key in self._pending

    def mark(self, docs: Iterable[Document | str]) -> None:
        self._pending.update(d if isinstance(d, str) else d.id for d in docs)

    def commit(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write committed + marked ids to ``path`` (default: the ledger's own)."""
        self._committed |= self._pending
        self._pending.clear()
        target = Path(path) if path else self.path
        ids = sorted(self._committed)
        write_json_atomic(target, {"format": LEDGER_FORMAT, "count": len(ids), "ids": ids})
        return target

    def unseen(self, docs: Iterable[Document], stats: StreamStats | None = None) -> Iterator[Document]:
        """Documents not in the ledger, each id once per pass (a repeated id is a duplicate)."""
        passed: set[str] = set()
        for doc in docs:
            reason = "seen" if self.seen(doc) else "duplicate" if doc.id in passed else None
            if reason:
                if stats is not None:
                    stats.skipped[reason] += 1
                continue
            passed.add(doc.id)
            yield doc
