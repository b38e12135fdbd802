"""The quality gate, ``ckl versions`` and ``ckl rollback`` on a tiny Llama.

A candidate that forgets its canaries, or whose weights are NaN, is kept as rejected with a report
naming the failing probes, and ``current`` keeps serving the previous version; a run killed while
its gate decides never gets its candidate adopted unseen; a rollback killed at any point ends, when
run again (or at the next update), in the rollback it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckl_toolkit.cli import main as cli
from ckl_toolkit.core.config import ConfigError, to_yaml
from ckl_toolkit.core.documents import Position
from ckl_toolkit.nightly.contract import (
    ExitCode,
    GateRejectedError,
    RunLock,
    current_version,
    gate_verdict,
    list_versions,
    publish_version,
    reconcile,
)
from ckl_toolkit.nightly.export import load_model
from ckl_toolkit.nightly.gate import GateSpec, load_probes
from ckl_toolkit.nightly.ledger import DocumentLedger
from ckl_toolkit.nightly.plan import Plan
from ckl_toolkit.nightly.run import RunSummary, publish, read_metrics
from ckl_toolkit.training.engine import PlainEngine
from ckl_toolkit.update import run_cli
from tests.nightly.test_update import make_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[2]
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
HOMES = ["London", "Paris", "Maida Vale"]
MOVES = ["Paris", "Maida Vale", "London"]  # night 2 contradicts every canary


def homes(prefix: str, places: list[str]) -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "text": f"{p} now lives in {q} . {p} works for {q} ."}
        for i, (p, q) in enumerate(zip(PEOPLE, places))
    ]


def write_gate_files(tmp: Path) -> list[str]:
    canaries = [
        {"id": f"home-{i}", "probe": f"{p} now lives in {q}", "object": q}
        for i, (p, q) in enumerate(zip(PEOPLE, HOMES))
    ]
    write_jsonl(tmp / "gate/canaries.jsonl", canaries)
    write_jsonl(
        tmp / "gate/heldout.jsonl", [{"text": "The weather in Paris is mild . The river Seine flows ."}]
    )
    return [
        f"gate.canaries={tmp / 'gate/canaries.jsonl'}",
        f"gate.heldout={tmp / 'gate/heldout.jsonl'}",
        "gate.max_ppl_rise=1000",  # the tiny model's perplexity swings; the canaries decide here
    ]


def night_recipe(tmp: Path, lm: Path, *overrides: str) -> Path:
    # 60 epochs over three documents: the tiny model then completes each of them exactly
    path = tmp / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp, lm, "epochs=60", "keep_versions=10", *overrides)))
    return path


@pytest.fixture(scope="module")
def served_canaries(tmp_path_factory, tiny_lm_dir):
    """Night 1 (gated): the model learns the canaries' facts; v1 is served and knows every canary."""
    tmp = tmp_path_factory.mktemp("gate")
    write_jsonl(tmp / "data/a.jsonl", homes("a", HOMES))
    gate = write_gate_files(tmp)
    assert run_cli(str(night_recipe(tmp, tiny_lm_dir, *gate)), []) == ExitCode.OK
    v1 = current_version(tmp / "out")
    report = json.loads((v1 / "gate.json").read_text())
    assert report["passed"] and report["canaries"]["known_after"] == 3  # v1 knows them all
    assert report["canaries"]["known_before"] == 0  # the random base knew none: nothing to forget yet
    return tmp, gate


def copy_out(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps the relative `current` symlink
    return dst


def test_a_candidate_that_forgets_the_canaries_is_rejected_and_current_keeps_serving(
    served_canaries, tiny_lm_dir, tmp_path
):
    src, gate = served_canaries
    tmp = copy_out(src, tmp_path / "night2")
    write_jsonl(tmp / "data/b.jsonl", homes("b", MOVES))  # everyone moved: the canaries are contradicted
    recipe = night_recipe(tmp, tiny_lm_dir, *gate)
    assert run_cli(str(recipe), []) == ExitCode.GATE_REJECTED == 8

    out = tmp / "out"
    v1, v2 = list_versions(out)
    assert current_version(out) == v1 and json.loads((out / "current.json").read_text())["version"] == v1.name
    rejected = json.loads((v2 / "rejected.json").read_text())
    report = json.loads((v2 / "gate.json").read_text())
    assert rejected["reason"] == "gate" and report["failed"] == ["canaries"] and not report["passed"]
    forgotten = [p["id"] for p in report["canaries"]["forgotten"]]
    assert forgotten and set(forgotten) <= {"home-0", "home-1", "home-2"}
    assert rejected["failing_probes"] == forgotten == report["failing_probes"]
    md = (v2 / "gate.md").read_text()
    assert "FAILED (canaries)" in md and all(f"`{i}`" in md for i in forgotten)
    summary = [m for m in read_metrics(out) if m["event"] == "summary"][-1]
    assert summary["exit_code"] == 8 and summary["gate"]["failed"] == ["canaries"]
    assert not (out / "work").exists()  # the run is over; its documents stay unseen

    # the served model still answers as before: v1's weights, not the candidate's
    model, tok, _ = load_model(out / "current")
    assert (
        GateSpec(canaries=str(tmp / "gate/canaries.jsonl")).build().score(model, tok)["canaries"]
        == [True] * 3
    )

    res = CliRunner().invoke(cli, ["versions", str(out)])
    assert res.exit_code == 0 and "| * | v000001 |" in res.output and "gate: failed: canaries" in res.output
    rows = json.loads(CliRunner().invoke(cli, ["versions", str(out), "--json"]).output)
    assert [r["gate"] for r in rows] == ["passed", "failed"] and rows[1]["rejected"] == "gate"

    # reconcile never adopts the rejected candidate; a looser gate publishes the night on top of v1
    assert reconcile(out) == v1
    assert run_cli(str(night_recipe(tmp, tiny_lm_dir, *gate, "gate.max_canary_drop=1")), []) == ExitCode.OK
    v3 = current_version(out)
    assert v3.name == "v000003" and json.loads((v3 / "version.json").read_text())["base_version"] == v1.name


def test_a_candidate_with_nan_weights_is_rejected_by_the_gate(served_canaries, tiny_lm_dir, tmp_path):
    """Exit 4 refuses NaN weights before publishing; the gate refuses them too, from the files on disk."""
    src, _ = served_canaries
    out = copy_out(src, tmp_path / "nan") / "out"
    v1 = current_version(out)
    model, tok, _ = load_model(v1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    plan = Plan("nan-run", v1.name, 1, "h", Position(), {}, [], [])
    engine = PlainEngine(model, {}, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 0.0)
    spec = GateSpec(
        canaries=str(out.parent / "gate/canaries.jsonl"), heldout=str(out.parent / "gate/heldout.jsonl")
    )
    gate = spec.build()

    def export(tmp: Path) -> list[str]:
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        return ["model"]

    with pytest.raises(GateRejectedError, match="canaries, heldout_ppl"):
        publish(
            out,
            engine,
            export,
            plan,
            DocumentLedger(v1 / "ledger.json"),
            RunSummary.of_plan(plan),
            "",
            {"target_kind": "full"},
            3,
            gate=lambda v: gate.evaluate(v, baseline=str(v1)),
        )
    candidate = list_versions(out)[-1]
    report = json.loads((candidate / "gate.json").read_text())
    assert current_version(out) == v1 and gate_verdict(candidate) == "failed"
    assert report["failed"] == ["canaries", "heldout_ppl"]
    assert sorted(report["failing_probes"]) == ["home-0", "home-1", "home-2"]
    assert (candidate / "rejected.json").exists() and reconcile(out) == v1


def run_update(recipe: Path, fault: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKL_TEST_FAULT": fault or "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ckl_toolkit.update", "--recipe", str(recipe)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


@pytest.mark.parametrize("point", ["version_renamed", "gate_reported"])
def test_a_run_killed_while_its_gate_decides_never_serves_an_ungated_version(
    served_canaries, tiny_lm_dir, tmp_path, point
):
    src, gate = served_canaries
    tmp = copy_out(src, tmp_path / "killed")
    write_jsonl(tmp / "data/c.jsonl", homes("c", MOVES))
    recipe = night_recipe(tmp, tiny_lm_dir, *gate, "gate.max_canary_drop=1")  # this gate passes
    assert run_update(recipe, point) == 137
    out = tmp / "out"
    v1, v2 = list_versions(out)
    if point == "version_renamed":  # no verdict yet: rejected, and the resumed run publishes afresh
        assert run_update(recipe, None) == ExitCode.OK
        assert json.loads((v2 / "rejected.json").read_text())["reason"] == "gate-interrupted"
        assert current_version(out).name == "v000003" and gate_verdict(current_version(out)) == "passed"
    else:  # the gate had passed: the candidate is adopted, nothing is trained again
        assert run_update(recipe, None) == ExitCode.NOTHING_TO_DO
        assert current_version(out) == v2 and not (v2 / "rejected.json").exists()


def test_gate_files_are_checked_naming_file_line_and_field(tmp_path):
    bad = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"probe": "Ada lives in London", "object": "London"},
            {"probe": "Alan lives in Paris", "object": "Rome"},
        ],
    )
    with pytest.raises(ConfigError, match=r"gate\.canaries: .*c\.jsonl:2: field 'probe' must .* 'Rome'"):
        load_probes(str(bad), "gate.canaries")
    write_jsonl(
        tmp_path / "t.jsonl", [{"subject": "Ada", "relation": "lives in", "object": "London", "id": "x"}]
    )
    assert load_probes(str(tmp_path / "t.jsonl"), "f") == [
        {"id": "x", "probe": "Ada lives in London", "object": "London"}
    ]
    lama = {
        "uuid": "u1",
        "task_descriptive": "Ada has a house in London",
        "object": "London",
        "evidence": "...",
    }
    write_jsonl(tmp_path / "l.jsonl", [lama])
    assert load_probes(str(tmp_path / "l.jsonl"), "f", "task_descriptive") == [
        {"id": "u1", "probe": "Ada has a house in London", "object": "London"}
    ]
    with pytest.raises(ConfigError, match="max_canary_drop"):
        GateSpec(canaries="x", max_canary_drop=2)


# ---------------------------------------------------------------------------------------------
# rollback

ROLLBACK_POINTS = [
    "rollback_planned",
    "rollback_cleared",
    "rollback_marked",
    "current_json_written",
    "symlink_staged",
    "current_moved",
    "rollback_done",
]


def three_versions(out: Path) -> None:
    for text in ("one", "two", "three"):
        base = current_version(out)
        meta = {"base_version": base.name if base else None}
        publish_version(out, lambda d, t=text: (d / "model.txt").write_text(t), meta=meta)


def rollback_in_child(out: Path, fault: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKL_TEST_FAULT": fault or ""}
    cmd = [sys.executable, "-m", "ckl_toolkit.cli", "rollback", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def assert_serves(out: Path, text: str) -> None:
    served = current_version(out)
    assert (served / "model.txt").read_text() == text
    assert json.loads((out / "current.json").read_text())["version"] == served.name
    assert not (out / "rollback.json").exists() and not list(out.glob(".current.*"))


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_a_rollback_killed_at_any_point_is_finished_by_the_next_rollback_or_update(tmp_path, point):
    for finisher in ("rollback", "update"):
        out = tmp_path / finisher
        three_versions(out)
        assert rollback_in_child(out, point).returncode == 137
        assert (current_version(out) / "model.txt").read_text() in ("two", "three")  # always a whole version
        if finisher == "rollback":
            # killed after its last step the rollback is complete; rerun with --to it is a no-op
            args = ("--to", "v2") if point == "rollback_done" else ()
            res = rollback_in_child(out, None, *args)
            assert res.returncode == 0, res.stderr
            note = (
                "already served" if point == "rollback_done" else "finished a rollback that was interrupted"
            )
            assert note in res.stdout
        else:
            reconcile(out)  # what every update starts with
        assert_serves(out, "two")
        v3 = json.loads((out / "versions/v000003/rejected.json").read_text())
        assert v3["reason"] == "rollback" and v3["rolled_back_to"] == "v000002"
        assert reconcile(out).name == "v000002"  # the rolled-back version is never adopted again


def test_rollback_to_a_version_forward_and_refusals(tmp_path):
    out = tmp_path / "out"
    three_versions(out)
    runner = CliRunner()
    res = runner.invoke(cli, ["rollback", str(out), "--to", "v1"])
    assert res.exit_code == 0 and "rolled back: current v000003 -> v000001" in res.output
    assert_serves(out, "one")
    res = runner.invoke(cli, ["rollback", str(out)])
    assert res.exit_code == 2 and "no version older than v000001" in res.output
    res = runner.invoke(cli, ["rollback", str(out), "--to", "v3"])
    assert res.exit_code == 2 and "rolled back to v000001" in res.output and "--force" in res.output
    res = runner.invoke(cli, ["rollback", str(out), "--to", "v9"])
    assert res.exit_code == 2 and "known: v000001, v000002, v000003" in res.output
    assert runner.invoke(cli, ["rollback", str(out), "--to", "v3", "--force"]).exit_code == 0
    assert_serves(out, "three")
    assert not (out / "versions/v000003/rejected.json").exists()
    assert (out / "versions/v000002/rejected.json").exists()  # still rolled back: never adopted
    assert reconcile(out).name == "v000003"
    with RunLock(out):
        res = runner.invoke(cli, ["rollback", str(out), "--to", "v1"])
        assert res.exit_code == 3 and "locked" in res.output
