"""``ckl data known-facts``: the facts the base answers exactly, none an evaluation measures."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ckl_toolkit.cli import main as cli
from ckl_toolkit.core.io import write_jsonl_atomic
from ckl_toolkit.data.known_facts import candidates, drop_excluded, known_facts
from ckl_toolkit.data.tokenizer import train_bpe_tokenizer
from tests.conftest import PerfectPredictor

FACTS = [
    {"uuid": "a", "subject": "Rome", "relation_label": "capital of", "object": "Italy",
     "task_descriptive": "Rome is the capital of Italy ."},
    {"uuid": "b", "subject": "Oslo", "relation_label": "capital of", "object": "Norway",
     "task_descriptive": "Oslo is the capital of Norway ."},
    {"uuid": "c", "subject": "Lima", "relation_label": "capital of", "object": "Peru",
     "task_descriptive": "Lima is the capital of Peru ."},
    {"uuid": "b", "subject": "Oslo", "relation_label": "capital of", "object": "Norway",
     "task_descriptive": "Oslo is the capital of Norway ."},  # the same fact twice (a shared uuid)
]  # fmt: skip


def test_excluded_uuid_or_subject_is_dropped():
    exclude = [{"uuid": "a", "subject": "Elsewhere"}, {"uuid": "z", "subject": "Lima"}]
    assert [r["uuid"] for r in drop_excluded(FACTS, exclude)] == ["b", "b"]
    assert drop_excluded(FACTS, []) == FACTS


def test_known_facts_keeps_exact_answers_once_as_retention_probes():
    tok = train_bpe_tokenizer([r["task_descriptive"] for r in FACTS], 300)
    got = known_facts(PerfectPredictor(len(tok)), tok, candidates(FACTS, [{"uuid": "c"}]), "task_descriptive")
    assert [(r["uuid"], r["task"], r["object"], r["relation"]) for r in got] == [
        ("a", "Rome is the capital of Italy .", "Italy", "capital of"),
        ("b", "Oslo is the capital of Norway .", "Norway", "capital of"),
    ]
    assert (
        known_facts(PerfectPredictor(len(tok), wrong=True), tok, candidates(FACTS, []), "task_descriptive")
        == []
    )


def test_cli_writes_probes_meta_training_reads_and_names_a_missing_file(tiny_lm_dir, tmp_path):
    from ckl_toolkit.metalearn.episodes import PROBE_FIELDS, load_pairs

    write_jsonl_atomic(tmp_path / "facts.jsonl", FACTS)
    write_jsonl_atomic(tmp_path / "measured.jsonl", FACTS[:1])
    args = ["data", "known-facts", "--facts", str(tmp_path / "facts.jsonl"), "--model", str(tiny_lm_dir),
            "--exclude", str(tmp_path / "measured.jsonl"),
            "--out", str(tmp_path / "known.jsonl")]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "of 2 candidates" in res.output  # 4 rows: Rome excluded, Oslo once, Lima
    rows = [json.loads(line) for line in (tmp_path / "known.jsonl").read_text().splitlines()]
    assert all(r["uuid"] != "a" for r in rows)  # a random tiny model may know none; never the excluded one
    if rows:
        assert load_pairs(str(tmp_path / "known.jsonl"), "data.retain", PROBE_FIELDS) == rows
    missing = CliRunner().invoke(cli, [*args[:3], str(tmp_path / "nope.jsonl"), *args[4:]])
    assert missing.exit_code == 2 and "--facts" in missing.output
