"""TemporalWiki: period files, object-last probes, the labelled substitute stream, the stage matrix,
forgetting, learning on a tiny model, resume, and the oracle refused on user documents."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckl_toolkit.core.config import ConfigError, load_recipe
from ckl_toolkit.core.io import write_jsonl_atomic
from ckl_toolkit.core.losses import target_mask, token_nll
from ckl_toolkit.core.text import encode
from ckl_toolkit.evaluate import run_temporalwiki
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.methods import parse_method
from ckl_toolkit.evaluation.probes import score_probes
from ckl_toolkit.evaluation.temporalwiki import (
    accuracy_matrix,
    forgetting,
    load_data,
    load_probe_sets,
    load_templates,
    read_triples,
    render_probe,
    score_probe_set,
)

PERIODS = ["0901-1001", "1001-1101"]
CHANGED = {
    "0901-1001": [
        ("Ada Lovelace", "employer", "Bletchley Park"),
        ("Alan Turing", "place of birth", "London"),
        ("Grace Hopper", "country of citizenship", "Paris"),
        ("Maida Vale", "employer", "New York"),
    ],
    "1001-1101": [
        ("Grace Hopper", "employer", "Babbage Engines"),
        ("Ada Lovelace", "place of birth", "Paris"),
        ("Alan Turing", "country of citizenship", "New York"),
        ("Paris", "employer", "London"),
    ],
}
UNCHANGED = {
    "0901-1001": [
        ("Alan Turing", "employer", "Babbage Engines"),
        ("Grace Hopper", "place of birth", "New York"),
    ],
    "1001-1101": [("Ada Lovelace", "employer", "London"), ("Maida Vale", "place of birth", "Paris")],
}
OLDER = [
    ("Grace Hopper", "employer", "London"),
    ("Alan Turing", "employer", "Babbage Engines"),
]  # 2nd: evaluated
TEMPLATES = [
    {"relation": "P19", "label": "place of birth", "template": "[X] was born in [Y] ."},
    {
        "relation": "P27",
        "label": "country of citizenship",
        "template": "[X] is [Y] citizen .",
    },  # [Y] not last
]


def _triples(rows):
    return [{"subject": s, "relation": r, "object": o} for s, r, o in rows]


def _data_dir(tmp_path):
    d = tmp_path / "tw"
    d.mkdir(parents=True)
    for p in PERIODS:
        write_jsonl_atomic(d / f"{p}_changed.jsonl", _triples(CHANGED[p]))
        write_jsonl_atomic(d / f"{p}_unchanged.jsonl", _triples(UNCHANGED[p]))
    lines = ["subject,relation,object"] + [",".join(t) for t in OLDER]
    (d / "0801-0901_changed.csv").write_text("\n".join(lines) + "\n")
    write_jsonl_atomic(tmp_path / "relations.jsonl", TEMPLATES)
    return d


def _recipe(tmp_path, model_dir, **extra) -> EvalRecipe:
    data = {
        "run_dir": str(tmp_path / "run"),
        "benchmark": "temporalwiki",
        "target": {"path": str(model_dir)},
        "data": {"kind": "temporalwiki", "dir": str(_data_dir(tmp_path))},
        "temporalwiki": {"periods": PERIODS, "templates": str(tmp_path / "relations.jsonl")},
        "methods": ["finetune"],
        "protocol": {"epochs": 1, "eval_batch_size": 4},
        "optim": {"lr": 1e-3},
        "batching": {"batch_size": 2, "shuffle": True},
        "mix_review": {"mix_ratio": 4.0, "mix_decay": 0.7, "per": "period"},
        "progress": False,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(EvalRecipe, path)


# ---------------------------------------------------------------------------------------------
# Data and rendering.


def test_loader_reads_the_fixture_periods_and_every_probe_ends_with_its_object(tmp_path, tiny_lm_dir):
    recipe = _recipe(tmp_path, tiny_lm_dir)
    templates = load_templates(tmp_path / "relations.jsonl")
    assert templates == {"place of birth": "[X] was born in [Y]"}  # '[X] is [Y] citizen .' left out
    sets = load_probe_sets(recipe, templates)
    assert list(sets) == [
        "0901-1001/changed",
        "0901-1001/unchanged",
        "1001-1101/changed",
        "1001-1101/unchanged",
    ]
    assert [len(v) for v in sets.values()] == [4, 2, 4, 2]
    for rows in sets.values():
        for r in rows:
            assert r["probe"].endswith(r["object"]) and r["probe"].rfind(r["object"]) > len(r["subject"]) - 1
    probes = [r["probe"] for r in sets["0901-1001/changed"]]
    assert probes[1] == "Alan Turing was born in London"  # LAMA template, cut at the object
    assert probes[2] == "Grace Hopper country of citizenship Paris"  # fallback: TemporalWiki's rendering
    assert render_probe({"subject": "S", "relation": "employer", "object": "O"}, {}) == "S employer O"
    limited = load_probe_sets(_recipe(tmp_path / "b", tiny_lm_dir, temporalwiki={"probe_limit": 3}), {})
    assert [len(v) for v in limited.values()] == [3, 2, 3, 2]


def test_read_triples_reads_csv_and_names_file_and_line_on_a_bad_row(tmp_path):
    d = _data_dir(tmp_path)
    assert read_triples(d / "0801-0901_changed.csv") == _triples(OLDER)
    (d / "bad.csv").write_text("subject,relation,object\nA,b,c\nX,employer,\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:3: field 'object'"):
        read_triples(d / "bad.csv")


def test_substitute_stream_is_labelled_not_verbatim_and_pools_hold_only_older_data(tmp_path, tiny_lm_dir):
    recipe = _recipe(tmp_path, tiny_lm_dir, temporalwiki={"train_limit": 3})
    data = load_data(recipe, [parse_method("finetune"), parse_method("mix_review")])
    assert data.stream_label.startswith("substitute:") and "fact gain" in data.stream_label
    assert [len(d) for d in data.stream] == [3, 3]
    changed = data.probe_sets["0901-1001/changed"]
    for doc, probe in zip(data.stream[0], changed):
        assert doc.meta["object"] == probe["object"]
        assert doc.text == "The {relation} of {subject} is {object}.".format(
            **probe
        )  # as the headline recipe
    # period 1 rehearses the older triples minus the one evaluated as an unchanged probe;
    # period 2 adds period 1's documents; no pool holds an unchanged probe's triple
    assert [d.text for d in data.pools[0]] == ["The employer of Grace Hopper is London."]
    assert len(data.pools[1]) == 1 + 3
    assert {d.id for d in data.stream[0]} <= {d.id for d in data.pools[1]}
    assert "1 evaluated unchanged" in data.pool_label


def test_score_probe_set_agrees_with_score_probes_and_ppl_is_whole_probe(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    probes = [
        "Ada Lovelace was born in London",
        "Alan Turing employer Bletchley Park",
        "Grace Hopper employer Paris",
    ]
    objects = ["London", "Bletchley Park", "Paris"]
    cell = score_probe_set(model, tok, probes, objects, batch_size=2)
    ref = score_probes(model, tok, probes, objects, batch_size=3)
    assert cell["n"] == 3
    assert cell["acc"] == pytest.approx(ref.acc) and cell["em"] == pytest.approx(ref.em)
    assert cell["nll"] == pytest.approx(ref.nll, rel=1e-5)
    enc = encode(tok, probes, 64)
    with torch.no_grad():
        nll = token_nll(model, enc.input_ids, enc.attention_mask)  # (B, T-1)
    mask = target_mask(enc.attention_mask)
    assert cell["ppl"] == pytest.approx(math.exp(float(nll[mask].mean())), rel=1e-5)
    assert cell["ppl"] != pytest.approx(math.exp(cell["nll"]))  # whole probe, not only the object


# ---------------------------------------------------------------------------------------------
# The stage matrix and forgetting.


def _after(accs: list[list[float]], sets: list[str]) -> list[dict]:
    stages = ["base", *PERIODS][: len(accs)]
    return [
        {"stage": s, "probes": {p: {"nll": 1.0, "acc": a, "em": 0.0, "n": 1} for p, a in zip(sets, row)}}
        for s, row in zip(stages, accs)
    ]


def test_forgetting_is_the_best_earlier_accuracy_minus_the_final_one():
    sets = ["a/changed", "a/unchanged", "b/changed"]
    accs = [[0.2, 0.9, 0.1], [0.8, 0.7, 0.1], [0.5, 0.8, 0.6]]
    after = _after(accs, sets)
    assert accuracy_matrix(after, sets) == accs
    got = forgetting(after, sets)
    assert got == pytest.approx({"a/changed": 0.3, "a/unchanged": 0.1, "b/changed": -0.5})  # sign kept
    assert forgetting(after[:1], sets) == {p: 0.0 for p in sets}


# ---------------------------------------------------------------------------------------------
# End to end on a tiny model.


def test_finetune_learns_the_trained_period_and_a_rerun_resumes(tmp_path, tiny_lm_dir):
    methods = ["finetune", "oracle", "mix_review"]
    recipe = _recipe(tmp_path, tiny_lm_dir, methods=methods, optim={"lr": 2e-2})
    res = run_temporalwiki(recipe)
    sets = res["probe_sets"]
    assert res["benchmark"] == "temporalwiki" and res["periods"] == PERIODS and len(sets) == 4
    assert res["stream"].startswith("substitute:") and "probe_rendering" in res
    for name in methods:
        m = res["methods"][name]
        assert [row["stage"] for row in m["after"]] == ["base", *PERIODS]  # one row per stage
        assert all(list(row["probes"]) == sets for row in m["after"])  # one column per probe set
        assert set(m["after"][0]["probes"]["0901-1001/changed"]) >= {"nll", "ppl", "acc", "em", "n"}
        assert len(m["acc_matrix"]) == 3 and all(len(r) == 4 for r in m["acc_matrix"])
        assert m["forgetting"] == pytest.approx(forgetting(m["after"], sets))
    ft = res["methods"]["finetune"]["after"]
    base, learned = ft[0]["probes"]["0901-1001/changed"]["nll"], ft[1]["probes"]["0901-1001/changed"]["nll"]
    assert learned < base - 0.5, (base, learned)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 * len(methods)

    runs = {m: tmp_path / "run" / "runs" / f"{m}@0.02.json" for m in methods}
    mtimes = {m: p.stat().st_mtime_ns for m, p in runs.items()}
    (tmp_path / "run" / "results.json").unlink()
    again = run_temporalwiki(recipe)
    assert {m: p.stat().st_mtime_ns for m, p in runs.items()} == mtimes  # nothing retrained
    assert again["methods"]["finetune"]["after"] == res["methods"]["finetune"]["after"]
    assert (tmp_path / "run" / "results.json").exists()


def test_oracle_on_user_documents_without_objects_is_refused_naming_methods(tmp_path, tiny_lm_dir):
    docs = []
    for p in PERIODS:
        path = tmp_path / f"diff_{p}.jsonl"
        write_jsonl_atomic(path, [{"id": f"{p}-0", "text": "Ada Lovelace now works for Bletchley Park."}])
        docs.append(str(path))
    recipe = _recipe(tmp_path, tiny_lm_dir, methods=["finetune", "oracle"], temporalwiki={"documents": docs})
    with pytest.raises(ConfigError, match=r"^methods: 'oracle'"):
        run_temporalwiki(recipe)
    data = load_data(_recipe(tmp_path / "b", tiny_lm_dir, temporalwiki={"documents": docs}), [])
    assert data.stream_label.startswith("user documents:") and data.stream[0][0].text.startswith("Ada")


def test_recipe_checks_and_the_shipped_recipe_loads(tmp_path, tiny_lm_dir):
    with pytest.raises(ConfigError, match=r"temporalwiki\.documents"):
        _recipe(tmp_path, tiny_lm_dir, temporalwiki={"documents": ["only_one.jsonl"]})
    r = load_recipe(EvalRecipe, "recipes/temporalwiki_eval.yaml")
    assert r.benchmark == "temporalwiki" and r.data.kind == "temporalwiki" and r.protocol.epochs == 1
    assert r.optim.lr == 1e-4 and "taalm+mix_review" in r.methods


def test_nights_report_fact_gain_retention_and_the_lr_x_epochs_front(tmp_path, tiny_lm_dir):
    from ckl_toolkit.evaluation.report import write_report

    known = [
        {"object": o, "task_descriptive": f"{s} was born in {o}"} for s, _, o in CHANGED["0901-1001"][:3]
    ]
    write_jsonl_atomic(
        tmp_path / "keep.jsonl", known + [{"object": "x", "task_descriptive": "no object here"}]
    )
    sweep = {"lrs": [2e-2], "epochs": [2]}
    recipe = _recipe(
        tmp_path, tiny_lm_dir, sweep=sweep, temporalwiki={"retention": str(tmp_path / "keep.jsonl")}
    )
    res = run_temporalwiki(recipe)
    assert sorted(res["nights"]) == [
        "finetune@0.001",
        "finetune@0.001,2ep",
        "finetune@0.02",
        "finetune@0.02,2ep",
    ]
    night = res["nights"]["finetune@0.02,2ep"][-1]  # the last period's night of one run
    assert night["period"] == PERIODS[-1] and set(night["fact_gain"]) == {"verbatim", "reworded"}
    gain = night["fact_gain"]["reworded"]
    assert gain["nats"] == pytest.approx(gain["raw_nats"] - gain["control_nats"])
    assert night["retention"]["known"] <= 3  # a fact whose object is not in its probe is not a retention fact
    assert "tradeoff" not in res  # the random tiny model knows none of the retention facts: no point to plot
    written = write_report(tmp_path / "run")
    names = {p.name for p in written}
    assert "report.md" in names and "tradeoff.png" not in names
    text = (tmp_path / "run" / "report.md").read_text()
    assert "fact gain against a control" in text and "raw drop / control" in text


def test_the_tradeoff_keeps_every_scored_run_and_each_methods_front():
    from ckl_toolkit.evaluate import tradeoff
    from ckl_toolkit.evaluation.methods import parse_method

    def run(gain: float, kept: float) -> dict:
        night = {
            "fact_gain": {"reworded": {"nats": gain, "em": 0.0, "raw_nats": gain + 1}},
            "retention": {"share": kept},
        }
        return {"after": [{"stage": "base"}, {"stage": "p", "night": night}]}

    ft, ta = parse_method("finetune"), parse_method("oracle")
    plan = [(ft, 1e-4, None, "f1"), (ft, 1e-3, None, "f2"), (ft, 1e-3, 3, "f3"), (ta, 1e-4, None, "o1")]
    runs = {"f1": run(0.1, 0.99), "f2": run(0.4, 0.95), "f3": run(0.3, 0.90), "o1": run(float("nan"), 0.99)}

    class R:  # the recipe fields tradeoff() reads
        protocol = type("P", (), {"epochs": 1})

    view = tradeoff(R(), runs, plan)
    assert [p["run"] for p in view["finetune"]["points"]] == ["f1", "f2", "f3"]
    assert [p["run"] for p in view["finetune"]["front"]] == ["f2", "f1"]  # f3 is beaten by f2 on both
    assert view["finetune"]["points"][2]["epochs"] == 3 and "oracle" not in view  # NaN gain: no point


def test_sweep_points_add_chosen_lr_x_epochs_runs_beside_the_grid(tmp_path, tiny_lm_dir):
    from ckl_toolkit.evaluate import temporalwiki_plan
    from ckl_toolkit.evaluation.methods import parse_method

    recipe = _recipe(
        tmp_path,
        tiny_lm_dir,
        methods=["finetune", "oracle"],
        sweep={"lrs": [2e-3], "points": ["5e-4x3", "2e-3x1", "1e-3X2"], "methods": ["oracle"]},
    )
    keys = [k for *_, k in temporalwiki_plan(recipe, [parse_method(m) for m in recipe.methods])]
    # finetune is not swept; the oracle's grid (2 lrs x 1 epoch) then the points not already in it
    assert keys == ["finetune@0.001", "oracle@0.001", "oracle@0.002", "oracle@0.0005,3ep", "oracle@0.001,2ep"]
    for bad in ("5e-4", "5e-4x0", "fastx3", "-1e-3x2"):
        with pytest.raises(ConfigError, match=rf"sweep\.points: '{re.escape(bad)}' is not 'LRxEPOCHS'"):
            _recipe(tmp_path / bad, tiny_lm_dir, sweep={"points": [bad]})
