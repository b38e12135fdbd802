"""The synthetic world: deterministic, well-formed, and honest about what pretraining saw."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from ckl_toolkit.core.io import read_jsonl
from ckl_toolkit.data.world import RELATIONS, WorldConfig, build_world, write_world

LAMA_CKL_FIELDS = {
    "uuid", "subject", "relation_code", "relation_label", "object", "evidence",
    "task_descriptive", "task_schematic", "invariant",
}  # fmt: skip
FILES = (
    "pretrain.jsonl", "to_learn.jsonl", "not_to_forget_candidates.jsonl", "meta_train.jsonl",
    "meta_val.jsonl", "pretrain_facts.jsonl", "world.json",
)  # fmt: skip
TEMPLATES = {r.code: r.templates for r in RELATIONS}


def small(**kw) -> WorldConfig:
    base = dict(n_entities=40, to_learn=10, meta_pairs=30, meta_val_pairs=6, nf_candidates=30)
    return WorldConfig(**{**base, "filler_sentences": 4, "pretrain_passes": 2, **kw})


@pytest.fixture(scope="module")
def world():
    return build_world(small(seed=3))


def template_index(code: str, subject: str, obj: str, text: str) -> list[int]:
    """Which templates of relation ``code`` render (subject, obj) somewhere in ``text``."""
    return [i for i, t in enumerate(TEMPLATES[code]) if t.format(s=subject, o=obj) in text]


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_world(build_world(small(seed=seed)), tmp_path / name)
    a, b, c = (tmp_path / n for n in "abc")
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in ("to_learn.jsonl", "pretrain.jsonl", "meta_train.jsonl"):
        assert (a / f).read_bytes() != (c / f).read_bytes(), f


def test_evidence_settings_leave_the_pretraining_corpus_unchanged():
    a = build_world(small(seed=2))
    b = build_world(small(seed=2, filler_sentences=7, known_restatements=3, to_learn=12, meta_pairs=5))
    assert a.pretrain == b.pretrain and a.facts == b.facts
    assert a.to_learn != b.to_learn


def test_files_use_the_lama_ckl_field_names(tmp_path, world):
    write_world(world, tmp_path)
    for name in ("to_learn.jsonl", "not_to_forget_candidates.jsonl"):
        rows = read_jsonl(tmp_path / name)
        assert rows and all(set(r) == LAMA_CKL_FIELDS for r in rows), name
    for r in read_jsonl(tmp_path / "to_learn.jsonl"):
        assert r["invariant"] is False
        expected = f"Guess the object. \n  subject is {r['subject']} , relation is {r['relation_label']} , "
        assert r["task_schematic"] == expected + f"object is {r['object']}"
    assert all(r["invariant"] is True for r in read_jsonl(tmp_path / "not_to_forget_candidates.jsonl"))
    for name in ("meta_train.jsonl", "meta_val.jsonl"):
        assert all(
            set(r) == {"text", "task", "object", "subject", "relation"} for r in read_jsonl(tmp_path / name)
        )
    counts = read_jsonl(tmp_path / "to_learn.jsonl"), read_jsonl(tmp_path / "meta_train.jsonl")
    assert [len(c) for c in counts] == [10, 30]


def test_object_is_in_the_evidence_and_last_in_the_probe(world):
    pairs = [(r["evidence"], r["task_descriptive"], r["object"]) for r in world.to_learn]
    pairs += [(r["text"], r["task"], r["object"]) for r in world.meta_train + world.meta_val]
    for text, probe, obj in pairs:
        assert obj in text
        assert probe.endswith(" " + obj)


def test_probe_template_differs_from_the_evidence_template(world):
    for r in world.to_learn:
        code, s, o = r["relation_code"], r["subject"], r["object"]
        in_evidence = template_index(code, s, o, r["evidence"])
        in_probe = [i for i, t in enumerate(TEMPLATES[code]) if t.format(s=s, o=o) == r["task_descriptive"]]
        assert len(in_evidence) == 1 and len(in_probe) == 1
        assert in_evidence != in_probe


def test_probe_templates_are_held_out_of_pretraining(world):
    corpus = "\n".join(r["text"] for r in world.pretrain)
    for r in world.nf_candidates:
        assert template_index(r["relation_code"], r["subject"], r["object"], corpus)  # the fact is taught...
        assert r["task_descriptive"] not in corpus  # ...but never in the probe's phrasing


def test_evidence_mixes_known_restatements_and_filler(world):
    for r in world.to_learn:
        sentences = re.split(r"(?<=\.) ", r["evidence"])
        assert len(sentences) == 1 + 4 + 2  # new fact + filler_sentences + known_restatements


def test_changed_mode_keeps_the_old_value_and_new_mode_drops_it():
    for mode in ("changed", "new"):
        w = build_world(small(seed=5, to_learn_mode=mode))
        corpus = "\n".join(r["text"] for r in w.pretrain)
        facts = {(f["subject"], f["relation_code"]): f["object"] for f in w.facts}
        for r in w.to_learn:
            key = (r["subject"], r["relation_code"])
            assert not template_index(
                key[1], key[0], r["object"], corpus
            )  # the new value is never pretrained
            if mode == "changed":
                assert facts[key] != r["object"] and template_index(key[1], key[0], facts[key], corpus)
            else:
                assert key not in facts


def test_meta_subjects_are_disjoint_from_to_learn(world):
    tl = {r["subject"] for r in world.to_learn}
    train, val = {r["subject"] for r in world.meta_train}, {r["subject"] for r in world.meta_val}
    assert tl and train and val
    assert not tl & train and not tl & val and not train & val


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"to_learn": 0}, "to_learn"),
        ({"filler_sentences": -1}, "filler_sentences"),
        ({"n_cities": 1}, "n_cities"),
        ({"n_entities": 12}, "n_entities"),
        ({"to_learn_mode": "old"}, "to_learn_mode"),
    ],
)
def test_validation_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"world\.{field}="):
        small(**kw)


def test_presets_are_valid_and_quick_is_smaller():
    q, d = WorldConfig.quick(seed=4), WorldConfig.default(seed=4)
    assert q.seed == d.seed == 4 and q.n_entities < d.n_entities and q.to_learn < d.to_learn
    assert replace(d, seed=0) == WorldConfig()


def test_hard_preset_evidence_restates_the_same_relation_and_adds_distractors():
    """--hard: 1 filler, 8 known facts of other people in the new fact's relation, 2 new distractors."""
    small_world = dict(n_entities=40, to_learn=20, meta_pairs=20, meta_val_pairs=6, nf_candidates=20)
    cfg = replace(WorldConfig.hard(seed=2), pretrain_passes=1, **small_world)
    assert (cfg.filler_sentences, cfg.known_restatements, cfg.same_relation, cfg.distractors) == (
        1,
        8,
        True,
        2,
    )
    w = build_world(cfg)
    known = {(f["subject"], f["relation_code"]): f["object"] for f in w.facts}

    def renders_known(s: str, code: str | None = None, not_subject: str | None = None) -> bool:
        return any(
            template_index(c, subj, obj, s)
            for (subj, c), obj in known.items()
            if (code is None or c == code) and subj != not_subject
        )

    def in_relation(sentence: str, code: str) -> bool:  # one of the relation's templates, any subject
        patterns = [
            re.escape(t).replace(r"\{s\}", ".+").replace(r"\{o\}", ".+") + r"\." for t in TEMPLATES[code]
        ]
        return any(re.fullmatch(p, sentence) for p in patterns)

    sizes = []
    for r in w.to_learn:
        sentences = re.split(r"(?<=\.) ", r["evidence"])
        assert len(sentences) == 1 + 1 + 8 + 2
        same = [s for s in sentences if renders_known(s, r["relation_code"], r["subject"])]
        assert len(same) >= 8  # other people's known facts, in the same relation (same templates)
        new = [s for s in sentences if not renders_known(s)]
        # the new fact itself, the filler and the two distractors render no pretrained fact
        assert len(new) >= 4 and any(r["object"] in s for s in new)
        # new_objects: the asked object first, then one per distractor, each in a sentence of no known fact
        assert len(r["new_objects"]) == 3 and r["new_objects"][0] == r["object"]
        assert all(any(o in s for s in new) for o in r["new_objects"])
        # new_objects_same_relation: the asked object, then exactly the distractors stated in its relation
        same_new = r["new_objects_same_relation"]
        assert same_new[0] == r["object"] and set(same_new) <= set(r["new_objects"])
        for o in r["new_objects"][1:]:
            if o == r["object"]:
                continue
            stated = [s for s in new if s.endswith(f" {o}.")]
            assert stated and any(in_relation(s, r["relation_code"]) for s in stated) == (o in same_new)
        sizes.append(len(same_new))
    assert min(sizes) == 1 and max(sizes) > 1  # some documents hold a same-relation distractor, some none
    assert "new_objects" not in build_world(replace(cfg, distractors=0)).to_learn[0]
    quick = dict(filler_sentences=6, known_restatements=2, same_relation=False, distractors=0)
    assert replace(WorldConfig.hard(), **quick) == WorldConfig.quick()  # the quick preset is unchanged
