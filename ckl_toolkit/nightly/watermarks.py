"""Per-shard watermarks: how much of each shard the served model has consumed, so a night reads what is new.

A ``Watermark`` says, for one shard: the bytes consumed (``offset``: the end of the last consumed
record for JSONL and CSV; the file's size when it was read for parquet and ``hf`` shards, whose
records have no byte offset), the last line or row consumed (``line``), the documents in that prefix
(``docs``, reported as ``seen`` when the prefix is skipped), whether the pass reached the end of the
shard (``eof``), a fingerprint of the consumed prefix, and a hash of the stream settings it was read
with (``settings``: format, fields, max_chars, on_error, on_duplicate, triple_template), since those
decide what its records meant; a watermark read under other settings does not hold.

A night decides per shard (``decide``): no watermark, read it whole (a new shard, wherever it sorts);
prefix unchanged and nothing after it, skip it without opening it further; prefix unchanged and more
bytes after it, resume after the watermark (JSONL and CSV seek to ``offset``; parquet and ``hf``
re-read up to ``line``); prefix changed (rewritten, truncated), rescan it whole with a warning, the
id store skipping what was learned from it before.

A shard whose inode, modification time (ns) and size are those recorded when it was consumed to its
end is skipped on a ``stat`` alone, as ``make`` and ``rsync`` trust them. Any other shard with a
watermark is fingerprinted: SHA-256 over the prefix length and a few 4 KiB blocks of it (the first,
the last and 6 evenly spaced), constant I/O per shard (32 KiB), not the history. Appends never touch
those bytes; a rewrite, truncation or reordering that moves bytes under a sampled block or changes
the length is caught. An edit that keeps the file's length, and its modification time or the sampled
blocks, is not: edit a document under a new id, in a new shard.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

BLOCK = 4096  # bytes per sampled block
MIDDLE = 6  # sampled blocks between the first and the last
SEEKABLE = ("jsonl", "csv")  # formats whose records end at a byte offset a reader can seek to


@dataclass(frozen=True)
class Watermark:
    """What one shard's consumed prefix was: ``offset`` bytes, up to ``line``, holding ``docs`` documents."""

    offset: int
    line: int
    docs: int
    eof: bool
    fingerprint: str
    settings: str = ""
    stat: str = ""  # "inode:mtime_ns" when the prefix was the whole file, else ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Watermark:
        values = (int(obj["offset"]), int(obj["line"]), int(obj["docs"]), bool(obj["eof"]))
        return cls(*values, obj["fingerprint"], obj.get("settings", ""), obj.get("stat", ""))

    @classmethod
    def of(cls, path: str, offset: int, line: int, docs: int, eof: bool, settings: str) -> Watermark:
        """The watermark of ``path``'s first ``offset`` bytes, read up to ``line``."""
        st = os.stat(path)
        untouched = f"{st.st_ino}:{st.st_mtime_ns}" if st.st_size == offset else ""
        return cls(offset, line, docs, eof, prefix_fingerprint(path, offset), settings, untouched)


@dataclass(frozen=True)
class Decision:
    """How a night reads one shard: ``action`` is new, skip, resume, rescan (its consumed prefix changed)
    or reread (the stream settings changed); resume after ``line``."""

    action: str
    line: int = 0
    offset: int = 0
    docs: int = 0  # documents before the resume point (reported as seen)


def prefix_fingerprint(path: str | os.PathLike, length: int) -> str:
    """SHA-256 (32 hex digits) of ``length`` and the sampled blocks of the file's first ``length`` bytes."""
    h = hashlib.sha256(str(length).encode())
    with open(path, "rb") as f:
        for start in _block_starts(length):
            f.seek(start)
            h.update(f.read(min(BLOCK, length - start)))
    return h.hexdigest()[:32]


def _block_starts(length: int) -> list[int]:
    if length <= BLOCK * (MIDDLE + 2):  # small: every byte
        return list(range(0, length, BLOCK))
    last = length - BLOCK
    return sorted({0, last, *(last * i // (MIDDLE + 1) for i in range(1, MIDDLE + 1))})


def decide(path: str, mark: Watermark | None, fmt: str, settings: str = "") -> Decision:
    """How to read shard ``path`` (format ``fmt``, stream settings hash ``settings``) given its
    watermark (None: never consumed)."""
    if mark is None:
        return Decision("new")
    if mark.settings != settings:
        return Decision("reread")
    st = os.stat(path)
    size = st.st_size
    if mark.stat and mark.stat == f"{st.st_ino}:{st.st_mtime_ns}" and size == mark.offset and mark.eof:
        return Decision("skip", mark.line, mark.offset, mark.docs)  # not touched since: not even sampled
    if size < mark.offset or prefix_fingerprint(path, mark.offset) != mark.fingerprint:
        return Decision("rescan")
    nothing_after = size == mark.offset and (mark.eof or fmt in SEEKABLE)
    if nothing_after:
        return Decision("skip", mark.line, mark.offset, mark.docs)
    return Decision("resume", mark.line, mark.offset if fmt in SEEKABLE else 0, mark.docs)
