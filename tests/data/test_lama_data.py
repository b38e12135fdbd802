"""``ckl data lama-ckl``: the split of the LAMA-ckl release, on small fixture files in the same format."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckl_toolkit.cli import main
from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.data.lama_ckl import prepare_lama_ckl

N_VARIANT = 60
OBJECTS = ["jazz", "jazz", "jazz", "opera", "BBC", "Brazil", "physics", "piano", "bishop", "FIFA"]


def _row(i: int, subject: str, obj: str, relation: str = "genre", code: str = "P136") -> dict:
    """A row with the fields of the paper's release (values made up)."""
    return {
        "relation_code": code,
        "uuid": f"00000000-0000-4000-8000-{i:012d}",
        "task_descriptive": f"{subject} plays {obj} .",
        "task_schematic": f"Guess the object. \n  subject is {subject} , relation is {relation} , "
        f"object is {obj}",
        "subject": subject,
        "relation_label": relation,
        "object": obj,
        "masked_evidence": f"In 1990 {subject} recorded an album of [MASK] music.",
        "evidence": f"In 1990 {subject} recorded an album of {obj} music.",
        "position": 0.5,
        "evidence_length": 40,
        "invariant": False,
        "scores": {"descriptive": {"llama_7b": 0.0}, "schematic": {"llama_7b": 0.0}},
    }


def _variant_rows() -> list[dict]:
    """Skewed objects and a few repeated subjects, like the real file (119 objects for 500 facts)."""
    rng = random.Random(7)
    subjects = [f"Person {i % 50}" for i in range(N_VARIANT)]  # ten subjects occur twice
    objects = [rng.choice(OBJECTS) if rng.random() < 0.5 else f"Object {i}" for i in range(N_VARIANT)]
    return [_row(i, subjects[i], objects[i]) for i in range(N_VARIANT)]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """variant.jsonl (60) and two invariant files of 12 rows sharing 4 uuids."""
    src = tmp_path / "lama_ckl"
    src.mkdir()
    _write(src / "variant.jsonl", _variant_rows())
    inv = [_row(1000 + i, f"City {i}", f"Country {i % 5}", "capital of", "P1376") for i in range(20)]
    _write(src / "invariant_descriptive.jsonl", inv[:12])
    _write(src / "invariant_schematic.jsonl", inv[8:])
    return src


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _meta_rows(out: Path) -> list[dict]:
    return _read(out / "meta_train.jsonl") + _read(out / "meta_val.jsonl")


def _shared(out: Path, key_tl: str, key_meta: str) -> set:
    return {r[key_tl] for r in _read(out / "to_learn.jsonl")} & {r[key_meta] for r in _meta_rows(out)}


@pytest.mark.parametrize("split", ["hash", "grouped"])
def test_evaluated_and_meta_facts_share_no_uuid_subject_or_object(release, tmp_path, split):
    out = tmp_path / "out"
    info = prepare_lama_ckl(release, out, eval_facts=20, val_facts=3, split=split)
    assert not _shared(out, "uuid", "uuid")
    assert not _shared(out, "subject", "subject")
    assert not _shared(out, "object", "object")
    c = info["counts"]
    assert c["evaluated"] == len(_read(out / "to_learn.jsonl")) <= 20
    assert c["meta_train_pairs"] == len(_read(out / "meta_train.jsonl")) == 2 * c["meta_train"]
    assert c["evaluated"] + c["meta_val"] + c["meta_train"] + c["dropped"] == N_VARIANT
    if split == "hash":
        assert c["evaluated"] == 20 and c["dropped"] > 0  # the skewed objects force drops
    else:
        assert c["dropped"] == 0


def test_subject_only_disjointness_keeps_facts_that_share_an_object(release, tmp_path):
    out = tmp_path / "out"
    info = prepare_lama_ckl(release, out, eval_facts=20, val_facts=3, disjoint="subject")
    assert not _shared(out, "subject", "subject") and not _shared(out, "uuid", "uuid")
    assert _shared(out, "object", "object")  # "jazz" is on both sides, as the option allows
    assert info["counts"]["dropped"] < prepare_lama_ckl(release, tmp_path / "o2", 20, 3)["counts"]["dropped"]


def test_split_is_deterministic_and_independent_of_file_order(release, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare_lama_ckl(release, a, eval_facts=20, val_facts=3, seed=1)
    rows = _read(release / "variant.jsonl")
    random.Random(3).shuffle(rows)
    _write(release / "variant.jsonl", rows)
    prepare_lama_ckl(release, b, eval_facts=20, val_facts=3, seed=1)
    for name in ("to_learn.jsonl", "meta_train.jsonl", "meta_val.jsonl", "nf_candidates.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    prepare_lama_ckl(release, c, eval_facts=20, val_facts=3, seed=2)
    assert (a / "to_learn.jsonl").read_bytes() != (c / "to_learn.jsonl").read_bytes()


def test_to_learn_rows_are_kept_as_is_and_meta_pairs_follow_the_pair_format(release, tmp_path):
    out = tmp_path / "out"
    prepare_lama_ckl(release, out, eval_facts=20, val_facts=3, meta_probe="schematic")
    source = {r["uuid"]: r for r in _read(release / "variant.jsonl")}
    for r in _read(out / "to_learn.jsonl"):
        assert r == source[r["uuid"]]
    for p in _meta_rows(out):
        fact = source[p["uuid"]]
        assert p["text"] == fact["evidence"] and p["task"] == fact["task_schematic"]
        assert p["object"] in p["task"] and p["relation"] == fact["relation_label"]
        assert p["probe"] == "schematic"


def test_split_json_records_rule_uuids_and_sources(release, tmp_path):
    out = tmp_path / "out"
    prepare_lama_ckl(release, out, eval_facts=20, val_facts=3, seed=5, meta_facts=2)
    info = json.loads((out / "split.json").read_text())
    assert info["seed"] == 5 and "sha256('<uuid>:5')" in info["rule"]
    assert f"dropped ({info['counts']['dropped']})" in info["rule"]
    assert info["uuids"]["evaluated"] == [r["uuid"] for r in _read(out / "to_learn.jsonl")]
    assert len(info["uuids"]["meta_train"]) == 2 == info["counts"]["meta_train"]
    assert info["counts"]["unused"] == len(info["uuids"]["unused"]) > 0
    src = info["sources"]["variant.jsonl"]
    assert src["sha256"] == hashlib.sha256((release / "variant.jsonl").read_bytes()).hexdigest()


def test_invariant_facts_are_deduplicated_and_rehearsal_keeps_uuids(release, tmp_path):
    out = tmp_path / "out"
    info = prepare_lama_ckl(release, out, eval_facts=20, val_facts=3)
    nf = _read(out / "nf_candidates.jsonl")
    assert len(nf) == len({r["uuid"] for r in nf}) == 20 == info["counts"]["nf_candidates"]
    assert sum(r["nf_sources"] == ["descriptive", "schematic"] for r in nf) == 4
    assert all(r["task_descriptive"] and r["task_schematic"] for r in nf)
    rehearsal = _read(out / "rehearsal.jsonl")
    assert [r["uuid"] for r in rehearsal] == [r["uuid"] for r in nf]
    assert all(set(r) == {"id", "text", "uuid"} for r in rehearsal)


def _corrupt(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _drop_field(path: Path, lineno: int, name: str) -> None:
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[lineno - 1])
    del row[name]
    _corrupt(path, lineno, json.dumps(row))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: _corrupt(p / "variant.jsonl", 3, "{not json"), "variant.jsonl:3: invalid JSON"),
        (lambda p: _corrupt(p / "variant.jsonl", 4, "[1, 2]"), "variant.jsonl:4: expected a JSON object"),
        (lambda p: _drop_field(p / "variant.jsonl", 2, "object"), "variant.jsonl:2: missing field 'object'"),
        (
            lambda p: _drop_field(p / "invariant_schematic.jsonl", 5, "task_schematic"),
            "invariant_schematic.jsonl:5: missing field 'task_schematic'",
        ),
        (
            lambda p: _corrupt(
                p / "variant.jsonl", 6, json.dumps(_row(5, "S", "X") | {"task_schematic": "no"})
            ),
            "variant.jsonl:6: field 'task_schematic' does not contain the object 'X'",
        ),
        (
            lambda p: _corrupt(p / "variant.jsonl", 7, json.dumps(_row(6, "S", "X") | {"subject": ""})),
            "variant.jsonl:7: field 'subject' must be a non-empty string",
        ),
        (
            lambda p: _corrupt(p / "variant.jsonl", 8, json.dumps(_row(0, "S", "X"))),
            "variant.jsonl:8: field 'uuid' '00000000-0000-4000-8000-000000000000' repeats",
        ),
        (
            lambda p: (p / "invariant_descriptive.jsonl").unlink(),
            "invariant_descriptive.jsonl: file not found",
        ),
        (
            lambda p: _corrupt(
                p / "invariant_schematic.jsonl",
                1,
                json.dumps(_row(1008, "City 8", "Elsewhere", "capital of", "P1376")),
            ),
            "invariant_schematic.jsonl:1: field 'object' 'Elsewhere' differs",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(release, tmp_path, damage, expected):
    damage(release)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        prepare_lama_ckl(release, tmp_path / "out", eval_facts=20, val_facts=3)
    assert not (tmp_path / "out").exists()


def test_bad_options_and_existing_output(release, tmp_path):
    with pytest.raises(ConfigError, match="--eval-facts 59 / --val-facts 3"):
        prepare_lama_ckl(release, tmp_path / "o", eval_facts=59, val_facts=3)
    with pytest.raises(ConfigError, match="no meta-train facts left"):
        prepare_lama_ckl(release, tmp_path / "o", eval_facts=55, val_facts=3)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        prepare_lama_ckl(release, out, eval_facts=20, val_facts=3)
    prepare_lama_ckl(release, out, eval_facts=20, val_facts=3, force=True)
    assert not (out / "keep.txt").exists() and (out / "split.json").exists()


def test_cli_writes_the_split_and_exits_2_on_bad_input(release, tmp_path):
    runner = CliRunner()
    args = ["data", "lama-ckl", "--path", str(release), "--eval-facts", "20", "--val-facts", "3"]
    ok = runner.invoke(main, args + ["--out", str(tmp_path / "out"), "--split", "grouped"])
    assert ok.exit_code == 0, ok.output
    assert "'evaluated': 20" in ok.output and "nothing dropped" in ok.output
    _drop_field(release / "variant.jsonl", 9, "evidence")
    bad = runner.invoke(main, args + ["--out", str(tmp_path / "out2")])
    assert bad.exit_code == 2
    assert "variant.jsonl:9: missing field 'evidence'" in bad.output
