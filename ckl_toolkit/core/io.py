"""Atomic file and directory writes, JSONL reading with line-precise errors.

Every output of a run goes through here, so a process killed at any moment leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_mode() -> int:
    """0o666 minus the umask: the mode ``open()`` would give (mkstemp's temporaries are 0o600)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Yield a file object on a temporary sibling; on success fsync it and rename it onto ``path``.

    A reader sees the old file or the whole new one, never half of it; a failure leaves no temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, shared_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary sibling and an atomic rename."""
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """JSON, indented; ``sort_keys=False`` keeps insertion order where it means something (method order)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only once the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 would hide a version from a server run by another user
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class JsonlError(ValueError):
    """A malformed JSONL line; the message names file, line and field."""


def parse_json_object(line: str) -> dict:
    """Parse one JSONL line that must hold a JSON object.

    Raises:
        JsonlError: naming what is wrong but not where; callers prefix ``file:line``.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise JsonlError(f"invalid JSON ({e.msg})") from None
    except RecursionError:  # json nests by recursion: a very deep array or object cannot be read
        raise JsonlError("invalid JSON (nested too deeply to read)") from None
    if not isinstance(obj, dict):
        raise JsonlError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(
    path: str | os.PathLike, required: tuple[str, ...] = (), why: dict[str, str] | None = None
) -> list[dict]:
    """Read a JSONL file; fail on the first bad line with file:line and the missing field (and
    ``why[field]``: the setting that asks for it)."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = parse_json_object(line)
            except JsonlError as e:
                raise JsonlError(f"{path}:{lineno}: {e}") from None
            for field in required:
                if field not in obj:
                    reason = f" ({why[field]})" if why and field in why else ""
                    raise JsonlError(f"{path}:{lineno}: missing field '{field}'{reason}")
            rows.append(obj)
    return rows


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to a JSONL log and fsync, so a record survives a crash right after the call.

    Appends are not atomic: a process killed mid-write can leave one partial final line, which
    readers of an append-only log must skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


class MetricsLogger:
    """Appends one JSON object a line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def resume_at(self, step: int) -> None:
        """Forget the records of steps after ``step``, the checkpoint a run resumes from.

        A run killed between logging step N and checkpointing it logs N again after the resume;
        dropping every record past the checkpoint (and a torn last line) keeps each step once.
        """
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the partial line of a kill mid-write
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(record)
        write_text_atomic(self.path, "".join(json.dumps(r, default=float) + "\n" for r in kept))

    def log(self, **record: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
