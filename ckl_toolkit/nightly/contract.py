"""The nightly refresh contract (docs/ARCHITECTURE.md §8): lock, model versions, exit codes.

Layout of an update output directory::

    output_dir/
      .lock                  flock target; holds the PID and start time of the running update
      versions/
        v000001/             complete or absent (built in a hidden temp dir, then renamed)
        v000002/
      current -> versions/v000002   the served version (a symlink, replaced atomically)
      current.json           {"version": "v000002", "path": "versions/v000002"}, for platforms
                             without symlinks; written before the symlink
      rollback.json          only while ``ckl rollback`` runs: {"from", "to"}; a killed rollback is
                             finished from it (by the next rollback or update)

A version may also hold ``gate.json`` (the quality gate's verdict, ``nightly.gate``) and
``rejected.json`` (refused by the gate or rolled back by an operator: never served automatically).

Everything that changes ``versions/`` or ``current`` must run under :class:`RunLock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any

from ckl_toolkit.core.errors import DivergenceError
from ckl_toolkit.core.io import _fsync_dir, atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

VERSION_DIR = re.compile(r"^v(\d{6})$")


class ExitCode(IntEnum):
    """Exit status of ``ckl update``, for cron and the scripts around it."""

    OK = 0  # a new version was published (or the run resumed and finished)
    FAILURE = 1  # an unexpected error: a bug, a full disk, a missing model
    BAD_INPUT = 2  # an invalid recipe, or malformed input with on_error=fatal
    LOCKED = 3  # another update holds the lock on this output directory; nothing was done
    DIVERGED = 4  # the loss was non-finite too many steps in a row; current is unchanged
    NOTHING_TO_DO = 5  # no unseen documents; current is unchanged
    INTERRUPTED = 6  # stopped by a signal after saving a checkpoint; the next run resumes
    NOT_LEARNED = 7  # training ran but the weights did not move; nothing published, documents stay unseen
    GATE_REJECTED = 8  # the quality gate refused the new version: kept as rejected, current is unchanged


class NotLearnedError(RuntimeError):
    """The run's trained weights ended exactly where they started: publishing would mark documents learned."""

    exit_code = ExitCode.NOT_LEARNED


class GateRejectedError(RuntimeError):
    """The quality gate refused the candidate version: it stays in ``versions/`` marked rejected."""

    exit_code = ExitCode.GATE_REJECTED


class LockedError(RuntimeError):
    """Another process holds the run lock."""

    exit_code = ExitCode.LOCKED


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code that reports ``exc`` (ValueError covers ConfigError, JsonlError, StreamError)."""
    if isinstance(exc, (LockedError, NotLearnedError, GateRejectedError)):
        return exc.exit_code
    if isinstance(exc, DivergenceError):
        return ExitCode.DIVERGED
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, ValueError):
        return ExitCode.BAD_INPUT
    return ExitCode.FAILURE


# ---------------------------------------------------------------------------------------------
# The lock.


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.lock`` for the life of one update.

    The kernel drops a flock when its holder dies, however it dies, so a lock left by a killed
    run never needs clearing by hand. The file is never deleted: unlinking it would let a second
    process lock a new inode while a third still holds the old one. flock is per open file, so a
    second ``RunLock`` in the same process is refused too. (On NFS, flock may be local to a host.)

    Raises:
        LockedError: from ``acquire`` / ``__enter__`` when another process holds the lock; the
            message names the holder's PID, host and start time.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(self._locked_message()) from None
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    def _locked_message(self) -> str:
        holder = self.holder() or {}
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        )
        return (
            f"{self.path.parent} is locked by another update ({who}). "
            "Wait for it to finish, or write to another output directory."
        )

    def holder(self) -> dict | None:
        """What the holder wrote into the lock file (None if unreadable or empty)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an empty file says "nobody"; the lock itself is the flock
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# Versions.


def list_versions(output_dir: str | os.PathLike) -> list[Path]:
    """Complete version directories, oldest first (temp and trash dirs are hidden, so skipped)."""
    root = Path(output_dir) / "versions"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if VERSION_DIR.match(p.name) and p.is_dir())


def current_version(output_dir: str | os.PathLike) -> Path | None:
    """The served version: the ``current`` symlink's target, else ``current.json``'s; None if none."""
    output_dir = Path(output_dir)
    link = output_dir / "current"
    if link.is_symlink():
        target = output_dir / os.readlink(link)
        return target if target.is_dir() else None
    pointer = output_dir / "current.json"
    if pointer.exists():
        target = output_dir / json.loads(pointer.read_text(encoding="utf-8"))["path"]
        return target if target.is_dir() else None
    return None


def set_current(output_dir: str | os.PathLike, version: str | os.PathLike) -> Path:
    """Point ``current`` at ``versions/<name>`` (publishing, or rolling back by hand).

    ``current.json`` is written first: a crash in between leaves the symlink (what servers read)
    on the old version, and the next publish rewrites both.
    """
    output_dir = Path(output_dir)
    name = Path(version).name
    target = output_dir / "versions" / name
    if not VERSION_DIR.match(name) or not target.is_dir():
        raise FileNotFoundError(f"{target}: no such version")
    rel = os.path.join("versions", name)
    write_json_atomic(output_dir / "current.json", {"version": name, "path": rel})
    fault_point("current_json_written")
    tmp = output_dir / f".current.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(rel, tmp, target_is_directory=True)
    except (OSError, NotImplementedError) as e:  # no symlinks here: current.json is the pointer
        logger.warning("cannot create symlinks in %s (%s); current.json is the pointer", output_dir, e)
        return target
    fault_point("symlink_staged")
    try:
        os.replace(tmp, output_dir / "current")  # rename(2) over the old link: readers see old or new
    except OSError:
        tmp.unlink()  # e.g. `current` is a real directory someone made: refuse, leave no litter
        raise
    _fsync_dir(output_dir)
    fault_point("current_moved")
    return target


def publish_version(
    output_dir: str | os.PathLike,
    build_fn: Callable[[Path], Any],
    keep_last: int | None = None,
    meta: dict | None = None,
) -> Path:
    """Build the next version in a temp dir, rename it into place, then point ``current`` at it.

    If ``build_fn`` raises, or the process dies, no ``v{N}`` appears and ``current`` is unchanged.
    Call under :class:`RunLock`: the next number and the clearing of stale temp dirs assume no
    other writer. (A gated publish calls :func:`build_version`, the gate, then :func:`serve_version`.)

    Args:
        output_dir: the update's output directory.
        build_fn: writes the version's files into the directory it is given.
        keep_last: then keep only this many newest versions (and the current one); None: keep all.
        meta: extra fields for the ``version.json`` written beside build_fn's files.

    Returns:
        The new version directory.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last: must be >= 1 or None, got {keep_last}")
    final = build_version(output_dir, build_fn, meta)
    serve_version(output_dir, final, keep_last)
    return final


def build_version(
    output_dir: str | os.PathLike, build_fn: Callable[[Path], Any], meta: dict | None = None
) -> Path:
    """Build the next ``versions/vN`` in a hidden temp dir and rename it into place; ``current`` stays.

    A version whose ``meta`` says ``gated: true`` is adopted by :func:`reconcile` only once its
    ``gate.json`` says it passed.
    """
    root = Path(output_dir) / "versions"
    _clear_stale(Path(output_dir))
    existing = list_versions(output_dir)
    number = int(VERSION_DIR.match(existing[-1].name).group(1)) + 1 if existing else 1
    final = root / f"v{number:06d}"
    with atomic_dir(final) as tmp:
        build_fn(tmp)
        write_json_atomic(tmp / "version.json", {"version": final.name, "created": _now(), **(meta or {})})
        fault_point("version_built")
    fault_point("version_renamed")
    return final


def serve_version(output_dir: str | os.PathLike, version: Path, keep_last: int | None = None) -> None:
    """Point ``current`` at a complete version, then prune to ``keep_last`` (None: keep all)."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last: must be >= 1 or None, got {keep_last}")
    set_current(output_dir, version)
    if keep_last is not None:
        prune_versions(output_dir, keep_last)


def _clear_stale(output_dir: Path) -> None:
    """Remove what killed runs left half-done: temp and trash version dirs, staged symlinks (all hidden)."""
    root = output_dir / "versions"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".v") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    for p in output_dir.glob(".current.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def prune_versions(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest versions, never one a pointer names.

    Returns:
        The deleted version directories.
    """
    output_dir = Path(output_dir)
    protected = {p.resolve() for p in (current_version(output_dir), _json_target(output_dir)) if p}
    doomed = [p for p in list_versions(output_dir)[:-keep_last] if p.resolve() not in protected]
    for p in doomed:
        trash = p.with_name(f".{p.name}.trash")
        os.replace(p, trash)  # out of sight in one step, so no half-deleted version looks complete
        fault_point("pruning")
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _json_target(output_dir: Path) -> Path | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return output_dir / json.loads((output_dir / "current.json").read_text(encoding="utf-8"))["path"]
    return None


# ---------------------------------------------------------------------------------------------
# Reconciling a publish that was killed half-way.

REJECTED = "rejected.json"  # a version the operator (or the gate) refused: never served automatically
GATE_REPORT = "gate.json"  # the quality gate's verdict on a version (nightly.gate)
ROLLBACK = "rollback.json"  # in output_dir while a rollback runs: {"from": vN, "to": vM}


def is_rejected(version: Path) -> bool:
    return (version / REJECTED).exists()


def reject_version(version: Path, record: dict) -> None:
    """Mark a version refused (atomically): reconcile never adopts it, ``ckl versions`` shows why."""
    write_json_atomic(version / REJECTED, {"rejected": _now(), **record})


def gate_verdict(version: Path) -> str | None:
    """None: published without a gate; else "passed", "failed" or "pending" (killed before the verdict)."""
    try:
        meta = json.loads((version / "version.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not meta.get("gated"):
        return None
    try:
        report = json.loads((version / GATE_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "pending"
    return "passed" if report.get("passed") else "failed"


def _pointer_targets(output_dir: Path) -> tuple[Path | None, Path | None]:
    """(the ``current`` symlink's version, ``current.json``'s version), each None when absent or broken."""
    link = output_dir / "current"
    linked = output_dir / os.readlink(link) if link.is_symlink() else None
    pointed = _json_target(output_dir)
    return (linked if linked and linked.is_dir() else None), (
        pointed if pointed and pointed.is_dir() else None
    )


def _built_on(version: Path) -> str | None | bool:
    """The version a version was trained on top of (None: the original model); False if not recorded."""
    try:
        meta = json.loads((version / "version.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("base_version", False)


def _settle_gate(version: Path) -> bool:
    """A gated version whose gate did not pass is marked rejected; True if it may be served."""
    verdict = gate_verdict(version)
    if verdict in (None, "passed"):
        return True
    reason = "gate" if verdict == "failed" else "gate-interrupted"
    why = "its gate failed" if verdict == "failed" else "the run was killed before its gate decided"
    logger.warning("not adopting %s: %s; marked rejected", version.name, why)
    reject_version(version, {"reason": reason, "detail": why})
    return False


def finish_rollback(output_dir: str | os.PathLike) -> Path | None:
    """Finish a rollback that was killed half-way (``rollback.json`` is there); return its target.

    A rollback is: write rollback.json; mark every version newer than the target rejected; move
    ``current``; remove rollback.json. Each step is idempotent, so finishing replays them all.
    """
    output_dir = Path(output_dir)
    path = output_dir / ROLLBACK
    if not path.exists():
        return None
    intent = json.loads(path.read_text(encoding="utf-8"))
    target = output_dir / "versions" / intent["to"]
    if not target.is_dir():  # pruned by hand meanwhile: nothing left to finish
        path.unlink()
        return None
    (target / REJECTED).unlink(missing_ok=True)  # --force on a rejected target
    fault_point("rollback_cleared")
    for v in list_versions(output_dir):
        if v.name > target.name and not is_rejected(v):
            reject_version(
                v,
                {
                    "reason": "rollback",
                    "detail": f"rolled back to {target.name}",
                    "rolled_back_to": target.name,
                },
            )
    fault_point("rollback_marked")
    set_current(output_dir, target)
    path.unlink()
    _fsync_dir(output_dir)
    fault_point("rollback_done")
    return target


def reconcile(output_dir: str | os.PathLike) -> Path | None:
    """Finish whatever a killed publish left half-done; return the served version. Idempotent.

    A publish is: build a version in a hidden temp dir, rename it to ``versions/vN``, (run the
    quality gate and write its verdict,) write ``current.json``, move the ``current`` symlink, prune
    old versions. Killed anywhere in between, this brings the output directory to the state the
    publish was heading for:

    - hidden temp / trash dirs and staged symlinks are removed; a killed rollback is finished;
    - a complete version that was built on top of the served one but never served (killed after
      its rename) is adopted rather than trained again -- if it was gated, only once its gate
      passed; a gate that failed or never decided marks it rejected instead;
    - ``current`` and ``current.json`` are made to agree (on a complete version).

    Call it under :class:`RunLock` at the start of every run, so even a run with nothing to learn
    leaves a consistent ``current``.
    """
    output_dir = Path(output_dir)
    _clear_stale(output_dir)
    finish_rollback(output_dir)
    versions = [v for v in list_versions(output_dir) if not is_rejected(v)]
    linked, pointed = _pointer_targets(output_dir)
    served = linked or pointed  # the symlink is what servers read
    newest = versions[-1] if versions else None
    if newest is not None and newest != served:
        base = _built_on(newest)
        if base is not False and base == (served.name if served else None):
            if _settle_gate(newest):
                logger.warning(
                    "adopting %s: it was published complete by a run killed before `current` moved",
                    newest.name,
                )
                served = newest
        elif served is None:
            served = newest  # pointers lost: the newest complete version is the best guess
    if served is not None and (linked != served or pointed != served):
        set_current(output_dir, served)
    return served


def fault_point(name: str) -> None:
    """Tests kill the process here when ``CKL_TEST_FAULT`` names this point (a SIGKILL, no cleanup)."""
    if os.environ.get("CKL_TEST_FAULT") == name:
        os._exit(137)
