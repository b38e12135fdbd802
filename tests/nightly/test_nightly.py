"""The nightly contract's primitives: lock across processes, atomic versions, retention, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckl_toolkit.nightly.contract import (
    ExitCode,
    LockedError,
    RunLock,
    current_version,
    exit_code_for,
    list_versions,
    prune_versions,
    publish_version,
    set_current,
)
from ckl_toolkit.nightly.sources import StreamError
from ckl_toolkit.training.step import DivergenceError

REPO = Path(__file__).resolve().parents[2]

# Takes the lock (or exits with the code that says why not), reports, then holds it.
HOLDER = """
import sys, time
from ckl_toolkit.nightly.contract import RunLock, exit_code_for
try:
    RunLock(sys.argv[1]).acquire()
except Exception as e:
    print(e, file=sys.stderr)
    sys.exit(exit_code_for(e))
print("held", flush=True)
time.sleep(60)
"""


def spawn_holder(output_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_exit_codes_are_stable():
    assert [(c.name, int(c)) for c in ExitCode][:6] == [
        ("OK", 0),
        ("FAILURE", 1),
        ("BAD_INPUT", 2),
        ("LOCKED", 3),
        ("DIVERGED", 4),
        ("NOTHING_TO_DO", 5),
    ]
    assert exit_code_for(LockedError("x")) == ExitCode.LOCKED
    assert exit_code_for(DivergenceError("x")) == ExitCode.DIVERGED
    assert exit_code_for(StreamError("f.jsonl", 3, "text", "empty")) == ExitCode.BAD_INPUT
    assert exit_code_for(OSError("disk full")) == ExitCode.FAILURE


# ---------------------------------------------------------------------------------------------
# lock


def test_lock_makes_a_second_process_fail_fast_with_its_exit_code(tmp_path):
    with RunLock(tmp_path):
        child = spawn_holder(tmp_path)
        out, err = child.communicate(timeout=30)
        assert child.returncode == ExitCode.LOCKED, err
        assert f"pid {os.getpid()}" in err and "locked by another update" in err and out == ""
    child = spawn_holder(tmp_path)  # released: now the child gets it
    try:
        assert child.stdout.readline().strip() == "held"
    finally:
        child.kill()
        child.wait()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    child = spawn_holder(tmp_path)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)  # no clean-up code runs
        child.wait()
    with RunLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()


def test_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(LockedError):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------------------------------
# versions


def build(text: str):
    def build_fn(d: Path) -> None:
        (d / "model.txt").write_text(text)

    return build_fn


def names(paths) -> list[str]:
    return [p.name for p in paths]


def test_publish_numbers_versions_and_moves_current(tmp_path):
    assert current_version(tmp_path) is None
    for i in range(3):
        published = publish_version(tmp_path, build(f"model {i}"), meta={"docs": i})
    assert names(list_versions(tmp_path)) == ["v000001", "v000002", "v000003"]
    assert current_version(tmp_path) == published == tmp_path / "versions" / "v000003"
    assert os.readlink(tmp_path / "current") == os.path.join("versions", "v000003")  # relative: movable
    assert (tmp_path / "current" / "model.txt").read_text() == "model 2"
    assert json.loads((tmp_path / "current.json").read_text())["version"] == "v000003"
    info = json.loads((published / "version.json").read_text())
    assert info["version"] == "v000003" and info["docs"] == 2


def test_failed_build_leaves_current_and_versions_unchanged(tmp_path):
    publish_version(tmp_path, build("good"))

    def broken(d: Path) -> None:
        (d / "model.txt").write_text("half a model")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        publish_version(tmp_path, broken)
    assert names(list_versions(tmp_path)) == ["v000001"]
    assert os.listdir(tmp_path / "versions") == ["v000001"]  # no partial or temp dir either
    assert (tmp_path / "current" / "model.txt").read_text() == "good"


def test_leftovers_of_a_killed_publish_are_cleared(tmp_path):
    publish_version(tmp_path, build("good"))
    stale = tmp_path / "versions" / ".v000002.abcd.tmp"  # what SIGKILL mid-build leaves
    stale.mkdir()
    (stale / "model.txt").write_text("half")
    assert publish_version(tmp_path, build("next")).name == "v000002"
    assert sorted(os.listdir(tmp_path / "versions")) == ["v000001", "v000002"]


def test_retention_keeps_the_newest_and_never_the_current(tmp_path):
    for i in range(4):
        publish_version(tmp_path, build(str(i)), keep_last=2)
    assert names(list_versions(tmp_path)) == ["v000003", "v000004"]
    set_current(tmp_path, "v000003")  # a rollback
    publish_version(tmp_path, build("5"))
    set_current(tmp_path, "v000003")
    assert names(prune_versions(tmp_path, keep_last=1)) == ["v000004"]
    assert names(list_versions(tmp_path)) == ["v000003", "v000005"]
    assert current_version(tmp_path).name == "v000003"
    with pytest.raises(ValueError, match="keep_last"):
        publish_version(tmp_path, build("x"), keep_last=0)


def test_the_symlink_wins_when_a_crash_split_the_pointers(tmp_path):
    publish_version(tmp_path, build("a"))
    publish_version(tmp_path, build("b"))
    os.replace(tmp_path / "current", tmp_path / "old")  # as if killed after current.json only:
    os.symlink(os.path.join("versions", "v000001"), tmp_path / "current")
    os.unlink(tmp_path / "old")
    assert current_version(tmp_path).name == "v000001"  # what servers follow
    assert prune_versions(tmp_path, keep_last=1) == []  # both pointers' targets are kept


def test_current_json_is_the_pointer_without_symlinks(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    publish_version(tmp_path, build("a"))
    publish_version(tmp_path, build("b"), keep_last=1)
    assert not (tmp_path / "current").exists()
    assert current_version(tmp_path) == tmp_path / "versions" / "v000002"
    assert names(list_versions(tmp_path)) == ["v000002"]
