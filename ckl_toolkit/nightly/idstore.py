"""The id store: every id a model has learned, and its shards' watermarks, in one SQLite file.

``output_dir/ledger.sqlite`` (standard-library ``sqlite3``) holds every *state* of the ledger at
once; a checkpoint or a version commits a state and records only a reference to it, its
``ledger.json``: ``{"format": "ckl-ledger/3", "store": "<path of ledger.sqlite relative to it>",
"seq": S, "root": R, "count": N}``. Tables::

    meta(key, value)                      the store's format and the next commit number
    commits(seq, base, root, kind, label, created, added, total)
    ids(id, seq, fingerprint)             one row per id learned, in the commit that learned it
    watermarks(path, seq, offset, line, docs, eof, fingerprint, settings, stat)  per shard, when it moved

State S holds the ids rows with R <= seq <= S (R: the root of its line, see below) and, per shard,
the watermark row of highest seq in that range. Commit numbers only grow. Committing on top of base
state B first deletes every commit after B: those belong to a run killed before the checkpoint or
version naming them was renamed into place, or to a run dropped since, and nothing that can still be
resumed or served names them. So a checkpoint or version costs its new rows and a few hundred bytes,
not a copy of the history, and a kill anywhere leaves every reference pointing at what its model knew.

Order of writes: the SQLite transaction commits (durably) before the checkpoint or version holding
its reference is renamed into place; a kill in between leaves an unnamed commit that the next commit
deletes.

A ``ckl-ledger/1`` or ``/2`` JSON file (a full id list) is migrated when first opened: its ids become
a root commit (R = S, nothing before it counts), found again by the file's SHA-256. An unreadable or
missing store, or a reference to a state it does not hold, is an error, never an empty ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.nightly.ledger import LEDGER_FORMAT, LEDGER_FORMAT_V1, DocumentLedger, MarkedIds
from ckl_toolkit.nightly.watermarks import Watermark

logger = logging.getLogger(__name__)

STORE_FILE = "ledger.sqlite"
REF_FORMAT = "ckl-ledger/3"
STORE_FORMAT = "ckl-idstore/1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commits (
    seq INTEGER PRIMARY KEY, base INTEGER NOT NULL, root INTEGER NOT NULL, kind TEXT NOT NULL,
    label TEXT, created TEXT NOT NULL, added INTEGER NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ids (
    id TEXT NOT NULL, seq INTEGER NOT NULL, fingerprint BLOB, PRIMARY KEY (id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    path TEXT NOT NULL, seq INTEGER NOT NULL, "offset" INTEGER, line INTEGER, docs INTEGER,
    eof INTEGER, fingerprint TEXT, settings TEXT, stat TEXT, PRIMARY KEY (path, seq)) WITHOUT ROWID;
"""


class IdStore(MarkedIds):
    """One state of the store: ``seen``/``changed``/``mark``/``unseen`` like ``DocumentLedger``, and
    ``commit`` to write the marked ids (and watermarks) as the next state.

    Args:
        path: the SQLite file (created, with its schema, when first opened for writing).
        seq, root: the state (0, 0: empty).
        readonly: never write (a dry run); ``commit`` refuses.
    """

    def __init__(self, path: str | os.PathLike, seq: int = 0, root: int = 0, readonly: bool = False):
        self.path, self.seq, self.root, self.readonly = Path(path), seq, root, readonly
        self._pending: dict[str, str | None] = {}
        self._db: sqlite3.Connection | None = None
        self._total = 0
        if seq:
            row = self._query("SELECT root, total FROM commits WHERE seq = ?", (seq,)).fetchone()
            if row is None or row[0] != root:
                raise ValueError(
                    f"{self.path}: holds no ledger state {seq} (root {root}); restore the store from a "
                    "backup of the output directory, or the version's ledger from the run that made it"
                )
            self._total = row[1]

    # --- the connection

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self.readonly or self.seq:
                if not self.path.is_file():
                    raise ValueError(f"{self.path}: the ledger store is missing (a version references it)")
                mode = "ro" if self.readonly else "rw"
                self._db = sqlite3.connect(
                    f"file:{self.path}?mode={mode}", uri=True, isolation_level=None, timeout=60
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            try:
                self._db.execute("PRAGMA synchronous = FULL")
                if not self.readonly:
                    self._create_schema(self._db)
                fmt = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            except sqlite3.DatabaseError as e:
                self._db.close()
                self._db = None
                raise ValueError(
                    f"{self.path}: unreadable ledger store ({e}); restore it, never delete it"
                ) from e
            if fmt is None or fmt[0] != STORE_FORMAT:
                raise ValueError(f"{self.path}: not a {STORE_FORMAT} store (format {fmt})")
        return self._db

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        """Tables and the format row in one transaction: a kill leaves all of them or none."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('next_seq', '1')", (STORE_FORMAT,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _query(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self._connect().execute(sql, args)
        except sqlite3.DatabaseError as e:
            raise ValueError(
                f"{self.path}: unreadable ledger store ({e}); restore it, never delete it"
            ) from e

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __getstate__(self):  # a connection does not cross processes; the state does
        return {**self.__dict__, "_db": None}

    # --- the DocumentLedger interface

    def _lookup(self, key: str) -> tuple[bool, str | None]:
        if key in self._pending:
            return True, self._pending[key]
        if not self.seq:
            return False, None
        row = self._query(
            "SELECT fingerprint FROM ids WHERE id = ? AND seq BETWEEN ? AND ? LIMIT 1",
            (key, self.root, self.seq),
        ).fetchone()
        if row is None:
            return False, None
        return True, row[0].hex() if row[0] is not None else None

    def __len__(self) -> int:
        return self._total + sum(1 for k in self._pending if not self._committed(k))

    def _committed(self, key: str) -> bool:
        return (
            bool(self.seq)
            and self._query(
                "SELECT 1 FROM ids WHERE id = ? AND seq BETWEEN ? AND ? LIMIT 1", (key, self.root, self.seq)
            ).fetchone()
            is not None
        )

    def seen(self, doc: Document | str) -> bool:
        return self._lookup(doc if isinstance(doc, str) else doc.id)[0]

    def _fingerprint(self, key: str) -> str | None:
        return self._lookup(key)[1]

    def ids(self) -> list[str]:
        """Every id of this state and the marked ones, sorted (for inspection: linear in the history)."""
        rows = (
            self._query("SELECT id FROM ids WHERE seq BETWEEN ? AND ?", (self.root, self.seq))
            if self.seq
            else []
        )
        return sorted({r[0] for r in rows} | self._pending.keys())

    def watermarks(self) -> dict[str, Watermark]:
        """Each shard's watermark in this state (shards with none are absent)."""
        if not self.seq:
            return {}
        rows = self._query(
            'SELECT path, "offset", line, docs, eof, fingerprint, settings, stat, MAX(seq) FROM watermarks '
            "WHERE seq BETWEEN ? AND ? GROUP BY path",
            (self.root, self.seq),
        )
        return {r[0]: Watermark(r[1], r[2], r[3], bool(r[4]), *r[5:8]) for r in rows if r[1] is not None}

    # --- commits

    def commit(
        self,
        ref: str | os.PathLike | None,
        kind: str,
        label: str = "",
        watermarks: dict[str, Watermark | None] | None = None,
    ) -> Path | None:
        """Write the marked ids (and ``watermarks``; None drops a shard's) as the next state, then
        its reference to ``ref`` (None: none, for an ``advance``); this object then stands on that state.

        One transaction: the commits after this state are deleted, the new rows inserted. ``ref`` is
        written after it commits, so a reference always names a committed state.
        """
        if self.readonly:
            raise ValueError(f"{self.path}: opened read-only")
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._allocate(db)
            root = self.root or seq
            rows = [
                (k, seq, bytes.fromhex(f) if f else None)
                for k, f in self._pending.items()
                if not self._committed(k)
            ]
            db.executemany("INSERT INTO ids VALUES (?, ?, ?)", rows)
            db.executemany(
                "INSERT INTO watermarks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(p, seq, *_watermark_row(w)) for p, w in sorted((watermarks or {}).items())],
            )
            total = self._total + len(rows)
            db.execute(
                "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, self.seq, root, kind, label, _now(), len(rows), total),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.seq, self.root, self._total = seq, root, total
        self._pending.clear()
        return self.write_ref(ref) if ref is not None else None

    def _allocate(self, db: sqlite3.Connection) -> int:
        """The next commit number, after deleting the commits past this state (see the module)."""
        later = [r[0] for r in db.execute("SELECT seq FROM commits WHERE seq > ?", (self.seq,))]
        if later:
            logger.info(
                "%s: dropping ledger commits %s (no checkpoint or version names them)", self.path, later
            )
            db.execute("DELETE FROM ids WHERE seq > ?", (self.seq,))
            db.execute("DELETE FROM watermarks WHERE seq > ?", (self.seq,))
            db.execute("DELETE FROM commits WHERE seq > ?", (self.seq,))
        seq = int(db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
        db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(seq + 1),))
        return seq

    def write_ref(self, ref: str | os.PathLike) -> Path:
        ref = Path(ref)
        store = os.path.relpath(self.path.resolve(), ref.parent.resolve())
        write_json_atomic(
            ref,
            {"format": REF_FORMAT, "store": store, "seq": self.seq, "root": self.root, "count": self._total},
        )
        return ref

    def follow_advances(self) -> IdStore:
        """Move to the watermark-only commits made on top of this state by nights with nothing to learn."""
        if not self.path.is_file():
            return self
        while True:
            row = self._query(
                "SELECT seq, total FROM commits WHERE base = ? AND kind = 'advance' AND root = ?",
                (self.seq, self.root or -1),
            ).fetchone()
            if row is None and not self.seq:  # from the empty state the first commit starts a root
                row = self._query(
                    "SELECT seq, total FROM commits WHERE base = 0 AND kind = 'advance' AND root = seq"
                ).fetchone()
            if row is None:
                return self
            self.seq, self._total = row
            self.root = self.root or row[0]


def _watermark_row(w: Watermark | None) -> tuple:
    if w is None:  # the shard's watermark is dropped: the next night reads it whole
        return (None,) * 7
    return w.offset, w.line, w.docs, int(w.eof), w.fingerprint, w.settings, w.stat


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# Opening a state from its reference.


def open_ledger(
    output_dir: str | os.PathLike, ref: str | os.PathLike | None, readonly: bool = False
) -> IdStore | DocumentLedger:
    """The ledger state ``ref`` (a ``ledger.json``) names, in ``output_dir``'s store.

    ``ref`` None: the empty state (a first run). A ``ckl-ledger/1`` or ``/2`` file is migrated into
    the store (read-only: read as it is). Then watermark-only commits made on top of it are followed.

    Raises:
        ValueError: an unreadable reference or store, or a state the store does not hold.
    """
    store = Path(output_dir) / STORE_FILE
    if ref is None:
        return IdStore(store, readonly=readonly).follow_advances()
    ref = Path(ref)
    if not ref.is_file():
        raise ValueError(f"{ref}: the version's ledger is missing; restore it (never start over)")
    data = ref.read_bytes()
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{ref}: unreadable ledger ({e}); restore it from the current version") from e
    if isinstance(obj, dict) and obj.get("format") == REF_FORMAT:
        path = (ref.parent / obj["store"]).resolve()
        return IdStore(path, int(obj["seq"]), int(obj["root"]), readonly).follow_advances()
    if isinstance(obj, dict) and obj.get("format") in (LEDGER_FORMAT, LEDGER_FORMAT_V1):
        if readonly:
            return DocumentLedger(ref)
        return migrate(
            DocumentLedger(ref), store, hashlib.sha256(data).hexdigest(), str(ref)
        ).follow_advances()
    raise ValueError(f"{ref}: not a {REF_FORMAT}, {LEDGER_FORMAT} or {LEDGER_FORMAT_V1} ledger")


def migrate(old: DocumentLedger, store: Path, digest: str, label: str) -> IdStore:
    """The store state holding exactly ``old``'s ids: found by the file's digest, else a new root commit."""
    new = IdStore(store)
    key = f"migrated:{digest}"
    row = new._query("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is not None:
        seq = int(row[0])
        root = new._query("SELECT root FROM commits WHERE seq = ?", (seq,)).fetchone()
        if root is not None:
            new.close()
            return IdStore(store, seq, root[0])
    db = new._connect()
    db.execute("BEGIN IMMEDIATE")
    try:
        seq = int(db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
        db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(seq + 1),))
        ids = old._committed
        db.executemany(
            "INSERT INTO ids VALUES (?, ?, ?)",
            ((k, seq, bytes.fromhex(f) if f else None) for k, f in ids.items()),
        )
        db.execute(
            "INSERT INTO commits VALUES (?, 0, ?, 'migrated', ?, ?, ?, ?)",
            (seq, seq, label, _now(), len(ids), len(ids)),
        )
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(seq)))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    logger.info("migrated %s (%d ids) into %s as state %d", label, len(ids), store, seq)
    new.close()
    return IdStore(store, seq, seq)


@contextlib.contextmanager
def closing(ledger):
    try:
        yield ledger
    finally:
        if isinstance(ledger, IdStore):
            ledger.close()
