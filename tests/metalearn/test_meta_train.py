"""End-to-end single-process meta-training on a tiny model: runs, logs, checkpoints, resumes, exports."""

import json

import pytest
import torch
from click.testing import CliRunner

from ckl_toolkit.cli import main as cli
from ckl_toolkit.core.config import ConfigError, load_recipe
from ckl_toolkit.core.io import write_jsonl_atomic
from ckl_toolkit.core.ta_model import load_ta_model
from ckl_toolkit.meta import meta_train
from ckl_toolkit.metalearn.config import MetaRecipe
from tests.conftest import meta_pairs as pairs


@pytest.fixture
def meta_data(tmp_path):
    write_jsonl_atomic(tmp_path / "train.jsonl", pairs(6))
    write_jsonl_atomic(tmp_path / "val.jsonl", pairs(4))
    return tmp_path


def recipe(tiny_lm_dir, data, run_dir, *extra):
    return load_recipe(
        MetaRecipe,
        None,
        [
            f"run_dir={run_dir}",
            f"base.path={tiny_lm_dir}",
            f"data.train={data / 'train.jsonl'}",
            f"data.val={data / 'val.jsonl'}",
            "steps=4",
            "batch_size=2",
            "log_every=1",
            "val_every=2",
            "val.pairs=2",
            "val.epochs=1",
            "save_every=2",
            "progress=false",
            "optim.lr=1e-2",
            *extra,
        ],
    )


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_meta_train_runs_logs_and_moves_phi(tiny_lm_dir, meta_data, tmp_path):
    ta_dir = meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "run"))
    ta = load_ta_model(ta_dir)
    # the head started at weight 0 / bias 4: meta-training must have moved it
    assert ta.head.weight.abs().sum() > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["outer_loss"])) for r in records)
    assert "val_top_em" in records[1] and "val_top_em" not in records[0]
    assert (tmp_path / "run" / "recipe.yaml").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_resume_equals_uninterrupted(tiny_lm_dir, meta_data, tmp_path):
    straight = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "a")))
    # "killed" after step 2: a run that stopped there, then the same recipe again resumes at step 2
    meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "b", "steps=2"))
    resumed = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "b")))
    assert states_equal(straight, resumed)
    assert not states_equal(load_ta_model(tmp_path / "b" / "checkpoints" / "step_00000002" / "ta"), resumed)


def test_a_resume_logs_each_step_once(tiny_lm_dir, meta_data, tmp_path):
    import shutil

    run = tmp_path / "run"
    meta_train(recipe(tiny_lm_dir, meta_data, run))
    # a kill after steps 3 and 4 were logged but before step 4's checkpoint, mid-way through a line
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "outer_lo')
    meta_train(recipe(tiny_lm_dir, meta_data, run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_lm_dir, meta_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from ckl_toolkit.core.config import to_yaml

    straight = load_ta_model(
        meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "a", "steps=6", "save_every=1"))
    )
    rec = recipe(tiny_lm_dir, meta_data, tmp_path / "b", "steps=6", "save_every=1")
    (tmp_path / "r.yaml").write_text(to_yaml(rec))
    cmd = [sys.executable, "-m", "ckl_toolkit.meta", "--recipe", str(tmp_path / "r.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000002"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # at an arbitrary point after step 2
    proc.wait()
    assert not (tmp_path / "b" / "ta").exists(), "the run finished before it could be killed"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert states_equal(straight, load_ta_model(tmp_path / "b" / "ta"))


def test_resume_never_refuses_existing_run(tiny_lm_dir, meta_data, tmp_path):
    meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "c", "steps=2"))
    with pytest.raises(ConfigError, match="resume"):
        meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "c", "resume=never"))


def test_bad_pairs_file_names_file_line_and_field(tiny_lm_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"text": "a", "task": "b c", "object": "c"}\n{"text": "a", "task": "b"}\n'
    )
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing field 'object'"):
        meta_train(recipe(tiny_lm_dir, tmp_path, tmp_path / "run"))


def test_cli_meta_train_dry_run_and_export(tiny_lm_dir, meta_data, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text(
        f"base:\n  path: {tiny_lm_dir}\ndata:\n  train: {meta_data / 'train.jsonl'}\n"
        f"run_dir: {tmp_path / 'run'}\nsteps: 2\nbatch_size: 2\nprogress: false\nval_every: 0\n"
    )
    runner = CliRunner()
    dry = runner.invoke(cli, ["meta-train", "--recipe", str(rec), "--dry-run", "steps=3"])
    assert dry.exit_code == 0 and "steps: 3" in dry.output
    bad = runner.invoke(cli, ["validate", "--recipe", str(rec), "stepz=3"])
    assert bad.exit_code == 2 and "stepz: unknown field" in bad.output
    assert runner.invoke(cli, ["meta-train", "--recipe", str(rec)]).exit_code == 0
    out = runner.invoke(cli, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert out.exit_code == 0, out.output
    assert states_equal(load_ta_model(tmp_path / "exp"), load_ta_model(tmp_path / "run" / "ta"))


def test_meta_train_with_inner_subset_and_closed_form_adamw(tiny_lm_dir, meta_data, tmp_path):
    """The CPU recipe's options end to end: top-1 layer inner step (prefix cache), closed-form AdamW."""
    extra = ["meta.inner.params=top_k_layers:1", "meta.inner.optimizer=adamw", "meta.inner.lr=1e-3"]
    rec = recipe(tiny_lm_dir, meta_data, tmp_path / "run", *extra, "log_every=2", "data.val=null")
    ta = load_ta_model(meta_train(rec))
    assert ta.head.weight.abs().sum() > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["outer_loss_before"] == r["outer_loss_before"] for r in records)  # logged steps: not nan


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_head_only_phi_windows_schedule_and_diagnostic(tiny_lm_dir, meta_data, tmp_path):
    from ckl_toolkit.core.ta_model import build_ta_model

    extra = ["ta.train=head", "ta.head_bias=0", "data.window=20", "diag_every=2", "val.pairs=0",
             "optim.schedule=cosine", "optim.warmup_steps=1", "log_every=4"]  # fmt: skip
    ta = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "run", *extra)))
    fresh = build_ta_model(tiny_lm_dir)
    assert states_equal(ta.trunk, fresh.trunk)  # head-only: the trunk never moved
    assert ta.head.weight.abs().sum() > 0 and float(ta.head.bias) != 4.0
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 2, 4]  # diagnostics force a record; step 0 is φ at its start
    assert all(0 < r["diag_object_share"] < 1 and 0 < r["diag_uniform_share"] < 1 for r in records)
    assert records[0]["diag_object_share"] == pytest.approx(records[0]["diag_uniform_share"])  # weight 0
    assert records[1]["lr"] > records[2]["lr"] > 0  # cosine decays
    assert "val_top_em" not in records[-1]  # val.pairs=0: no protocol run


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_lm_dir, meta_data, tmp_path):
    """A killed run may have logged steps after its last checkpoint; the resumed run logs them again."""
    meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "b", "steps=2", "val_every=0", "data.val=null"))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "outer_loss": 1.0}) + "\n")  # logged, then killed before saving
    meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "b", "val_every=0", "data.val=null"))
    steps = [r["step"] for r in _records(tmp_path / "b")]
    assert steps == [1, 2, 3, 4]
    assert _records(tmp_path / "b")[2]["outer_loss"] != 1.0


def test_changed_recipe_starts_fresh_and_keeps_the_old_run(tiny_lm_dir, meta_data, tmp_path):
    run = tmp_path / "c"
    meta_train(recipe(tiny_lm_dir, meta_data, run, "steps=2", "data.val=null"))
    # logging and length may change: it resumes
    meta_train(recipe(tiny_lm_dir, meta_data, run, "steps=3", "log_every=3", "data.val=null"))
    assert [r["step"] for r in _records(run)] == [1, 2, 3]
    # a section that decides φ changed: not resumed; the old run is moved aside, not deleted
    meta_train(recipe(tiny_lm_dir, meta_data, run, "steps=3", "optim.lr=2e-2", "data.val=null"))
    stale = list(run.glob("stale-*"))
    assert len(stale) == 1 and (stale[0] / "checkpoints" / "latest").exists()
    assert [r["step"] for r in _records(stale[0])] == [1, 2, 3]
    assert [r["step"] for r in _records(run)] == [1, 2, 3]  # the new run, from step 0


def test_sigterm_checkpoints_exits_6_and_resumes_equal(tiny_lm_dir, meta_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from ckl_toolkit.core.config import to_yaml

    args = ("steps=40", "save_every=0", "data.val=null", "log_every=1")
    straight = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "a", *args)))
    (tmp_path / "r.yaml").write_text(to_yaml(recipe(tiny_lm_dir, meta_data, tmp_path / "b", *args)))
    cmd = [sys.executable, "-m", "ckl_toolkit.cli", "meta-train", "--recipe", str(tmp_path / "r.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "b" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 6, err[-2000:]
    latest = (tmp_path / "b" / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.removeprefix("step_"))
    assert 2 <= stopped < 40, "the run finished before the signal"  # save_every=0: only the signal saved
    assert [r["step"] for r in _records(tmp_path / "b")] == list(range(1, stopped + 1))
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert [r["step"] for r in _records(tmp_path / "b")] == list(range(1, 41))
    assert states_equal(straight, load_ta_model(tmp_path / "b" / "ta"))


def test_lora_phi_meta_train_exports_a_plain_ta_model(tiny_lm_dir, meta_data, tmp_path):
    extra = ("ta.train=lora:4", "data.val=null", "steps=2", "save_every=1")
    ta = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "run", *extra)))
    from ckl_toolkit.core.ta_model import build_ta_model

    fresh = build_ta_model(tiny_lm_dir)
    moved = [k for k, v in ta.trunk.state_dict().items() if not torch.equal(v, fresh.trunk.state_dict()[k])]
    assert moved and all("proj" in k for k in moved)  # merged adapters changed the linear layers only
    # and the run resumes from its LoRA checkpoint
    again = load_ta_model(
        meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "run", *extra[:-2], "steps=3"))
    )
    assert not states_equal(ta, again)


def test_surprise_phi_meta_trains_and_diagnoses(tiny_lm_dir, meta_data, tmp_path):
    extra = ("ta.surprise=true", "ta.train=head", "ta.head_bias=0", "diag_every=2", "val.pairs=0")
    ta = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "run", *extra)))
    assert ta.surprise and ta.head.weight[0, -1] != 0  # the surprise column learned something
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if "diag_object_share" in r] == [0, 2, 4]


def test_echo_phi_meta_trains_and_saves_its_reading(tiny_lm_dir, meta_data, tmp_path):
    """ta.echo: φ reads each document twice while it trains, and the saved TA model keeps doing so."""
    base = ("val.pairs=0", "val_every=0", "ta.head_bias=0")
    causal = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "causal", *base)))
    echo = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "echo", *base, "ta.echo=true")))
    assert echo.echo and not causal.echo
    assert not states_equal(causal, echo)  # the same data and seed: only the reading differs


def test_retention_term_scores_known_facts_and_changes_phi(tiny_lm_dir, meta_data, tmp_path):
    known = [{"task": f"{s} works for {o}", "object": o} for s, o in (("Rome", "Italy"), ("Oslo", "Norway"))]
    write_jsonl_atomic(tmp_path / "known.jsonl", known)
    base = ("val.pairs=0", "val_every=0")
    plain = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "plain", *base)))
    retain = (f"data.retain={tmp_path / 'known.jsonl'}", "data.retain_batch_size=2", "meta.retain_weight=5")
    extra = (*base, *retain)
    kept = load_ta_model(meta_train(recipe(tiny_lm_dir, meta_data, tmp_path / "retain", *extra)))
    records = _records(tmp_path / "retain")
    # the default L_R is KL(p_θ ‖ p_θ'): 0 at θ, > 0 once the inner step moved what they answer
    assert all(r["retain_loss"] > 0 and r["retain_loss_before"] == 0 for r in records)
    assert "retain_loss" not in _records(tmp_path / "plain")[0]
    assert not states_equal(plain, kept)  # the term reached φ


def test_retention_term_needs_its_file_and_weight(tiny_lm_dir, meta_data, tmp_path):
    with pytest.raises(ConfigError, match="data.retain: the retention term needs both"):
        recipe(tiny_lm_dir, meta_data, tmp_path / "run", "meta.retain_weight=1")
    with pytest.raises(ConfigError, match="meta.retain_weight: the retention term needs both"):
        recipe(tiny_lm_dir, meta_data, tmp_path / "run", f"data.retain={meta_data / 'val.jsonl'}")
    known = '{"task": "Rome works for Italy", "object": "Italy"}\n{"task": "x"}\n'
    (tmp_path / "known.jsonl").write_text(known)
    bad = recipe(tiny_lm_dir, meta_data, tmp_path / "run", f"data.retain={tmp_path / 'known.jsonl'}",
                 "meta.retain_weight=1")  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.retain: .*known\.jsonl:2: missing field 'object'"):
        meta_train(bad)
