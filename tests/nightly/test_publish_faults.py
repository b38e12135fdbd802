"""A publish killed at any point ends, on the next run, with a served model that is whole and readable.

The publish sequence is build -> rename -> current.json -> symlink -> prune. ``CKL_TEST_FAULT``
makes the process ``os._exit`` (a SIGKILL: no cleanup, no finally) at a named point of it; the next
call to ``reconcile`` (every ``ckl update`` starts with one) must leave ``current`` and
``current.json`` agreeing on a complete version, no hidden leftovers, and a complete but unserved
version adopted rather than trained again.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ckl_toolkit.core.config import to_yaml
from ckl_toolkit.nightly.contract import current_version, list_versions, publish_version, reconcile
from ckl_toolkit.update import update
from tests.nightly.test_update import facts, ledger_ids, make_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[2]
POINTS = [
    "version_built",
    "version_renamed",
    "current_json_written",
    "symlink_staged",
    "current_moved",
    "pruning",
]

PUBLISH = """
import sys
from pathlib import Path
from ckl_toolkit.nightly.contract import publish_version, current_version

def build(d: Path) -> None:
    (d / "model.txt").write_text(sys.argv[2])

base = current_version(sys.argv[1])
publish_version(sys.argv[1], build, keep_last=1, meta={"base_version": base.name if base else None})
"""


def publish_in_child(out: Path, text: str, fault: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKL_TEST_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-c", PUBLISH, str(out), text], env=env).returncode


def assert_whole(out: Path, text: str) -> None:
    """current and current.json agree on a complete version holding ``text``; nothing half-done is left."""
    served = current_version(out)
    assert served is not None and json.loads((out / "current.json").read_text())["version"] == served.name
    assert os.readlink(out / "current") == os.path.join("versions", served.name)
    assert (served / "model.txt").read_text() == text and (served / "version.json").exists()
    leftovers = [p.name for p in (out / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not list(out.glob(".current.*"))


@pytest.mark.parametrize("point", POINTS)
def test_a_publish_killed_at_any_point_is_reconciled(tmp_path, point):
    assert publish_in_child(tmp_path, "v1", None) == 0
    assert publish_in_child(tmp_path, "v2", point) == 137  # killed there
    served = reconcile(tmp_path)
    # killed before the rename: the old version stays; after it: the new one is adopted, not lost
    want = "v1" if point == "version_built" else "v2"
    assert_whole(tmp_path, want)
    assert served == current_version(tmp_path)
    assert reconcile(tmp_path) == served  # idempotent


@pytest.mark.parametrize("point", ["version_renamed", "current_json_written", "symlink_staged"])
def test_a_first_publish_killed_before_the_symlink_still_ends_served(tmp_path, point):
    assert publish_in_child(tmp_path, "first", point) == 137
    assert not (tmp_path / "current").exists()
    reconcile(tmp_path)
    assert_whole(tmp_path, "first")


def test_a_version_marked_rejected_is_never_adopted(tmp_path):
    assert publish_in_child(tmp_path, "v1", None) == 0
    assert publish_in_child(tmp_path, "v2", "version_renamed") == 137
    (tmp_path / "versions" / "v000002" / "rejected.json").write_text("{}")
    reconcile(tmp_path)
    assert_whole(tmp_path, "v1")


# ---------------------------------------------------------------------------------------------
# The same through `ckl update`: every later night ends whole, nothing is trained twice.


def run_update(recipe_path: Path, fault: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKL_TEST_FAULT": fault or "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ckl_toolkit.update", "--recipe", str(recipe_path)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


def test_update_killed_after_its_version_was_renamed_adopts_it_instead_of_training_again(
    tmp_path, tiny_lm_dir
):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 4))
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path, tiny_lm_dir, "keep_versions=1")))
    assert run_update(path, "current_json_written") == 137  # the first publish, before the symlink
    assert run_update(path) == 5  # nothing new: v1 was adopted, its ledger holds the documents
    assert_served = current_version(tmp_path / "out")
    assert assert_served.name == "v000001" and [v.name for v in list_versions(tmp_path / "out")] == [
        "v000001"
    ]
    assert not (tmp_path / "out" / "work").exists()  # the killed run's plan was dropped, not resumed


def test_randomized_kills_during_publish_end_in_the_uninterrupted_model(tmp_path, tiny_lm_dir):
    """Two nights, each killed at a random publish point and rerun: the same model as without kills."""
    rng = random.Random(12)
    roots = {name: tmp_path / name for name in ("ref", "killed")}
    recipes = {}
    for name, root in roots.items():
        write_jsonl(root / "data/a.jsonl", facts("n", 3))
        recipes[name] = make_recipe(root, tiny_lm_dir, "keep_versions=2", data=root / "data")
        (root / "r.yaml").write_text(to_yaml(recipes[name]))
    for night in range(2):
        if night == 1:
            for root in roots.values():
                write_jsonl(root / "data/b.jsonl", facts("m", 3))
        assert update(recipes["ref"]).exit_code == 0
        fault = rng.choice(POINTS)
        assert run_update(roots["killed"] / "r.yaml", fault) == 137, fault
        assert run_update(roots["killed"] / "r.yaml") in (0, 5), fault  # 5: its complete version was adopted
    ref, got = (current_version(root / "out") for root in roots.values())
    assert ref.name == got.name
    a, b = (load_file(str(v / "model/model.safetensors")) for v in (ref, got))
    assert all(a[k].equal(b[k]) for k in a)
    assert ledger_ids(got) == sorted([f"n{i}" for i in range(3)] + [f"m{i}" for i in range(3)])


def test_version_dirs_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = publish_version(tmp_path, lambda d: (d / "model.txt").write_text("x"))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # a model server running as another user can read it
    assert (out / "model.txt").stat().st_mode & 0o777 == 0o644
    assert (out / "version.json").stat().st_mode & 0o777 == 0o644
