"""The nightly update end to end on a tiny Llama: resume, exactly-once, bad input, regularizers, TA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckl_toolkit.cli import main as cli
from ckl_toolkit.core.config import ConfigError, load_recipe, to_yaml
from ckl_toolkit.core.io import MetricsLogger
from ckl_toolkit.core.losses import target_mask, token_nll
from ckl_toolkit.core.ta_model import build_ta_model, save_ta_model
from ckl_toolkit.core.text import encode
from ckl_toolkit.nightly.config import UpdateRecipe
from ckl_toolkit.nightly.contract import ExitCode, RunLock, current_version, list_versions
from ckl_toolkit.nightly.idstore import open_ledger
from ckl_toolkit.nightly.run import read_metrics
from ckl_toolkit.update import StopFlag, run_cli, update

REPO = Path(__file__).resolve().parents[2]
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
PLACES = ["London", "Paris", "New York", "Maida Vale", "Bletchley Park"]


def facts(prefix: str, n: int, start: int = 0) -> list[dict]:
    """Documents in the tiny tokenizer's words; each has an object for the oracle."""
    rows = []
    for i in range(start, start + n):
        who, where = PEOPLE[i % 3], PLACES[(i * 7 + len(prefix)) % 5]
        rows.append({"id": f"{prefix}{i}", "text": f"{who} now lives in {where} . {who} works for {where} .",
                     "object": where})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list, mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode + "b") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def make_recipe(tmp: Path, lm: Path, *overrides: str, data: Path | None = None) -> UpdateRecipe:
    base = [
        f"output_dir={tmp / 'out'}", f"target.path={lm}", "weights.method=uniform",
        f"data.stream={{paths: [{data or tmp / 'data'}], quarantine_dir: {tmp / 'quarantine'}}}",
        "batching.batch_size=4", "batching.max_length=32", "optim.lr=0.01", "progress=false", "log_every=1",
        "save_every=0", "threads=1",
    ]  # fmt: skip
    return load_recipe(UpdateRecipe, None, base + list(overrides))


def ledger_ids(version: Path) -> list[str]:
    """Every id the version's ledger holds (its ledger.json references a state of the id store)."""
    return open_ledger(version.parents[1], version / "ledger.json", readonly=True).ids()


def published_tensors(out: Path, sub: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(current_version(out) / sub / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# recipes and the command line


def test_shipped_recipes_validate_and_bad_fields_are_named(tmp_path):
    runner = CliRunner()
    for name in ("update_synthetic.yaml", "temporalwiki.yaml"):
        load_recipe(UpdateRecipe, REPO / "recipes" / name)  # the schema; `ckl validate` also resolves the run
    res = runner.invoke(
        cli,
        [
            "update",
            "--recipe",
            str(REPO / "recipes/temporalwiki.yaml"),
            "--dry-run",
            "epochs=2",
            f"target.path={tmp_path}/no-model",
        ],
    )
    assert res.exit_code == 2 and "target.path" in res.output  # dry-run resolves paths, not only the schema
    bad = tmp_path / "r.yaml"
    bad.write_text(
        "target:\n  path: /m\nweights:\n  method: rho1\n  keep_ratio: 2\ndata:\n  stream: {paths: [x]}\n"
    )
    with pytest.raises(ConfigError, match=r"r\.yaml:5: weights\.keep_ratio: must be in \(0, 1\]"):
        load_recipe(UpdateRecipe, bad)
    res = runner.invoke(cli, ["fields", "--job", "update"])
    assert "weights.method" in res.output and "mix_review.per" in res.output


def test_qlora_without_cuda_fails_early_naming_the_field(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 2))
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path, tiny_lm_dir, "target.kind=qlora")))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run_cli(str(path), []) == ExitCode.BAD_INPUT
    assert not (tmp_path / "out" / "versions").exists()


# ---------------------------------------------------------------------------------------------
# the nightly contract


def test_two_runs_over_a_growing_stream_learn_every_document_exactly_once(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/s1.jsonl", facts("a", 6))
    r = make_recipe(tmp_path, tiny_lm_dir)
    first = update(r)
    assert first.exit_code == ExitCode.OK and first.documents == 6

    write_jsonl(tmp_path / "data/s1.jsonl", facts("a", 3, start=6), mode="a")  # the shard grows
    write_jsonl(tmp_path / "data/s2.jsonl", facts("b", 4) + facts("a", 2))  # a new shard, 2 repeats
    second = update(r)
    assert second.exit_code == ExitCode.OK and second.documents == 7
    assert second.stream["skipped"]["seen"] == 6 + 2

    v1, v2 = list_versions(tmp_path / "out")
    learned = [[d["id"] for d in map(json.loads, open(v / "documents.jsonl"))] for v in (v1, v2)]
    assert sorted(learned[0]) == [f"a{i}" for i in range(6)]
    assert sorted(learned[1]) == sorted([f"a{i}" for i in range(6, 9)] + [f"b{i}" for i in range(4)])
    assert ledger_ids(v2) == sorted(learned[0] + learned[1])
    assert update(r).exit_code == ExitCode.NOTHING_TO_DO
    assert current_version(tmp_path / "out") == v2
    # the served model is v2, trained on top of v1, and it loads as an HF model
    served = AutoModelForCausalLM.from_pretrained(current_version(tmp_path / "out") / "model")
    v1_norm = load_file(str(v1 / "model/model.safetensors"))["model.norm.weight"]
    assert not torch.equal(served.model.norm.weight.detach(), v1_norm)


def test_killed_run_resumes_to_the_same_model_as_an_uninterrupted_run(tmp_path, tiny_lm_dir):
    data = write_jsonl(tmp_path / "data/a.jsonl", facts("k", 120)).parent
    common = ["batching.batch_size=2", "optim.name=recadam", "optim.recadam.t0=10", "optim.lr=0.003",
              "optim.recadam.gamma=300"]  # fmt: skip
    ref = update(make_recipe(tmp_path / "ref", tiny_lm_dir, *common, data=data))
    assert ref.exit_code == ExitCode.OK

    recipe = make_recipe(tmp_path / "kill", tiny_lm_dir, *common, "save_every=3", data=data)
    path = tmp_path / "kill.yaml"
    path.write_text(to_yaml(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "ckl_toolkit.update", "--recipe", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    latest = tmp_path / "kill/out/work/checkpoints/latest"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000009":
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)  # at an arbitrary moment: maybe mid-step, maybe mid-checkpoint
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    assert current_version(tmp_path / "kill/out") is None

    resumed = update(recipe)
    assert resumed.exit_code == ExitCode.OK and resumed.resumed_from >= 9
    assert resumed.steps == ref.steps and resumed.documents == ref.documents
    want, got = published_tensors(tmp_path / "ref/out"), published_tensors(tmp_path / "kill/out")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert not (tmp_path / "kill/out/work").exists()


def test_sigterm_checkpoints_exits_6_and_the_next_run_finishes_the_same_model(
    tmp_path, tiny_lm_dir, monkeypatch
):
    data = write_jsonl(tmp_path / "data/a.jsonl", facts("s", 24)).parent
    ref = update(make_recipe(tmp_path / "ref", tiny_lm_dir, "batching.batch_size=2", data=data))
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path / "term", tiny_lm_dir, "batching.batch_size=2", data=data)))

    log = MetricsLogger.log

    def log_then_terminate(self, **record):  # cron's `timeout` sends SIGTERM mid-run; here at step 5
        log(self, **record)
        if record.get("step") == 5 and record.get("event") == "step":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_terminate)
    assert run_cli(str(path), []) == ExitCode.INTERRUPTED
    assert (tmp_path / "term/out/work/checkpoints/step_00000005").is_dir()
    assert current_version(tmp_path / "term/out") is None
    monkeypatch.setattr(MetricsLogger, "log", log)
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), StopFlag)  # restored
    assert run_cli(str(path), []) == ExitCode.OK
    want, got = published_tensors(tmp_path / "ref/out"), published_tensors(tmp_path / "term/out")
    assert ref.exit_code == ExitCode.OK and all(torch.equal(want[k], got[k]) for k in want)


def test_bad_input_is_quarantined_with_file_and_line_or_fatal(tmp_path, tiny_lm_dir):
    good = facts("g", 3)
    lines = [
        good[0], b"{not json\n", {"id": "m1", "body": "no text field"}, {"id": "e1", "text": "   "},
        b'{"id": "u1", "text": "caf\xe9"}\n', {"id": "long", "text": "x" * 500}, good[1], good[2],
    ]  # fmt: skip
    shard = write_jsonl(tmp_path / "data/a.jsonl", lines)
    res = update(make_recipe(tmp_path, tiny_lm_dir, "data.stream.max_chars=400"))
    assert res.exit_code == ExitCode.OK and res.documents == 3
    assert res.stream["skipped"] == {
        "bad_json": 1,
        "missing_field": 1,
        "empty_text": 1,
        "non_utf8": 1,
        "too_long": 1,
    }
    quarantined = [json.loads(x) for x in open(tmp_path / "quarantine/a.jsonl.jsonl")]
    kinds = ["bad_json", "missing_field", "empty_text", "non_utf8", "too_long"]
    assert [(q["line"], q["kind"]) for q in quarantined] == list(zip(range(2, 7), kinds))
    assert all(q["shard"] == str(shard) for q in quarantined)

    # fatal: exit 2 naming file:line:field, nothing published, current unchanged
    write_jsonl(tmp_path / "data/b.jsonl", [facts("h", 1)[0], {"id": "h9", "text": ""}])
    path = tmp_path / "fatal.yaml"
    path.write_text(
        to_yaml(make_recipe(tmp_path, tiny_lm_dir, "data.stream.on_error=fatal", "data.stream.max_chars=400"))
    )
    before = current_version(tmp_path / "out")
    log = tmp_path / "out/logs/update.log"
    assert run_cli(str(path), []) == ExitCode.BAD_INPUT
    assert f"{shard}:2: <json>" in log.read_text()
    assert current_version(tmp_path / "out") == before and len(list_versions(tmp_path / "out")) == 1


def test_lock_and_divergence_exit_codes_leave_current_unchanged(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 8))
    path = tmp_path / "r.yaml"
    path.write_text(
        to_yaml(make_recipe(tmp_path, tiny_lm_dir, "optim.lr=1e30", "optim.grad_clip=0", "max_nonfinite=2"))
    )
    with RunLock(tmp_path / "out"):
        assert run_cli(str(path), []) == ExitCode.LOCKED
    assert run_cli(str(path), []) == ExitCode.DIVERGED  # inf weights after one step, then NaN losses
    skips = [m for m in read_metrics(tmp_path / "out") if m["event"] == "skip"]
    assert [s["step"] for s in skips] == [2]  # logged and skipped; the second in a row aborts
    assert current_version(tmp_path / "out") is None


# ---------------------------------------------------------------------------------------------
# regularizers


def test_recadam_pulls_toward_the_anchors_as_scheduled(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 48))
    common = ["batching.batch_size=2", "optim.lr=0.003", "epochs=1"]
    data = tmp_path / "data"
    update(make_recipe(tmp_path / "adam", tiny_lm_dir, *common, "optim.name=adamw", data=data))
    recadam = ["optim.name=recadam", "optim.recadam.gamma=300", "optim.recadam.k=1.0", "optim.recadam.t0=14"]
    update(make_recipe(tmp_path / "rec", tiny_lm_dir, *common, *recadam, data=data))
    drift = {m["step"]: m["drift"] for m in read_metrics(tmp_path / "rec/out") if m["event"] == "step"}
    assert drift[1] is not None and max(drift[s] for s in range(1, 9)) < 0.05  # λ ≈ 0: held at θ*
    assert drift[24] > 10 * drift[8]  # past t0 the pull fades and the weights move

    def distance(out: Path) -> float:
        start = load_file(str(Path(tiny_lm_dir) / "model.safetensors"))
        end = published_tensors(out)
        return sum(float((end[k] - start[k]).norm() ** 2) for k in start) ** 0.5

    assert distance(tmp_path / "rec/out") < 0.9 * distance(tmp_path / "adam/out")  # 8 of 24 steps held


def test_mix_review_ratio_follows_its_schedule_per_epoch_and_per_period(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("n", 4))
    pool = write_jsonl(tmp_path / "pool/p.jsonl", facts("p", 10))
    mix = [
        f"data.pool={{paths: [{pool}], on_error: fatal}}",
        "mix_review.mix_ratio=2.0",
        "mix_review.mix_decay=0.5",
    ]
    res = update(make_recipe(tmp_path / "e", tiny_lm_dir, *mix, "epochs=3", data=tmp_path / "data"))
    epochs = [m for m in read_metrics(tmp_path / "e/out") if m["event"] == "epoch"]
    assert [(m["new"], m["rehearsal"], m["ratio"]) for m in epochs] == [(4, 8, 2.0), (4, 4, 1.0), (4, 2, 0.5)]
    assert all(i.startswith("p") for m in epochs for i in m["rehearsal_ids"])
    assert res.rehearsal_documents == 14
    # rehearsal is not new knowledge
    assert ledger_ids(current_version(tmp_path / "e/out")) == ["n0", "n1", "n2", "n3"]

    r = make_recipe(tmp_path, tiny_lm_dir, *mix, "mix_review.per=period")
    update(r)
    write_jsonl(tmp_path / "data/b.jsonl", facts("m", 4))
    update(r)
    periods = [m for m in read_metrics(tmp_path / "out") if m["event"] == "epoch"]
    assert [(m["rehearsal"], m["ratio"]) for m in periods] == [(8, 2.0), (4, 1.0)]


# ---------------------------------------------------------------------------------------------
# token weights


def sharp_ta(path: Path, lm: Path) -> Path:
    """A TA model whose weights are near 0 or 1 depending on the token (a random sharp head)."""
    torch.manual_seed(1)
    ta = build_ta_model(lm)
    torch.nn.init.normal_(ta.head.weight, std=40.0 / ta.head.in_features**0.5)
    torch.nn.init.zeros_(ta.head.bias)
    return save_ta_model(ta, path, AutoTokenizer.from_pretrained(lm))


def test_ta_weights_differ_from_uniform_and_change_what_is_learned(tmp_path, tiny_lm_dir):
    rows = facts("t", 16)
    write_jsonl(tmp_path / "data/a.jsonl", rows)
    ta_dir = sharp_ta(tmp_path / "ta", tiny_lm_dir)
    common = ["epochs=4", "optim.lr=0.01"]
    data = tmp_path / "data"
    update(make_recipe(tmp_path / "u", tiny_lm_dir, *common, data=data))
    ta_run = update(make_recipe(tmp_path / "t", tiny_lm_dir, *common, "weights.method=taalm",
                                f"weights.ta_path={ta_dir}", data=data))  # fmt: skip
    assert ta_run.exit_code == ExitCode.OK
    w_means = [m["w_mean"] for m in read_metrics(tmp_path / "t/out") if m["event"] == "step"]
    assert 0.2 < sum(w_means) / len(w_means) < 0.8  # not uniform (which is 1.0 everywhere)

    # What was learned: the NLL drop on the tokens φ weights high vs low, against uniform training.
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    enc = encode(tok, [r["text"] for r in rows], 32)
    from ckl_toolkit.core.ta_model import load_ta_model

    with torch.no_grad():
        w = load_ta_model(ta_dir)(enc.input_ids, enc.attention_mask)[:, 1:]  # (B, T-1)
        real = target_mask(enc.attention_mask)
        hi, lo = real & (w > 0.9), real & (w < 0.1)
        assert hi.sum() > 20 and lo.sum() > 20

        def drop(out: Path) -> tuple[float, float]:
            before = token_nll(
                AutoModelForCausalLM.from_pretrained(tiny_lm_dir), enc.input_ids, enc.attention_mask
            )
            after = token_nll(AutoModelForCausalLM.from_pretrained(current_version(out) / "model"),
                              enc.input_ids, enc.attention_mask)  # fmt: skip
            d = before - after
            return float(d[hi].mean()), float(d[lo].mean())

        (u_hi, u_lo), (t_hi, t_lo) = drop(tmp_path / "u/out"), drop(tmp_path / "t/out")
    assert t_hi - t_lo > (u_hi - u_lo) + 0.5, (u_hi, u_lo, t_hi, t_lo)


@pytest.mark.parametrize("method", ["oracle", "rho1"])
def test_oracle_and_rho1_weights_run_and_select_tokens(tmp_path, tiny_lm_dir, method):
    write_jsonl(tmp_path / "data/a.jsonl", facts("o", 6))
    res = update(make_recipe(tmp_path, tiny_lm_dir, f"weights.method={method}", "weights.keep_ratio=0.25"))
    assert res.exit_code == ExitCode.OK
    w_means = [m["w_mean"] for m in read_metrics(tmp_path / "out") if m["event"] == "step"]
    assert all(0.05 < w < 0.5 for w in w_means), w_means  # objects / the top quarter, not everything


# ---------------------------------------------------------------------------------------------
# targets


def test_lora_merged_and_kadapter_versions_load(tmp_path, tiny_lm_dir):
    from peft import PeftModel

    from ckl_toolkit.training.kadapter import load_adapter

    write_jsonl(tmp_path / "l/data/a.jsonl", facts("a", 6))
    update(
        make_recipe(
            tmp_path / "l", tiny_lm_dir, "target.kind=lora", "target.export=merged", "target.lora.r=4"
        )
    )
    v = current_version(tmp_path / "l/out")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    merged = AutoModelForCausalLM.from_pretrained(v / "model")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), v / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)  # the adapter learned

    write_jsonl(tmp_path / "k/data/a.jsonl", facts("a", 6))
    update(
        make_recipe(tmp_path / "k", tiny_lm_dir, "target.kind=kadapter", "target.kadapter.adapter_hidden=16")
    )
    k = load_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir), current_version(tmp_path / "k/out") / "adapter"
    )
    assert float(k.adapter.fuse_norm.weight.detach().abs().sum()) > 0  # trained away from its zero init


def test_a_document_the_tokenizer_cannot_read_is_quarantined_at_planning(tmp_path, tiny_lm_dir):
    """A lone surrogate once poisoned work/plan.json so every later night failed; now it is bad input."""
    bad = b'{"id": "bad", "text": "Ada Lovelace \\ud800 lives in London ."}\n'
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 2) + [bad])
    res = update(make_recipe(tmp_path, tiny_lm_dir))
    assert res.exit_code == ExitCode.OK and res.documents == 2
    (record,) = map(json.loads, open(tmp_path / "quarantine" / "a.jsonl.jsonl"))
    assert (record["line"], record["kind"]) == (3, "bad_unicode")
    plan_free = not (tmp_path / "out" / "work").exists()
    assert plan_free and update(make_recipe(tmp_path, tiny_lm_dir)).exit_code == ExitCode.NOTHING_TO_DO


# ---------------------------------------------------------------------------------------------
# weights that must never be served (issue 12)


def test_a_skipped_steps_documents_stay_unseen_and_non_finite_weights_are_never_published(
    tmp_path, tiny_lm_dir
):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    rare = tok("Bletchley")["input_ids"][-1]
    ta = build_ta_model(tiny_lm_dir)
    with torch.no_grad():
        ta.trunk.embed_tokens.weight[rare] = float("nan")  # φ's weights are NaN on rows holding this token
    save_ta_model(ta, tmp_path / "ta", tok)
    people = [("Ada Lovelace", "London"), ("Alan Turing", "Bletchley Park"), ("Grace Hopper", "Paris")]
    rows = [{"id": f"d{i}", "text": f"{p} lives in {place} ."} for i, (p, place) in enumerate(people)]
    write_jsonl(tmp_path / "data/a.jsonl", rows)
    ta_weights = ["weights.method=taalm", f"weights.ta_path={tmp_path / 'ta'}", "batching.batch_size=1"]
    res = update(make_recipe(tmp_path, tiny_lm_dir, *ta_weights, "max_nonfinite=5"))
    assert res.exit_code == ExitCode.OK and res.skipped_steps == 1 and res.documents_learned == 2
    version = current_version(tmp_path / "out")
    assert ledger_ids(version) == ["d0", "d2"]  # d1 waits
    assert [json.loads(line)["id"] for line in open(version / "documents.jsonl")] == ["d0", "d2"]

    # a NaN in the *target's* weights: every row with that token is skipped, and the weights stay NaN
    bad = tmp_path / "bad_lm"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[rare] = float("nan")
    model.save_pretrained(bad)
    tok.save_pretrained(bad)
    nan_recipe = _recipe_file(
        tmp_path / "nan", bad, tmp_path / "data", "batching.batch_size=1", "max_nonfinite=5"
    )
    res = run_cli(str(nan_recipe), [])
    assert res == ExitCode.DIVERGED and current_version(tmp_path / "nan" / "out") is None  # nothing served


def test_a_night_that_moved_the_weights_too_far_is_refused(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 1))
    path = _recipe_file(tmp_path, tiny_lm_dir, tmp_path / "data", "optim.lr=1e30", "optim.grad_clip=0")
    assert run_cli(str(path), []) == ExitCode.DIVERGED
    assert current_version(tmp_path / "out") is None and not list_versions(tmp_path / "out")
    logged = (tmp_path / "out" / "logs" / "update.log").read_text()
    assert "max_weight_change=2" in logged


def test_a_model_with_only_pickled_weights_is_refused_naming_the_field(tmp_path, tiny_lm_dir):
    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the old, pickled format
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 1))
    with pytest.raises(ConfigError, match="target.path: .* holds only pickled weights"):
        update(make_recipe(tmp_path, pickled))
    assert run_cli(str(_recipe_file(tmp_path / "cli", pickled, tmp_path / "data")), []) == ExitCode.BAD_INPUT


def _recipe_file(tmp: Path, lm: Path, data: Path, *overrides: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "r.yaml"
    path.write_text(to_yaml(make_recipe(tmp, lm, *overrides, data=data)))
    return path
