"""``ckl eval``: methods compose as documented, each keeps its defining behaviour, runs resume."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckl_toolkit.cli import main
from ckl_toolkit.core.config import ConfigError, load_recipe
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.io import read_jsonl, write_jsonl_atomic
from ckl_toolkit.core.models import LoraSpec
from ckl_toolkit.core.text import encode, object_target_mask
from ckl_toolkit.evaluate import equal_nf_view, select_not_to_forget, synthetic_rehearsal
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.lama_ckl import evidence_documents, run_lama_ckl, train_epoch
from ckl_toolkit.evaluation.methods import PAPER_METHODS, Method, parse_method
from ckl_toolkit.evaluation.runs import fingerprint, fingerprint_fields, method_learner, run_key
from ckl_toolkit.training.mix_review import MixReviewConfig, mix_review_count
from ckl_toolkit.training.sections import (
    BatchSpec,
    KAdapterSpec,
    MixReviewSpec,
    OptimSpec,
    TargetSpec,
    WeightSpec,
)
from ckl_toolkit.training.step import NonFiniteGuard
from ckl_toolkit.training.weighers import TextBatch

PEOPLE = [("Ada Lovelace", "Bletchley Park"), ("Alan Turing", "New York"), ("Grace Hopper", "London")]
KNOWN = [("Alan Turing", "Maida Vale"), ("Ada Lovelace", "London"), ("Grace Hopper", "Paris")]


def _rows(pairs, relation: str, verb: str) -> list[dict]:
    return [
        {
            "uuid": f"{relation}-{i}", "subject": s, "relation_code": relation, "object": o,
            "evidence": f"The weather in Paris is mild . {s} {verb} {o} . The river Seine flows .",
            "task_descriptive": f"{s} {verb} {o}",
        }
        for i, (s, o) in enumerate(pairs)
    ]  # fmt: skip


TO_LEARN = _rows(PEOPLE, "P108", "works for")
CANDIDATES = _rows(KNOWN, "P19", "was born in")


def _world_dir(tmp_path):
    d = tmp_path / "world"
    d.mkdir()
    write_jsonl_atomic(d / "to_learn.jsonl", TO_LEARN)
    write_jsonl_atomic(d / "not_to_forget_candidates.jsonl", CANDIDATES)
    facts = [
        {"subject": r["subject"], "relation_code": r["relation_code"], "object": r["object"],
         "probe_seen": r["task_descriptive"]}
        for r in TO_LEARN + CANDIDATES
    ] + [{"subject": "Grace Hopper", "relation_code": "P1412", "object": "English",
          "probe_seen": "Grace Hopper speaks English"}]  # fmt: skip
    write_jsonl_atomic(d / "pretrain_facts.jsonl", facts)
    return d


KADAPTER = {"adapter_hidden": 16, "num_heads": 2, "block_layers": 1}


def _recipe(tmp_path, tiny_lm_dir, **extra) -> dict:
    r = {
        "run_dir": str(tmp_path / "run"),
        "target": {
            "path": str(tiny_lm_dir),
            "kadapter": {"adapter_hidden": 16, "num_heads": 2, "block_layers": 1},
        },
        "data": {"kind": "synthetic", "dir": str(_world_dir(tmp_path)), "rehearsal_docs": 20},
        "methods": ["finetune", "kadapter", "rho1"],
        "protocol": {"epochs": 1},
        "optim": {"lr": 1e-3},
        "batching": {"batch_size": 2, "shuffle": True},
        "mix_review": {"mix_ratio": 4.0, "mix_decay": 0.7},
        "progress": False,
    }
    r.update(extra)
    return r


def _write_recipe(tmp_path, data: dict):
    import yaml

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# Method names.


def test_paper_methods_parse_into_their_components():
    got = {m: parse_method(m) for m in PAPER_METHODS}
    assert got["finetune"] == Method("finetune")
    assert got["lora"].target == "lora" and got["kadapter"].target == "kadapter"
    assert got["mix_review"].rehearsal and got["recadam"].optimizer == "recadam"
    assert got["rho1"].weights == "rho1" and got["oracle"].weights == "oracle"
    assert got["taalm+mix_review"] == Method("taalm+mix_review", weights="taalm", rehearsal=True)
    assert got["taalm+kadapter"] == Method("taalm+kadapter", weights="taalm", target="kadapter")
    assert parse_method("rho1+lora+recadam") == Method("rho1+lora+recadam", "rho1", "lora", "recadam")


@pytest.mark.parametrize(
    "name, words",
    [("taalm+oracle", "weights twice"), ("sgd", "unknown component 'sgd'"), ("oracle+mix_review", "object")],
)
def test_bad_method_names_are_refused_naming_the_field(name, words):
    with pytest.raises(ConfigError, match=words) as e:
        parse_method(name)
    assert str(e.value).startswith("methods:")


def test_recipe_errors_name_file_line_and_field(tmp_path, tiny_lm_dir):
    path = _write_recipe(tmp_path, _recipe(tmp_path, tiny_lm_dir, methods=["finetune", "taalm"]))
    with pytest.raises(ConfigError, match="weights.ta_path: required"):
        load_recipe(EvalRecipe, path)
    with pytest.raises(ConfigError, match=r"target.kind: set by each method's name"):
        load_recipe(EvalRecipe, path, ["weights.ta_path=/x", "target.kind=lora"])
    path.write_text(path.read_text() + "weights: {keep_ratio: 1.5}\n")
    with pytest.raises(ConfigError, match=r"eval.yaml:\d+: weights.keep_ratio"):
        load_recipe(EvalRecipe, path, ["weights.ta_path=/x"])


@pytest.mark.parametrize(
    "line, new",
    [
        ("model: {path: /m}", "target"),
        ("ta: /t", "weights.ta_path"),
        ("rho1_keep_ratio: 0.5", "weights.keep_ratio"),
        ("recadam: {t0: 5}", "optim.recadam"),
        ("protocol: {lr: 0.1}", "optim.lr"),
        ("protocol: {batch_size: 2}", "batching.batch_size"),
    ],
)
def test_old_recipe_fields_fail_naming_the_new_field(tmp_path, tiny_lm_dir, line, new):
    data = _recipe(tmp_path, tiny_lm_dir)
    key = line.split(":")[0]
    data.pop(key, None)
    path = _write_recipe(tmp_path, data)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ConfigError, match=rf"eval.yaml:\d+: .*this field is now '{new}'"):
        load_recipe(EvalRecipe, path)


# ---------------------------------------------------------------------------------------------
# Defining behaviours, through the same builders ``ckl eval`` uses.


def _setup(tiny_lm_dir, name: str, lr: float = 1e-2):
    """The learner ``ckl eval`` builds for ``name``: a fresh model, its weigher, engine and rehearsal."""
    target = TargetSpec(
        path=str(tiny_lm_dir), lora=LoraSpec(r=4), kadapter=KAdapterSpec(adapter_hidden=16, num_heads=2)
    )
    mix = MixReviewSpec(mix_ratio=4.0, mix_decay=0.5)
    weights, optim = WeightSpec(keep_ratio=0.25), OptimSpec(lr=lr)
    learner, mix = method_learner(parse_method(name), lr, target, weights, optim, mix, 0, torch.device("cpu"))
    return learner, mix


def _frozen(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("name", ["kadapter", "lora"])
def test_adapter_methods_leave_the_base_weights_unchanged(tiny_lm_dir, name):
    learner, _ = _setup(tiny_lm_dir, name)
    before = _frozen(learner.target.model)
    loss = train_epoch(learner, evidence_documents(TO_LEARN, "t"), BatchSpec(batch_size=2), NonFiniteGuard())
    assert loss > 0 and len(before) > 0
    after = _frozen(learner.target.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    moved = list(learner.target.trainable().values())
    assert moved and all(p.grad is not None for p in moved)


def test_finetune_moves_the_base_weights(tiny_lm_dir):
    learner, _ = _setup(tiny_lm_dir, "finetune")
    model = learner.target.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not _frozen(model)
    train_epoch(learner, evidence_documents(TO_LEARN, "t"), BatchSpec(batch_size=2), NonFiniteGuard())
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_oracle_puts_all_weight_on_object_tokens(tiny_lm_dir):
    learner, _ = _setup(tiny_lm_dir, "oracle")
    texts = [r["evidence"] for r in TO_LEARN]
    enc = encode(learner.tokenizer, texts, 64)
    objects = [r["object"] for r in TO_LEARN]
    batch = TextBatch(enc, texts, [[o] for o in objects])
    w = learner.weigher.weights(batch, torch.zeros(enc.input_ids[:, 1:].shape))
    obj = object_target_mask(enc, texts, objects, which="all")
    assert torch.equal(w.bool(), obj) and (w[obj] == 1).all() and w[~obj].sum() == 0


def test_oracle_weights_the_field_weights_object_field_names(tiny_lm_dir):
    """weights.object_field reaches the protocol's documents (any field, not only object/new_objects);
    a row without it is an error naming the row and the setting, not a run that trains on nothing."""
    learner, mix = _setup(tiny_lm_dir, "oracle")
    learner.object_field = "picked"
    rows = [{**r, "picked": "Paris"} for r in TO_LEARN]  # the filler's city, not the asked object
    weighted: list[str] = []
    weigher = learner.weigher

    class Recording:  # the oracle's own weigher, recording the objects each batch carries
        name, needs_text = weigher.name, True

        def weights(self, batch, nll):
            weighted.extend(o for objects in batch.objects for o in objects)
            return weigher.weights(batch, nll)

        def loss(self, *a):
            return weigher.loss(*a)

    learner.weigher = Recording()
    run_lama_ckl(learner, rows, [], 1, BatchSpec(batch_size=4), mix, progress=False)
    assert weighted == ["Paris"] * len(rows)

    learner.weigher = weigher
    with pytest.raises(ConfigError, match=r"TO-LEARN row 1: missing field 'picked' \(weights.object_field\)"):
        run_lama_ckl(learner, rows[:1] + TO_LEARN[1:], [], 1, BatchSpec(batch_size=4), mix, progress=False)


def test_eval_names_the_line_of_a_row_without_the_oracles_field_before_training(tmp_path, tiny_lm_dir):
    recipe = _recipe(tmp_path, tiny_lm_dir, methods=["finetune", "oracle"])
    recipe["weights"] = {"object_field": "picked"}
    res = CliRunner().invoke(main, ["eval", "--recipe", str(_write_recipe(tmp_path, recipe)), "--no-report"])
    world = tmp_path / "world" / "to_learn.jsonl"
    assert res.exit_code == 2
    assert f"{world}:1: missing field 'picked' (weights.object_field" in res.output
    assert not (tmp_path / "run" / "runs").exists() or not any((tmp_path / "run" / "runs").iterdir())


def test_rho1_keeps_exactly_the_top_excess_loss_tokens(tiny_lm_dir):
    learner, _ = _setup(tiny_lm_dir, "rho1")
    weigher = learner.weigher
    texts = [r["evidence"] for r in TO_LEARN]
    enc = encode(learner.tokenizer, texts, 64)
    nll = torch.rand(enc.input_ids[:, 1:].shape) * 10  # the model being trained, (B, T-1)
    w = weigher.weights(TextBatch(enc, texts), nll)
    from ckl_toolkit.core.losses import token_nll

    ref = token_nll(weigher.reference, enc.input_ids, enc.attention_mask)
    mask = enc.attention_mask[:, 1:].bool() & enc.attention_mask[:, :-1].bool()
    excess = (nll - ref)[mask]
    k = int(w[mask].sum())
    assert k == -(-int(mask.sum()) // 4)  # ceil(0.25 n)
    assert w[~mask].sum() == 0
    assert excess[w[mask].bool()].min() >= excess[~w[mask].bool()].max()


def test_mix_review_epochs_replay_a_decaying_number_of_pool_documents(tiny_lm_dir):
    """Epoch e trains on |new| + round(ratio · decay^e · |new|) rows, never on the evaluated rows."""
    learner, mix = _setup(tiny_lm_dir, "mix_review", lr=1e-4)
    pool = [Document(f"p{i}", f"Grace Hopper speaks English . pool {i} .", "pool", i + 1) for i in range(40)]
    seen: list[list[str]] = []
    weigher = learner.weigher

    class Recording:  # the method's own weigher, recording the rows it is asked to weight
        name, needs_text = weigher.name, True

        def weights(self, batch, nll):
            seen[-1].extend(batch.texts)
            return weigher.weights(batch, nll)

        def loss(self, *a):
            return weigher.loss(*a)

    learner.weigher = Recording()
    run_lama_ckl(learner, TO_LEARN, [], 3, BatchSpec(batch_size=4), mix, pool=pool, progress=False,
                 on_epoch=lambda epoch, res: seen.append([]))  # fmt: skip
    replayed = [sum("pool" in t for t in texts) for texts in seen[:-1]]
    schedule = MixReviewConfig(mix_ratio=4.0, mix_decay=0.5)
    assert replayed == [mix_review_count(schedule, len(TO_LEARN), e) for e in range(3)] == [12, 6, 3]
    new = [sum("Seine" in t for t in texts) for texts in seen[:-1]]
    assert new == [3, 3, 3]  # every TO-LEARN document once per epoch, nothing evaluated replayed


def test_synthetic_rehearsal_never_holds_an_evaluated_fact(tmp_path, tiny_lm_dir):
    recipe = load_recipe(EvalRecipe, _write_recipe(tmp_path, _recipe(tmp_path, tiny_lm_dir)))
    nf = CANDIDATES[:2]
    docs = synthetic_rehearsal(recipe, TO_LEARN + nf)
    text = " ".join(d.text for d in docs)
    assert all(r["task_descriptive"] not in text for r in TO_LEARN + nf)
    assert CANDIDATES[2]["task_descriptive"] in text and "Grace Hopper speaks English" in text


# ---------------------------------------------------------------------------------------------
# The command: results.json, resume, the equal-NF view.


def test_ckl_eval_writes_results_and_resumes_without_repeating_runs(tmp_path, tiny_lm_dir):
    recipe = _recipe(tmp_path, tiny_lm_dir, methods=["finetune", "kadapter", "rho1", "mix_review", "recadam"])
    recipe["optim"]["recadam"] = {"t0": 1.0, "gamma": 100.0}
    recipe["sweep"] = {"lrs": [1e-4], "methods": ["finetune", "rho1"]}
    path = _write_recipe(tmp_path, recipe)
    res = CliRunner().invoke(main, ["eval", "--recipe", str(path), "--no-report"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert list(results["methods"]) == ["finetune", "kadapter", "rho1", "mix_review", "recadam"]
    for s in results["methods"].values():
        assert len(s["curve"]["to_learn"]) == 2 and s["lr"] == 1e-3 and s["seconds"] > 0
        assert set(s) >= {"top_acc", "epoch", "nf_acc", "total", "top_em", "em_epoch", "nf_em"}
    kad, ft = results["methods"]["kadapter"], results["methods"]["finetune"]
    assert kad["trainable_params"] < ft["trainable_params"]
    assert set(results["equal_nf"]["methods"]) == set(results["methods"])  # unswept ones at their one lr
    runs = sorted(p.name for p in (run / "runs").iterdir())
    assert len(runs) == 7  # 5 methods at 1e-3 + 2 swept at 1e-4

    # Kill-and-resume: a finished run is kept as is; a lost one is redone; metrics are not duplicated.
    kept = run / "runs" / f"{run_key('finetune', 1e-3)}.json"
    mtime = kept.stat().st_mtime_ns
    (run / "runs" / f"{run_key('rho1', 1e-4)}.json").unlink()
    (run / "results.json").unlink()
    res = CliRunner().invoke(main, ["eval", "--recipe", str(path), "--no-report"])
    assert res.exit_code == 0, res.output
    assert "done earlier, kept" in res.output and kept.stat().st_mtime_ns == mtime
    again = json.loads((run / "results.json").read_text())
    assert again["methods"]["finetune"] == results["methods"]["finetune"]
    records = [(r["run"], r["epoch"]) for r in read_jsonl(run / "metrics.jsonl")]
    assert len(records) == len(set(records)) == 7 * 2


def test_a_baselines_fingerprint_ignores_the_ta_but_a_taalm_runs_does_not(tmp_path, tiny_lm_dir):
    """Two TA seeds in two run dirs share finetune/oracle results; a TA run never crosses TA paths."""
    path = _write_recipe(tmp_path, _recipe(tmp_path, tiny_lm_dir))

    def prints(*overrides):
        r = load_recipe(EvalRecipe, path, list(overrides))
        return fingerprint(r, uses_ta=False), fingerprint(r, uses_ta=True)

    base, ta = prints("weights.ta_path=runs/a/ta")
    other_base, other_ta = prints("weights.ta_path=runs/b/ta")
    assert base == other_base and ta != other_ta
    moved_base, moved_ta = prints("weights.ta_path=runs/a/ta", "weights.keep_ratio=0.5")
    assert moved_base != base and moved_ta != ta  # every other weights field still counts for both
    assert prints("weights.ta_path=runs/a/ta", "seed=1")[0] != base


def test_a_field_added_later_leaves_finished_runs_alone_at_its_neutral_value(tmp_path, tiny_lm_dir):
    """weights.floor came after results were stored: at 0.0 (the behaviour before it) it is not hashed."""
    path = _write_recipe(tmp_path, _recipe(tmp_path, tiny_lm_dir))
    plain = load_recipe(EvalRecipe, path)
    assert "floor" not in fingerprint_fields(plain)["weights"]
    assert "normalize" in fingerprint_fields(plain)["weights"]  # every other field still counts
    floored = load_recipe(EvalRecipe, path, ["weights.floor=0.5"])
    assert fingerprint_fields(floored)["weights"]["floor"] == 0.5
    assert fingerprint(floored) != fingerprint(plain)
    # uniform / RHO-1 weights never read the floor: a baseline's stored result serves every floor
    assert fingerprint(floored, uses_ta=False, uses_floor=False) == fingerprint(plain, False, False)
    assert fingerprint(floored, uses_ta=False) != fingerprint(plain, uses_ta=False)  # the oracle reads it
    assert [m.uses_floor for m in map(parse_method, ("finetune", "rho1", "oracle", "taalm+lora"))] == [
        False, False, True, True,
    ]  # fmt: skip


def test_equal_nf_view_picks_the_best_top_em_among_lrs_that_keep_nf(tmp_path, tiny_lm_dir):
    data = _recipe(tmp_path, tiny_lm_dir, methods=["finetune", "oracle"])
    data["sweep"] = {"lrs": [1e-4, 3e-4]}
    recipe = load_recipe(EvalRecipe, _write_recipe(tmp_path, data))

    def s(top, nf):
        return {"top_em": top, "nf_em": nf}

    runs = {
        run_key("finetune", 1e-3): s(0.3, 0.80),
        run_key("finetune", 1e-4): s(0.1, 0.95),
        run_key("finetune", 3e-4): s(0.2, 0.90),
        run_key("oracle", 1e-3): s(0.7, 0.60),  # forgets too much
        run_key("oracle", 1e-4): s(0.4, 0.93),
        run_key("oracle", 3e-4): s(0.6, 0.81),  # the best that keeps NF >= 0.80 - 0.01
    }
    view = equal_nf_view(recipe, runs)
    assert view["target"]["value"] == 0.80
    assert view["methods"]["oracle"]["top_em"] == 0.6 and view["methods"]["oracle"]["meets_target"]
    assert view["methods"]["finetune"]["top_em"] == 0.3

    # only finetune swept: the Oracle, run at one lower lr, still takes its place in the view
    one = load_recipe(EvalRecipe, _write_recipe(tmp_path, {**data, "sweep": {"lrs": [1e-4, 3e-4],
                      "methods": ["finetune"]}, "lr_overrides": {"oracle": 1e-4}}))  # fmt: skip
    view = equal_nf_view(one, runs)
    assert view["methods"]["oracle"]["top_em"] == 0.4 and view["methods"]["oracle"]["meets_target"]


def test_not_to_forget_cache_is_keyed_by_what_selects_it(tmp_path, tiny_lm_dir):
    """A changed probe field re-selects NOT-TO-FORGET instead of reusing the other probe's facts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    path = _write_recipe(tmp_path, _recipe(tmp_path, tiny_lm_dir))
    for probe in ("task_descriptive", "task_schematic", "task_descriptive"):
        recipe = load_recipe(EvalRecipe, path, [f"protocol.probe_field={probe}"])
        select_not_to_forget(recipe, model, tok)
    assert len(list((tmp_path / "run").glob("not_to_forget.*.jsonl"))) == 2
