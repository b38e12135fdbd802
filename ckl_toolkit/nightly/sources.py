"""Document sources for the nightly update: shards, readers, exact positions, quarantine.

Order. Every entry of ``StreamConfig.paths`` is expanded (a directory recursively, a glob by its
matches; hidden files such as half-written ``.x.tmp`` are ignored) and the union of shards is sorted
by path string. A pass reads shard by shard in that order and record by record inside a shard, so
the order depends only on the files. Name shards so they sort in arrival order (zero-pad numbers).

Lines. ``Document.line`` is 1-based: the physical line in JSONL, the physical line where the record
ends in CSV (the header is line 1), the row number in parquet and ``hf`` shards.

Positions. ``Position(shard, line)`` names the last record consumed. Resuming skips every shard
whose path sorts before ``shard`` and every record of ``shard`` up to ``line``. The rule is a
comparison, not an index, so it survives shards being added; a shard that appears *before* the
position is left to the next pass, where the ledger finds it unseen.

Identity. A document's id is its ``id_field`` when present and non-empty (ints are stringified);
otherwise ``"sha256:" + sha256(text)``, so id-less copies of one text count as one document. A
document edited under an unchanged id is *not* learned again: give a new version a new id.

Bad input. A record that cannot become a document is reported with shard, line and field; with
``on_error="quarantine"`` its raw form goes to ``quarantine_dir/<shard-name>.jsonl`` (once: a
record already there is not written again when a later pass meets it), with ``"fatal"`` a
``StreamError`` stops the pass. An unterminated last line that does not parse is a writer still
appending: it is counted (``skipped["incomplete_tail"]``) and left for the next pass.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.core.documents import Document, Position
from ckl_toolkit.core.hashing import text_hash
from ckl_toolkit.core.io import JsonlError, append_jsonl, parse_json_object
from ckl_toolkit.nightly.watermarks import SEEKABLE, Watermark, decide

logger = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "csv", "parquet", "hf")
ON_ERROR = ("quarantine", "fatal")
BOM = b"\xef\xbb\xbf"
# Not .json: that is usually one JSON document (a ledger, a config), not one object a line.
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
TRIPLE_FIELDS = ("subject", "relation", "object")
RENDERED_TRIPLES = "rendered-triples"


@dataclass
class StreamConfig:
    """Where the documents are and what to do with bad ones (validation errors name the field)."""

    paths: list[str] = fld(
        [], help="Shard files, directories (searched recursively) or globs; the union is sorted."
    )
    format: str = fld(
        "auto",
        "auto (by extension: .jsonl/.ndjson, .csv, .parquet), jsonl, csv, parquet, or hf "
        "(datasets streaming of the same local files; a malformed line fails the whole shard).",
        choices=FORMATS,
    )
    text_field: str = fld(
        "text", "Field holding the text. Rows without it but with subject, relation and object are rendered."
    )
    id_field: str = fld("id", "Field holding the document id; documents without one get a content hash.")
    max_chars: int = fld(1_000_000, "Longer documents are bad input (quarantined or fatal), not truncated.")
    on_error: str = fld(
        "quarantine",
        "quarantine: set bad records aside and go on; fatal: stop at the first.",
        choices=ON_ERROR,
    )
    on_duplicate: str = fld(
        "skip",
        "An id met again with another text (learned before, or twice in one run): skip it (logged with "
        "file:line), quarantine it (a bad record, see on_error), or new_version (learn the new text as "
        "the document '<id>#<text fingerprint>').",
        choices=("skip", "quarantine", "new_version"),
    )
    quarantine_dir: str | None = fld(None, "Directory of <shard-name>.jsonl quarantine files.")
    triple_template: str = fld("{subject} {relation} {object}.", "How a subject,relation,object row reads.")

    def __post_init__(self) -> None:
        require(
            not isinstance(self.paths, (str, os.PathLike)), "paths", "expected a list; wrap the path in one"
        )
        self.paths = [os.fspath(p) for p in self.paths]
        require(bool(self.paths), "paths", "empty; give at least one file, directory or glob")
        check_choices(self)
        for name in ("text_field", "id_field"):
            require(
                isinstance(getattr(self, name), str) and getattr(self, name) != "", name, "must be non-empty"
            )
        ok = isinstance(self.max_chars, int) and not isinstance(self.max_chars, bool) and self.max_chars > 0
        require(ok, "max_chars", f"must be a positive int, got {self.max_chars!r}")
        require(
            self.on_error != "quarantine" or bool(self.quarantine_dir),
            "quarantine_dir",
            "needed with on_error='quarantine' (or set on_error='fatal')",
        )
        try:
            self.triple_template.format(subject="s", relation="r", object="o")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"triple_template: {e!r}; use {{subject}}, {{relation}} and {{object}}") from e


@dataclass
class StreamStats:
    """Counts for metrics.jsonl. ``skipped`` keys: bad_json, non_utf8, bad_columns, missing_field,
    bad_type, empty_text, too_long, incomplete_tail (left for the next pass), seen (in the ledger),
    duplicate (an id met earlier in this pass). ``rescanned``: shards read again whole because the
    part read by earlier runs changed."""

    read: int = 0
    blank: int = 0
    quarantined: int = 0
    skipped: Counter = field(default_factory=Counter)
    rescanned: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(sorted(self.skipped.items()))}


class StreamError(JsonlError):
    """Bad input met with on_error='fatal'; the message is ``file:line: field: reason``."""

    def __init__(self, shard: str, line: int, field: str, reason: str):
        super().__init__(f"{shard}:{line}: {field}: {reason}")
        self.shard, self.line, self.field, self.reason = shard, line, field, reason


class _Bad(Exception):
    """A record that is not a document: ``kind`` keys the stats, ``field`` and ``reason`` the report."""

    def __init__(self, kind: str, field: str, reason: str):
        super().__init__(reason)
        self.kind, self.field, self.reason = kind, field, reason


# ---------------------------------------------------------------------------------------------
# Shards and readers. A reader yields (line, raw, row, end): row is a dict, None (blank) or a _Bad;
# end is the byte offset where the record ends (JSONL and CSV; None where records have none).

Record = tuple[int, Any, Any, int | None]


def resolve_shards(paths: list[str], fmt: str = "auto") -> list[str]:
    """Expand files, directories and globs into a sorted, de-duplicated list of shard paths.

    Raises:
        FileNotFoundError: a literal path (not a glob) that does not exist, which is a typo more
            often than an empty night.
    """
    found = set()
    for entry in paths:
        is_glob = glob.has_magic(entry)
        for m in map(Path, glob.glob(entry, recursive=True) if is_glob else [entry]):
            if m.is_dir():
                found.update(_walk_shards(str(m), fmt))
            elif m.is_file() and (not is_glob or _is_shard(m, m.parent, fmt)):
                found.add(str(m))  # a file named literally is taken whatever its extension
            elif not m.exists():
                raise FileNotFoundError(f"paths: {entry} does not exist")
    return sorted({os.path.normpath(p) for p in found})


def _walk_shards(root: str, fmt: str) -> Iterator[str]:
    """The shards under a directory, hidden entries skipped (scandir, not pathlib: a night lists thousands
    of consumed shards, and a directory entry knows its type without a stat)."""
    with os.scandir(root) as entries:
        for e in entries:
            if e.name.startswith("."):  # a writer's temp file or directory
                continue
            if e.is_dir(follow_symlinks=False):
                yield from _walk_shards(e.path, fmt)
            elif e.is_file():
                kind = EXTENSIONS.get(os.path.splitext(e.name)[1].lower())
                if kind is not None and fmt in ("auto", "hf", kind):
                    yield e.path


def _is_shard(f: Path, root: Path, fmt: str) -> bool:
    hidden = any(part.startswith(".") for part in f.relative_to(root).parts)
    kind = EXTENSIONS.get(f.suffix.lower())
    return f.is_file() and not hidden and kind is not None and fmt in ("auto", "hf", kind)


def _shard_format(shard: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = os.path.splitext(shard)[1].lower()
    if suffix not in EXTENSIONS:
        raise ConfigError(f"format: cannot tell the format of {shard} from its extension; set format")
    return EXTENSIONS[suffix]


def _read_jsonl(path: str, after: int, max_chars: int, offset: int = 0) -> Iterator[Record]:
    # Bytes, not text: one undecodable line must be reported on its own, not end the shard.
    # ``offset`` (a watermark) is where line ``after`` ends: seek there instead of reading the prefix.
    with open(path, "rb") as f:
        f.seek(offset)
        end = offset
        for line, raw in enumerate(f, start=after + 1 if offset else 1):
            end += len(raw)
            if line <= after:
                continue
            if line == 1 and raw.startswith(BOM):  # editors on Windows start files with a byte-order mark
                raw = raw[len(BOM) :]
            yield line, raw, _parse_jsonl_line(raw), end


def _parse_jsonl_line(raw: bytes) -> dict | _Bad | None:
    complete = raw.endswith(b"\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not complete:  # a writer cut off mid-character
            return _Bad("incomplete_tail", "<line>", "unterminated last line")
        return _Bad("non_utf8", "<bytes>", f"invalid UTF-8 at byte {e.start}")
    if not text.strip():
        return None
    try:
        return parse_json_object(text)
    except JsonlError as e:
        if not complete:
            return _Bad("incomplete_tail", "<line>", "unterminated last line")
        return _Bad("bad_json", "<json>", str(e))


class _LineFeed:
    """The lines of a binary file as text for ``csv.reader``, counting the bytes it has taken.

    csv pulls one line at a time and never reads ahead, so after each record ``offset`` is where the
    record ends: a watermark a later pass can seek to. Lines decode with surrogateescape (undecodable
    bytes are found per row) and the first line loses a byte-order mark (spreadsheets write one, and it
    would rename the first column).
    """

    def __init__(self, f):
        self.f, self.offset = f, 0

    def seek(self, offset: int) -> None:
        self.f.seek(offset)
        self.offset = offset

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        start, self.offset = self.offset, self.offset + len(raw)
        if start == 0 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        return raw.decode("utf-8", "surrogateescape")


def _read_csv(path: str, after: int, max_chars: int, offset: int = 0) -> Iterator[Record]:
    with open(path, "rb") as f, _csv_field_limit(max_chars):
        feed = _LineFeed(f)
        reader = csv.reader(feed)
        header = next(reader, [])
        base = 0  # physical lines before the feed's position when it was moved to ``offset``
        if offset > feed.offset:  # a watermark: line ``after`` ends at ``offset``
            feed.seek(offset)
            base = after - reader.line_num
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # a field over max_chars: that record is too long, the rest is read
                line = base + reader.line_num
                yield (
                    line,
                    f"<csv record ending at line {line}>",
                    _Bad("too_long", "<row>", str(e)),
                    feed.offset,
                )
                continue
            line = base + reader.line_num
            if line <= after:
                continue
            raw = _csv_line(values)
            if not values:
                yield line, raw, None, feed.offset
            elif len(values) != len(header):
                reason = f"{len(values)} fields, header has {len(header)}"
                yield line, raw, _Bad("bad_columns", "<row>", reason), feed.offset
            else:
                yield line, raw, _check_utf8(dict(zip(header, values))), feed.offset


@contextlib.contextmanager
def _csv_field_limit(max_chars: int) -> Iterator[None]:
    """Let csv read fields of up to ``max_chars`` (its default limit, 131,072, is not ours)."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, max_chars + 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def _check_utf8(row: dict) -> dict | _Bad:
    for key, value in row.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return _Bad("non_utf8", key, f"invalid UTF-8 bytes at character {e.start}")
    return row


def _read_parquet(path: str, after: int, max_chars: int, offset: int = 0) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:  # read it through once: a shard that is corrupt anywhere is quarantined whole, not half-learned
        for _ in pq.ParquetFile(path).iter_batches(batch_size=1024):
            pass
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a damaged file)
        yield 0, f"<parquet shard {path}>", _Bad("bad_shard", "<shard>", f"unreadable parquet ({e})"), None
        return
    line = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        if line + batch.num_rows <= after:  # skip whole batches without converting them
            line += batch.num_rows
            continue
        for row in batch.to_pylist():
            line += 1
            if line > after:
                yield line, row, row, None


def _read_hf(path: str, after: int, max_chars: int, offset: int = 0) -> Iterator[Record]:
    import datasets

    builder = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}[_shard_format(path, "auto")]
    ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
    line = after
    try:
        for row in ds.skip(after) if after else ds:
            line += 1
            yield line, row, row, None
    except Exception as e:  # datasets parses whole chunks: no line to quarantine, the shard fails
        reason = f"datasets could not read it ({e}); format=jsonl quarantines line by line"
        raise StreamError(path, line + 1, "<shard>", reason) from e


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet, "hf": _read_hf}


def _to_document(row: dict, shard: str, line: int, cfg: StreamConfig) -> Document:
    """Validate one row and build its Document; raises _Bad naming the field."""
    meta = {k: v for k, v in row.items() if k not in (cfg.text_field, cfg.id_field)}
    if row.get(cfg.text_field) is None and all(k in row for k in TRIPLE_FIELDS):
        text = _render_triple(row, cfg.triple_template)
        meta["source"] = RENDERED_TRIPLES
    elif row.get(cfg.text_field) is None:
        raise _Bad("missing_field", cfg.text_field, f"missing (fields: {', '.join(map(str, row)) or 'none'})")
    else:
        text = row[cfg.text_field]
    if not isinstance(text, str):
        raise _Bad("bad_type", cfg.text_field, f"expected a string, got {type(text).__name__}")
    _check_unicode(text, cfg.text_field)
    if not text.strip():
        raise _Bad("empty_text", cfg.text_field, "empty text")
    if len(text) > cfg.max_chars:
        raise _Bad("too_long", cfg.text_field, f"{len(text)} characters > max_chars={cfg.max_chars}")
    return Document(_doc_id(row.get(cfg.id_field), text, cfg.id_field), text, shard, line, meta)


def _check_unicode(text: str, field: str) -> None:
    """JSON may escape lone surrogates ("\\ud800"): valid JSON, but no tokenizer can read the text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(
            "bad_unicode", field, f"not valid Unicode: a lone surrogate at character {e.start}"
        ) from None


def _render_triple(row: dict, template: str) -> str:
    parts = {}
    for k in TRIPLE_FIELDS:
        value = "" if row[k] is None else str(row[k]).strip()  # hf csv may type an object as int
        if not value:
            raise _Bad("missing_field", k, "empty part of a subject,relation,object triple")
        parts[k] = value
    return template.format(**parts)


def _doc_id(value: Any, text: str, id_field: str) -> str:
    if value is None or value == "":
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad("bad_type", id_field, f"expected a string or int, got {type(value).__name__}")
    _check_unicode(str(value), id_field)
    return str(value)


# ---------------------------------------------------------------------------------------------
# The stream.


class DocumentStream:
    """One deterministic pass over the shards, from ``position`` on, or after each shard's watermark.

    ``position`` follows the pass (bad and blank records included): when a document is handed
    out, it is that document's position, and ``record_offset`` the byte offset where its record
    starts (None for parquet and ``hf``). ``stats`` counts what the pass met.

    With ``watermarks`` (shard -> ``Watermark``, see ``nightly.watermarks``) the pass ignores
    ``position`` and reads every shard from its own watermark: consumed unchanged shards are skipped
    unopened, appended ones resumed, changed ones rescanned with a warning. ``new_watermarks()``
    then gives the watermarks of the shards it read.
    """

    def __init__(
        self,
        config: StreamConfig,
        position: Position | dict | None = None,
        watermarks: dict[str, Watermark] | None = None,
    ):
        self.config = config
        self.position = Position.from_json(position)
        self.record_offset: int | None = None
        self.stats = StreamStats()
        self.watermarks = watermarks
        self._progress: dict[str, list] = {}  # shard -> [offset, line, docs, eof] of this pass
        self.decisions: dict[str, str] = {}  # shard -> new, skip, resume, rescan or reread (watermarked)
        self._quarantine = _Quarantine(Path(config.quarantine_dir)) if config.quarantine_dir else None

    def shards(self) -> list[str]:
        """The shards in pass order, less any under quarantine_dir (it must never feed itself)."""
        shards = resolve_shards(self.config.paths, self.config.format)
        if self.config.quarantine_dir is None:
            return shards
        quarantine = os.path.realpath(self.config.quarantine_dir)
        folders: dict[str, bool] = {}  # a shard's folder, resolved once per folder (not per shard)

        def inside(shard: str) -> bool:
            folder = os.path.dirname(shard)
            if folder not in folders:
                real = os.path.realpath(folder)
                folders[folder] = real == quarantine or real.startswith(quarantine + os.sep)
            return folders[folder]

        return [s for s in shards if not inside(s)]

    def __iter__(self) -> Iterator[Document]:
        if self.watermarks is not None:
            yield from self._watermarked()
            return
        start = self.position  # frozen: later updates of self.position do not move it
        for shard in self.shards():
            if start.shard is None or shard >= start.shard:
                yield from self._read_shard(shard, start.line if shard == start.shard else 0)

    def settings_hash(self) -> str:
        """The stream settings that decide what a shard's records mean (a watermark holds under them)."""
        c = self.config
        keys = (
            c.format,
            c.text_field,
            c.id_field,
            c.max_chars,
            c.on_error,
            c.on_duplicate,
            c.triple_template,
        )
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]

    def _watermarked(self) -> Iterator[Document]:
        settings = self.settings_hash()
        for shard in self.shards():
            fmt = _shard_format(shard, self.config.format)
            plan = decide(shard, self.watermarks.get(shard), fmt, settings)
            self.decisions[shard] = plan.action
            if plan.action == "reread":
                logger.info("%s: the stream settings changed since it was read: reading it again", shard)
            if plan.action == "rescan":
                logger.warning(
                    "%s: the part of this shard read by earlier runs changed (rewritten or truncated): "
                    "rescanning it whole; ids learned from it before are not learned again",
                    shard,
                )
                self.stats.rescanned.append(shard)
            if plan.docs:  # the consumed prefix's documents, met by earlier runs: reported as seen
                self.stats.read += plan.docs
                self.stats.skipped["seen"] += plan.docs
            if plan.action != "skip":
                yield from self._read_shard(shard, plan.line, plan.offset, plan.docs)

    def new_watermarks(self) -> dict[str, Watermark]:
        """The watermark of every shard this (watermarked) pass read, as far as it consumed it."""
        out, settings = {}, self.settings_hash()
        for shard, (offset, line, docs, eof) in self._progress.items():
            out[shard] = Watermark.of(shard, offset, line, docs, eof, settings)
        return out

    def _read_shard(self, shard: str, after: int, offset: int = 0, docs: int = 0) -> Iterator[Document]:
        fmt = _shard_format(shard, self.config.format)
        # parquet and hf records have no byte offsets: their watermark covers the file as it was opened
        size = None if fmt in SEEKABLE else os.path.getsize(shard)
        progress = self._progress[shard] = [offset if size is None else size, after, docs, False]
        reader = _READERS[fmt]
        for line, raw, row, end in reader(shard, after, self.config.max_chars, offset):
            if isinstance(row, _Bad) and row.kind == "incomplete_tail":
                self.stats.skipped[row.kind] += 1
                tail = "%s:%d: unterminated last line (a writer still appending?): left for the next run"
                logger.warning(tail, shard, line)
                return  # not consumed: the position stays before it, the next pass retries it
            doc = self._document(shard, line, raw, row)
            self.position, self.record_offset = Position(shard, line), progress[0] if size is None else None
            progress[:3] = [end if size is None else size, line, progress[2] + (doc is not None)]
            if doc is not None:
                self.stats.read += 1
                yield doc
        progress[3] = True  # the pass reached the end of the shard

    def read_at(self, shard: str, line: int, offset: int | None) -> Document | None:
        """The document of record ``line`` of ``shard``, whose record starts at byte ``offset`` (None:
        unknown, the shard is read up to it), or None when that record is no document; bad input is
        quarantined or fatal as in a pass."""
        fmt = _shard_format(shard, self.config.format)
        if offset is not None and fmt in SEEKABLE:  # the first record after the seek is the one
            for _, raw, row, _ in _READERS[fmt](shard, 0, self.config.max_chars, offset):
                return self._document(shard, line, raw, row)
            return None
        for got, raw, row, _ in _READERS[fmt](shard, 0, self.config.max_chars, 0):
            if got == line:
                return self._document(shard, line, raw, row)
            if got > line:
                break
        return None

    def _document(self, shard: str, line: int, raw: Any, row: dict | _Bad | None) -> Document | None:
        if row is None:
            self.stats.blank += 1
            return None
        try:
            if isinstance(row, _Bad):
                raise row
            return _to_document(row, shard, line, self.config)
        except _Bad as bad:
            self._reject(shard, line, raw, bad)
            return None

    def changed_text(self, doc: Document, why: str) -> Document | None:
        """An id met again with another text (``why``: where it was met): handled per ``on_duplicate``."""
        where = f"{doc.shard}:{doc.line}: {self.config.id_field} {doc.id!r}"
        if self.config.on_duplicate != "quarantine":  # quarantining counts it as bad input
            self.stats.skipped["changed_text"] += 1
        if self.config.on_duplicate == "new_version":
            new = Document(f"{doc.id}#{text_hash(doc.text)}", doc.text, doc.shard, doc.line, doc.meta)
            logger.info("%s: its text changed (%s): learned as %s", where, why, new.id)
            return new
        if self.config.on_duplicate == "quarantine":
            reason = f"id {doc.id!r} {why} with another text (data.stream.on_duplicate=quarantine)"
            self._reject(doc.shard, doc.line, doc.text, _Bad("changed_text", self.config.id_field, reason))
            return None
        logger.warning("%s: its text changed (%s): skipped (data.stream.on_duplicate=skip)", where, why)
        return None

    def reject(self, doc: Document, kind: str, reason: str) -> None:
        """Set aside a document a consumer cannot use (e.g. one its tokenizer fails on), as bad input."""
        self._reject(doc.shard, doc.line, doc.text, _Bad(kind, self.config.text_field, reason))

    def _reject(self, shard: str, line: int, raw: Any, bad: _Bad) -> None:
        if self.config.on_error == "fatal":
            raise StreamError(shard, line, bad.field, bad.reason)
        self.stats.skipped[bad.kind] += 1
        self.stats.quarantined += 1
        self._quarantine.put(shard, line, bad, raw)
        logger.warning("quarantined %s:%d: %s: %s", shard, line, bad.field, bad.reason)


class _Quarantine:
    """Appends bad records to ``<dir>/<shard-name>.jsonl``, each (shard, line, raw) once."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._known: dict[Path, set] = {}

    def put(self, shard: str, line: int, bad: _Bad, raw: Any) -> None:
        record = {"shard": shard, "line": line, "field": bad.field, "reason": bad.reason, "kind": bad.kind}
        record.update(_raw_fields(raw))
        path = self.dir / f"{Path(shard).name}.jsonl"
        known = self._known.setdefault(path, _quarantine_keys(path))
        key = (shard, line, record["raw"])
        if key not in known:
            append_jsonl(path, [record])
            known.add(key)


def _raw_fields(raw: Any) -> dict:
    """The raw record as JSON-safe text, plus base64 of the exact bytes when they are not UTF-8."""
    if isinstance(raw, bytes):
        raw = raw.rstrip(b"\r\n")
        try:
            return {"raw": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"raw": raw.decode("utf-8", "backslashreplace"), "raw_base64": _b64(raw)}
    if isinstance(raw, str):  # csv: may carry surrogate-escaped bytes
        data = raw.encode("utf-8", "surrogateescape")
        out = {"raw": data.decode("utf-8", "backslashreplace")}
        return out if out["raw"] == raw else {**out, "raw_base64": _b64(data)}
    return {"raw": json.dumps(raw, ensure_ascii=False, default=str)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _quarantine_keys(path: Path) -> set:
    keys = set()
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as f:
            for text in f:
                try:
                    r = json.loads(text)
                    keys.add((r["shard"], r["line"], r["raw"]))
                except (ValueError, KeyError, TypeError):  # a torn last append
                    continue
    return keys
