"""Before a run: missing paths fail fast naming the command that makes them; the run is resolved (documents,
steps, RecAdam's λ(t), memory); a schedule that cannot learn, or a run that did not move, is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckl_toolkit.cli import main as cli
from ckl_toolkit.core.config import ConfigError, load_recipe, to_yaml
from ckl_toolkit.nightly.config import UpdateRecipe
from ckl_toolkit.nightly.contract import ExitCode, current_version
from ckl_toolkit.training.sections import RecAdamSpec
from ckl_toolkit.update import run_cli, update
from tests.nightly.test_update import facts, make_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def fresh_clone(tmp_path: Path) -> Path:
    """A checkout without set-up: the recipes, no models/ and no runs/ (and ../shared/data next to it)."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "recipes", clone / "recipes")
    return clone


def ckl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "0"}  # a hub lookup would be allowed
    return subprocess.run(
        [sys.executable, "-m", "ckl_toolkit.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_headline_command_in_a_fresh_clone_exits_2_in_seconds_naming_what_to_run(tmp_path):
    clone = fresh_clone(tmp_path)
    t0 = time.perf_counter()
    res = ckl(clone, "update", "--recipe", "recipes/temporalwiki.yaml")
    seconds = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    assert "target.path: models/smollm2-135m does not exist; `make real`" in res.stderr
    assert "Traceback" not in res.stderr and seconds < 15
    assert not (clone / "runs").exists()  # nothing was written

    # the model is there, the TA model is not: the make target and the meta-training recipe that write it
    (clone / "models/smollm2-135m").mkdir(parents=True)
    (clone / "models/smollm2-135m/config.json").write_text("{}")
    res = ckl(clone, "validate", "--recipe", "recipes/temporalwiki.yaml")
    assert res.returncode == 2
    assert "weights.ta_path: runs/meta_temporalwiki/ta does not exist; `make temporalwiki-ta`" in res.stderr
    assert "`ckl meta-train --recipe recipes/meta_temporalwiki.yaml`) writes it" in res.stderr
    # a TA model made by another meta recipe is still named by the recipe whose run_dir holds it
    res = ckl(
        clone, "validate", "--recipe", "recipes/temporalwiki.yaml", "weights.ta_path=runs/meta_smollm2/ta"
    )
    assert "`ckl meta-train --recipe recipes/meta_smollm2.yaml` writes it" in res.stderr
    # and meta-training without its pairs names `ckl data temporalwiki`
    res = ckl(clone, "meta-train", "--recipe", "recipes/meta_temporalwiki.yaml")
    assert res.returncode == 2 and "data.train: runs/temporalwiki_data/meta_train.jsonl" in res.stderr
    assert "`ckl data temporalwiki --path ../shared/data/temporalwiki" in res.stderr
    # pairs but not the retention term's known facts: `ckl data known-facts`, not data temporalwiki
    (clone / "runs/temporalwiki_data").mkdir(parents=True)
    (clone / "runs/temporalwiki_data/meta_train.jsonl").write_text(
        '{"text": "a b", "task": "b", "object": "b"}\n'
    )
    res = ckl(clone, "meta-train", "--recipe", "recipes/meta_temporalwiki.yaml")
    assert res.returncode == 2 and "data.retain: runs/temporalwiki_data/known_facts.jsonl" in res.stderr
    assert "`ckl data known-facts --facts ../shared/data/lama_ckl/invariant_schematic.jsonl" in res.stderr


def test_missing_stream_and_hub_ids_only_when_spelled_out(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 2))
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path, tiny_lm_dir, f"data.stream.paths=[{tmp_path}/gone.jsonl]")))
    assert run_cli(str(path), []) == ExitCode.BAD_INPUT
    assert not (tmp_path / "out").exists()
    from ckl_toolkit.core.paths import model_source, require_model_dir

    require_model_dir("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "target.path")  # explicit: not checked here
    assert model_source("hf://HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        False,
    )
    assert model_source("models/x") == ("models/x", True)  # a plain path is local files only
    with pytest.raises(ConfigError, match="HuggingFaceTB/x does not exist.*hf://org/name"):
        require_model_dir("HuggingFaceTB/x", "target.path")


def test_recadam_schedule_relative_to_the_planned_steps_and_one_that_cannot_learn_is_refused():
    absolute = RecAdamSpec()  # the paper's t0=250, k=0.5
    with pytest.raises(ConfigError, match=r"λ\(t\) stays below .* 21 planned steps.*relative=true"):
        absolute.check(21)  # the run: λ(21) ≈ 1e-50, the weights would not move
    assert absolute.check(600)[1] > 0.99
    relative = RecAdamSpec(t0=0.5, k=10.0, relative=True)
    assert relative.schedule(20) == (0.5, 10.0)  # k/N per step, t0·N
    lo, hi = relative.check(21)
    assert lo < 0.02 and hi > 0.98  # the same shape over any run length
    assert relative.lambda_range(4000) == pytest.approx(relative.lambda_range(21), abs=0.01)
    with pytest.raises(ConfigError, match="does not plan its steps"):
        relative.schedule(None)
    with pytest.raises(ConfigError, match="t0"):
        RecAdamSpec(t0=3.0, relative=True)


def test_update_refuses_a_schedule_that_cannot_learn_and_plans_its_steps_exactly(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 12))
    refused = tmp_path / "refused.yaml"
    refused.write_text(
        to_yaml(make_recipe(tmp_path, tiny_lm_dir, "optim.name=recadam", "optim.recadam.gamma=50"))
    )
    assert run_cli(str(refused), []) == ExitCode.BAD_INPUT  # t0=250 over 3 steps
    assert "λ(t) stays below" in (tmp_path / "out/logs/update.log").read_text()
    assert current_version(tmp_path / "out") is None

    r = make_recipe(
        tmp_path,
        tiny_lm_dir,
        "optim.name=recadam",
        "optim.recadam.gamma=50",
        "optim.recadam.relative=true",
        "optim.recadam.t0=0.5",
        "optim.recadam.k=10",
        "epochs=2",
        "batching.pack=true",
    )
    summary = update(r)
    assert summary.exit_code == ExitCode.OK and summary.steps == summary.planned_steps > 0
    assert summary.tokens == summary.planned_tokens
    assert summary.recadam["lambda_first"] < 0.05 and summary.recadam["lambda_last"] > 0.95
    assert summary.weights_moved["tensors_changed"] == summary.weights_moved["tensors"] > 0
    assert summary.weights_moved["relative_change"] > 0


def test_a_run_whose_weights_did_not_move_publishes_nothing_and_exits_7(tmp_path, tiny_lm_dir):
    rows = [
        {"id": f"n{i}", "text": "Ada Lovelace works for Babbage Engines .", "object": "Paris"}
        for i in range(4)
    ]
    write_jsonl(tmp_path / "data/a.jsonl", rows)  # the oracle weights 0 everywhere: no gradient at all
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path, tiny_lm_dir, "weights.method=oracle")))
    assert run_cli(str(path), []) == ExitCode.NOT_LEARNED
    log = (tmp_path / "out/logs/update.log").read_text()
    assert "did not move" in log and "documents stay unseen" in log
    assert current_version(tmp_path / "out") is None


def test_the_run_log_tells_start_plan_checkpoints_and_publish(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 16))
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path, tiny_lm_dir, "save_every_minutes=0.00001")))
    assert run_cli(str(path), []) == ExitCode.OK
    log = (tmp_path / "out/logs/update.log").read_text()
    summary = json.loads((current_version(tmp_path / "out") / "summary.json").read_text())
    n = summary["planned_steps"]
    assert summary["steps"] == n > 1 and summary["tokens"] == summary["planned_tokens"] > 0
    for says in (
        "update start:",
        "16 new documents",
        f"{n} steps",
        f"checkpoint step 1 of {n} (every 1e-05 minutes)",
        f"checkpoint step {n} of {n}",
        "published ",
        "weights moved",
    ):
        assert says in log, (says, log)
    card = (current_version(tmp_path / "out") / "README.md").read_text()
    assert str(Path(tiny_lm_dir).resolve()) in card and "16 new documents" in card


def test_validate_resolves_the_run_without_writing_and_predicts_its_steps(tmp_path, tiny_lm_dir):
    import re

    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 10) + [{"id": "bad", "text": ""}])
    recadam = [
        "optim.name=recadam",
        "optim.recadam.relative=true",
        "optim.recadam.t0=0.5",
        "optim.recadam.k=10",
        "optim.recadam.gamma=50",
    ]
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path, tiny_lm_dir, *recadam)))
    res = CliRunner().invoke(cli, ["validate", "--recipe", str(path)])
    assert res.exit_code == 0, res.output
    for says in ("documents: 10 new", "RecAdam λ(t): 0.0", "peak memory, estimated:", "runtime: cpu"):
        assert says in res.output, (says, res.output)
    assert not (tmp_path / "out").exists() and not (tmp_path / "quarantine").exists()  # nothing written
    steps, tokens = map(int, re.search(r"planned: (\d+) optimizer steps, (\d+) tokens", res.output).groups())
    summary = update(load_recipe(UpdateRecipe, path))
    assert (summary.steps, summary.tokens) == (steps, tokens)
    res = CliRunner().invoke(cli, ["update", "--recipe", str(path), "--dry-run", "target.kind=qlora"])
    if not __import__("torch").cuda.is_available():
        assert res.exit_code == 2 and "qlora" in res.output and "CUDA" in res.output
