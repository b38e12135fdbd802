"""``ckl data temporalwiki``: meta pairs from the 0801-0901 changed triples, disjoint from evaluated sets."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from ckl_toolkit.cli import main as cli


def tw_dir(tmp_path: Path) -> Path:
    d = tmp_path / "temporalwiki"
    d.mkdir()
    rows = ["subject,relation,object"]
    for i in range(40):
        rows.append(f"Person {i},occupation,writer {i}")
    rows.append("Evaluated Person,place of birth,Paris")  # its subject is probed in 0901-1001: left out
    rows.append("Person 3,occupation,writer 3")  # a duplicate triple: one pair
    (d / "0801-0901_changed.csv").write_text("\n".join(rows) + "\n")
    probe = {"subject": "Evaluated Person", "relation": "place of birth", "object": "Lyon"}
    (d / "0901-1001_changed.jsonl").write_text(json.dumps(probe) + "\n")
    (d / "0901-1001_unchanged.jsonl").write_text(json.dumps({**probe, "subject": "Other"}) + "\n")
    lama = tmp_path / "lama"
    lama.mkdir()
    template = {"relation": "P19", "label": "place of birth", "template": "[X] was born in [Y] ."}
    (lama / "relations.jsonl").write_text(json.dumps(template) + "\n")
    return d


def test_pairs_reword_each_triple_and_never_touch_an_evaluated_subject(tmp_path):
    src, out = tw_dir(tmp_path), tmp_path / "out"
    res = CliRunner().invoke(
        cli, ["data", "temporalwiki", "--path", str(src), "--out", str(out), "--val-pairs", "5"]
    )
    assert res.exit_code == 0, res.output
    train = [json.loads(x) for x in (out / "meta_train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "meta_val.jsonl").read_text().splitlines()]
    info = json.loads((out / "split.json").read_text())
    assert info["counts"] == {"triples": 41, "dropped_evaluated_subject": 1, "meta_train": 35, "meta_val": 5}
    assert info["templates"].endswith("lama/relations.jsonl")  # found next to the data directory
    pairs = train + val
    assert all(p["subject"] != "Evaluated Person" for p in pairs)
    assert not {p["subject"] for p in train} & {p["subject"] for p in val}
    p = next(p for p in pairs if p["subject"] == "Person 7")
    assert p["text"] == "The occupation of Person 7 is writer 7."  # what the nightly stream renders
    assert p["task"] == "Person 7 occupation writer 7" and p["task"].endswith(p["object"])  # another wording
    res = CliRunner().invoke(cli, ["data", "temporalwiki", "--path", str(src), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(
        cli, ["data", "temporalwiki", "--path", str(tmp_path), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "0801-0901_changed.csv" in res.output
