"""Fact gain against a relation-matched control, retention of known facts, and the trade-off front."""

from __future__ import annotations

import math

import pytest
import torch

from ckl_toolkit.core.documents import Document
from ckl_toolkit.evaluation.fact_gain import (
    Night,
    ProbeResults,
    control_set,
    fact_gain,
    night_gains,
    pareto_front,
    render,
    retention,
    score_night,
)
from ckl_toolkit.evaluation.lama_ckl import train_epoch
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.sections import BatchSpec, OptimSpec, TargetSpec, WeightSpec
from ckl_toolkit.training.step import NonFiniteGuard


def t(s: str, r: str, o: str) -> dict:
    return {"subject": s, "relation": r, "object": o}


def test_fact_gain_subtracts_the_control_of_the_same_relation():
    facts = [t("A", "r1", "x"), t("B", "r1", "y"), t("C", "r2", "z"), t("D", "r3", "w")]  # r3: no control
    controls = [t("E", "r1", "u"), t("F", "r1", "v"), t("G", "r2", "q")]
    before = ProbeResults([5.0, 5.0, 4.0, 6.0], [False, False, False, False])
    after = ProbeResults([2.0, 3.0, 3.5, 1.0], [True, False, False, True])
    c_before = ProbeResults([5.0, 4.0, 3.0], [False, False, False])
    c_after = ProbeResults([4.0, 3.0, 3.0], [False, True, False])  # r1 improves by 1, r2 by 0
    g = fact_gain(facts, before, after, controls, c_before, c_after)
    # facts with a control: A (Δ3, ctl 1), B (Δ2, ctl 1), C (Δ0.5, ctl 0); D has none
    assert g.matched == 3 and g.facts == 4
    assert g.nats == pytest.approx((2 + 1 + 0.5) / 3) and g.raw_nats == pytest.approx(5.5 / 3)
    assert g.control_nats == pytest.approx(2 / 3)
    assert g.em == pytest.approx(((1 - 0.5) + (0 - 0.5) + 0) / 3)  # r1's control EM rose by 0.5


def test_a_fact_whose_object_is_not_found_counts_for_neither_side():
    facts, controls = [t("A", "r", "x"), t("B", "r", "y")], [t("C", "r", "z"), t("D", "r", "w")]
    nan = math.nan
    g = fact_gain(
        facts,
        ProbeResults([4.0, nan], [0, 0]),
        ProbeResults([1.0, nan], [0, 0]),
        controls,
        ProbeResults([3.0, nan], [0, 0]),
        ProbeResults([2.0, 1.0], [0, 0]),
    )
    assert g.matched == 1 and g.nats == pytest.approx(3.0 - 1.0)


def test_retention_counts_only_the_facts_known_before():
    r = retention([True, True, False, True, False], [True, False, True, True, False])
    assert (r.known, r.kept, r.share) == (3, 2, pytest.approx(2 / 3))  # the newly right fact is not "kept"
    assert math.isnan(retention([False], [True]).share)


def test_controls_share_the_nights_relations_but_none_of_its_facts():
    facts = [t("A", "r1", "x"), t("B", "r2", "y")]
    candidates = [
        t("A", "r1", "old"),
        t("C", "r1", "u"),
        t("D", "r1", "v"),
        t("E", "r1", "w"),
        t("F", "r9", "z"),
    ]
    assert control_set(facts, candidates, per_relation=2) == [t("C", "r1", "u"), t("D", "r1", "v")]


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    pts = [{"k": 0.9, "g": 0.1}, {"k": 0.8, "g": 0.5}, {"k": 0.7, "g": 0.4}, {"k": 0.95, "g": 0.05}]
    assert pareto_front(pts, "k", "g") == [pts[1], pts[0], pts[3]]


# ---------------------------------------------------------------------------------------------
# The measure cannot be fooled by format: a night that only learned how triples read gains nothing.

PHRASINGS = {
    "verbatim": "{subject} {relation} {object}",
    "reworded": "The {relation} of {subject} is {object}",
}
PEOPLE = [
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Maida Vale",
    "New York",
    "London",
    "Paris",
    "Bletchley",
]
RELATIONS = ["works for", "lives in"]


def _facts(people: list[str], shift: int) -> list[dict]:
    return [t(p, RELATIONS[i % 2], PEOPLE[(i + shift) % len(PEOPLE)]) for i, p in enumerate(people)]


def _train_night(tiny_lm_dir, night: Night, stream: list[dict]):
    """A fresh tiny model trained on ``stream`` (6 epochs): (model, tokenizer, scores before)."""
    target, optim = TargetSpec(path=str(tiny_lm_dir)), OptimSpec(lr=1e-2)
    learner = build_learner(target, WeightSpec(), optim, None, 0, torch.device("cpu"))
    docs = [
        Document(str(i), "{subject} {relation} {object}.".format(**x), "s", i + 1)
        for i, x in enumerate(stream)
    ]
    model, tok = learner.target.model, learner.tokenizer
    before = score_night(model, tok, night, 16)
    guard = NonFiniteGuard()
    for _ in range(6):
        train_epoch(learner, docs, BatchSpec(batch_size=4, shuffle=False), guard)
    return model, tok, before


def _night_gain(tiny_lm_dir, night: Night, stream: list[dict]) -> dict:
    """Train a fresh tiny model on ``stream`` (6 epochs); the night's reworded fact gain."""
    model, tok, before = _train_night(tiny_lm_dir, night, stream)
    return night_gains(night, before, score_night(model, tok, night, 16))["reworded"]


def test_a_night_that_learned_only_the_format_has_no_fact_gain(tiny_lm_dir):
    night = Night(
        "n", _facts(PEOPLE[:4], 3), _facts(PEOPLE[4:], 5), PHRASINGS
    )  # facts and controls: never trained
    format_only = _facts(PEOPLE, 1) + _facts(PEOPLE, 2)  # same relations, other facts
    gain = _night_gain(tiny_lm_dir, night, format_only)
    assert gain["raw_nats"] > 0.5  # the raw drop says "learned"...
    assert abs(gain["nats"]) < 0.35 * gain["raw_nats"]  # ...the control says it learned no night fact


def test_a_night_that_learned_its_facts_has_a_fact_gain(tiny_lm_dir):
    night = Night("n", _facts(PEOPLE[:4], 3), _facts(PEOPLE[4:], 5), PHRASINGS)
    gain = _night_gain(tiny_lm_dir, night, night.facts * 4)
    assert gain["nats"] > 0.5 and gain["nats"] > 0.5 * gain["raw_nats"]
    assert (
        render(night.facts[0], PHRASINGS["reworded"])
        == f"The works for of Ada Lovelace is {night.facts[0]['object']}"
    )


def test_ckl_fact_gain_scores_a_saved_night_against_its_base(tmp_path, tiny_lm_dir):
    """The command a nightly operator runs after `ckl update`: the same figures as the library."""
    import json

    from click.testing import CliRunner

    from ckl_toolkit.cli import main
    from ckl_toolkit.core.io import write_jsonl_atomic

    facts, controls = _facts(PEOPLE[:4], 3), _facts(PEOPLE[4:], 5)
    write_jsonl_atomic(tmp_path / "facts.jsonl", facts)
    write_jsonl_atomic(tmp_path / "controls.jsonl", controls + facts[:1])  # a night fact is never a control
    night = Night("n", facts, controls, PHRASINGS)
    model, tok, before = _train_night(tiny_lm_dir, night, facts * 4)
    expected = night_gains(night, before, score_night(model, tok, night, 16))
    model.save_pretrained(tmp_path / "after")
    tok.save_pretrained(tmp_path / "after")
    keep = [{"object": f["object"], "task_descriptive": f"{f['subject']} {f['relation']} {f['object']}"}
            for f in controls]  # fmt: skip
    write_jsonl_atomic(tmp_path / "keep.jsonl", keep)

    args = ["fact-gain", "--model", str(tiny_lm_dir), "--model", str(tmp_path / "after"), "--model",
            str(tiny_lm_dir), "--facts", str(tmp_path / "facts.jsonl"), "--controls",
            str(tmp_path / "controls.jsonl"), "--control-per-relation", "10", "--retention",
            str(tmp_path / "keep.jsonl"), "--stream-template", PHRASINGS["verbatim"] + ".",
            "--reworded-template", PHRASINGS["reworded"], "--out", str(tmp_path / "gain.json")]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "gain.json").read_text())
    assert out["facts"] == 4 and out["controls"] == 4
    trained, same = out["models"][str(tmp_path / "after")], out["models"][str(tiny_lm_dir)]
    for phrasing in PHRASINGS:
        assert trained["fact_gain"][phrasing]["nats"] == pytest.approx(expected[phrasing]["nats"], abs=1e-4)
    assert trained["fact_gain"]["reworded"]["nats"] > 0.5
    assert same["fact_gain"]["reworded"]["nats"] == 0.0  # the base against itself learned nothing
    assert "fact gain, reworded" in res.output

    missing = CliRunner().invoke(main, args[:7] + ["--facts", str(tmp_path / "nope.jsonl")] + args[9:])
    assert missing.exit_code == 2 and "--facts" in missing.output and "nope.jsonl" in missing.output
