"""Document sources and the ledger: order, exact resume, exactly-once, quarantine, CSV/parquet/hf."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckl_toolkit.core.config import ConfigError, from_dict
from ckl_toolkit.core.documents import Document, Position
from ckl_toolkit.nightly.ledger import DocumentLedger
from ckl_toolkit.nightly.sources import (
    RENDERED_TRIPLES,
    DocumentStream,
    StreamConfig,
    StreamError,
    resolve_shards,
)

# ---------------------------------------------------------------------------------------------
# helpers


def write_lines(path, lines: list, mode: str = "wb") -> str:
    """Write JSONL: dicts are dumped, bytes and str go as they are (each ends with a newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def docs(prefix: str, n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "text": f"document {prefix}{i} says {i * 'x'}."}
        for i in range(start, start + n)
    ]


def cfg(tmp_path, paths, **kw) -> StreamConfig:
    kw.setdefault("quarantine_dir", str(tmp_path / "quarantine"))
    return StreamConfig(paths=[str(p) for p in paths], **kw)


def read_all(config: StreamConfig, position=None) -> tuple[list, DocumentStream]:
    stream = DocumentStream(config, position)
    return list(stream), stream


def quarantine_records(tmp_path, shard_name: str) -> list[dict]:
    path = tmp_path / "quarantine" / f"{shard_name}.jsonl"
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# config, order, positions


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"paths": "a.jsonl"}, "paths"),
        ({"paths": []}, "paths"),
        ({"paths": ["a"], "format": "xml"}, "format"),
        ({"paths": ["a"], "on_error": "ignore"}, "on_error"),
        ({"paths": ["a"], "max_chars": 0}, "max_chars"),
        ({"paths": ["a"], "text_field": ""}, "text_field"),
        ({"paths": ["a"], "on_error": "quarantine"}, "quarantine_dir"),
        ({"paths": ["a"], "on_error": "fatal", "triple_template": "{subj}"}, "triple_template"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        StreamConfig(**kw)


def test_config_errors_nested_in_a_recipe_name_the_dotted_field():
    with pytest.raises(ConfigError, match=r"^stream\.max_chars: "):
        from_dict(StreamConfig, {"paths": ["a"], "on_error": "fatal", "max_chars": -1}, prefix="stream.")


def test_order_is_sorted_over_dirs_and_globs_and_skips_hidden(tmp_path):
    d = tmp_path / "in"
    write_lines(d / "b.jsonl", docs("b", 2))
    write_lines(d / "a.jsonl", [{**r, "time": "2021-09-01", "source": "wiki"} for r in docs("a", 2)])
    write_lines(d / "sub" / "c.jsonl", docs("c", 1))
    write_lines(d / ".a.jsonl.123.tmp", docs("tmp", 1))  # a writer's half-done atomic write
    write_lines(d / ".hidden" / "h.jsonl", docs("h", 1))
    (d / "README.md").write_text("not a shard")
    write_lines(tmp_path / "extra" / "0.jsonl", docs("z", 1))

    config = cfg(tmp_path, [d, tmp_path / "extra" / "*.jsonl", d / "a.jsonl"])
    got, stream = read_all(config)
    assert [x.id for x in got] == ["z0", "a0", "a1", "b0", "b1", "c0"]  # extra/ sorts before in/
    assert stream.shards() == sorted(stream.shards())
    assert got[1].meta == {"time": "2021-09-01", "source": "wiki"}
    assert (got[1].shard, got[1].line, got[2].line) == (str(d / "a.jsonl"), 1, 2)
    assert stream.stats.read == 6 and stream.stats.quarantined == 0
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        resolve_shards([str(tmp_path / "nope.jsonl")])


def test_resume_from_serialized_position_yields_exactly_the_rest(tmp_path):
    write_lines(tmp_path / "s1.jsonl", docs("a", 4))
    write_lines(tmp_path / "s2.jsonl", [*docs("b", 2), "", "{broken", *docs("b", 3, start=2)])
    write_lines(tmp_path / "s3.jsonl", docs("c", 3))
    config = cfg(tmp_path, [tmp_path])
    full, stream = read_all(config)
    assert len(full) == 12
    assert (tmp_path / "quarantine" / "s2.jsonl.jsonl").exists()  # under the input dir, yet not a shard:
    assert stream.shards() == [str(tmp_path / f"s{i}.jsonl") for i in (1, 2, 3)]
    for k in range(len(full) + 1):
        stream = DocumentStream(config)
        taken = [d for _, d in zip(range(k), stream)]
        saved = json.loads(json.dumps(stream.position.to_json()))
        rest, _ = read_all(config, Position.from_json(saved))
        assert [d.id for d in taken + rest] == [d.id for d in full], k
    # a document's own position is the same resume point
    rest, _ = read_all(config, full[5].position.to_json())
    assert [d.id for d in rest] == [d.id for d in full[6:]]


# ---------------------------------------------------------------------------------------------
# exactly once


def nightly_pass(config: StreamConfig, ledger_path, crash_after: int | None = None) -> list[str]:
    """What `ckl update` does with the blocks: learn unseen documents, commit the ledger at the end."""
    ledger = DocumentLedger(ledger_path)
    stream = DocumentStream(config)
    learned = []
    for doc in ledger.unseen(stream, stream.stats):
        if crash_after is not None and len(learned) == crash_after:
            return learned  # killed before commit
        learned.append(doc.id)
        ledger.mark([doc])
    ledger.commit()
    return learned


def test_exactly_once_over_runs_with_a_growing_stream(tmp_path):
    shards, ledger = tmp_path / "shards", tmp_path / "state" / "ledger.json"
    write_lines(shards / "2021-09-01.jsonl", docs("a", 3))
    write_lines(shards / "2021-09-02.jsonl", [*docs("b", 2), {"text": "an id-less document"}])
    config = cfg(tmp_path, [shards])

    first = nightly_pass(config, ledger)
    assert len(first) == 6 and first[-1].startswith("sha256:")

    # between runs: lines appended to a shard, a shard added after and one before the others,
    # a re-sent document (same id) and a re-sent id-less text
    write_lines(
        shards / "2021-09-02.jsonl", [*docs("b", 2, start=2), {"text": "an id-less document"}], mode="ab"
    )
    write_lines(shards / "2021-09-03.jsonl", [*docs("c", 2), docs("a", 1)[0]])
    write_lines(shards / "2021-08-31.jsonl", docs("late", 1))
    assert nightly_pass(config, ledger, crash_after=2) == ["late0", "b2"]  # killed: not committed

    second = nightly_pass(config, ledger)
    assert second == ["late0", "b2", "b3", "c0", "c1"]
    assert nightly_pass(config, ledger) == []
    everything = first + second
    assert len(everything) == len(set(everything)) == 11
    saved = json.loads(ledger.read_text())
    assert saved["count"] == 11 and sorted(saved["ids"]) == sorted(everything)
    assert [p.name for p in ledger.parent.iterdir()] == ["ledger.json"]  # no temp files left


def test_ledger_duplicates_in_one_pass_and_corrupt_file(tmp_path):
    write_lines(tmp_path / "s.jsonl", [*docs("a", 2), docs("a", 1)[0]])
    stream = DocumentStream(cfg(tmp_path, [tmp_path / "s.jsonl"]))
    ledger = DocumentLedger(tmp_path / "ledger.json")
    assert [d.id for d in ledger.unseen(stream, stream.stats)] == ["a0", "a1"]
    assert stream.stats.skipped["duplicate"] == 1
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable ledger"):
        DocumentLedger(tmp_path / "ledger.json")


# ---------------------------------------------------------------------------------------------
# bad input


BAD_LINES = [
    ('{"id": "j", "text": "cut', "<json>", "bad_json"),
    ("[1, 2]", "<json>", "bad_json"),
    ('{"id": "m", "body": "no text field"}', "text", "missing_field"),
    ('{"id": "n", "text": 5}', "text", "bad_type"),
    ('{"id": "e", "text": "   "}', "text", "empty_text"),
    ('{"id": "l", "text": "' + "y" * 500 + '"}', "text", "too_long"),
    (b'{"id": "u", "text": "caf\xe9 latin-1"}', "<bytes>", "non_utf8"),
    ('{"id": ["x"], "text": "a list as id"}', "id", "bad_type"),
    (
        '{"id": "s", "text": "a lone surrogate \\ud800 here"}',
        "text",
        "bad_unicode",
    ),  # valid JSON, no tokenizer reads it
    ("[" * 200_000 + "]" * 200_000, "<json>", "bad_json"),  # nested too deeply for json's recursion
]


@pytest.mark.parametrize("bad, field, kind", BAD_LINES, ids=[k for _, _, k in BAD_LINES])
def test_bad_line_is_quarantined_with_file_line_field(tmp_path, bad, field, kind):
    shard = write_lines(tmp_path / "in" / "shard.jsonl", [docs("g", 1)[0], bad, docs("g", 2)[1]])
    got, stream = read_all(cfg(tmp_path, [shard], max_chars=100))
    assert [d.id for d in got] == ["g0", "g1"]
    assert stream.stats.quarantined == 1 and stream.stats.skipped == {kind: 1}
    (record,) = quarantine_records(tmp_path, "shard.jsonl")
    assert (record["shard"], record["line"], record["field"], record["kind"]) == (shard, 2, field, kind)
    raw = bad if isinstance(bad, bytes) else bad.encode()
    assert base64.b64decode(record["raw_base64"]) == raw if "raw_base64" in record else record["raw"] == bad
    read_all(cfg(tmp_path, [shard], max_chars=100))  # meeting it again does not duplicate the record
    assert len(quarantine_records(tmp_path, "shard.jsonl")) == 1


@pytest.mark.parametrize("bad, field, kind", BAD_LINES, ids=[k for _, _, k in BAD_LINES])
def test_bad_line_is_fatal_naming_file_line_field(tmp_path, bad, field, kind):
    shard = write_lines(tmp_path / "shard.jsonl", [docs("g", 1)[0], bad])
    stream = DocumentStream(cfg(tmp_path, [shard], max_chars=100, on_error="fatal", quarantine_dir=None))
    with pytest.raises(StreamError) as err:
        list(stream)
    assert str(err.value).startswith(f"{shard}:2: {field}: ")
    assert (err.value.line, err.value.field) == (2, field)
    assert not (tmp_path / "quarantine").exists()


def test_unterminated_last_line_waits_for_the_writer(tmp_path):
    shard = tmp_path / "s.jsonl"
    write_lines(shard, docs("a", 2))
    with open(shard, "ab") as f:
        f.write(b'{"id": "a2", "text": "half wri')
    got, stream = read_all(cfg(tmp_path, [shard], on_error="fatal", quarantine_dir=None))
    assert [d.id for d in got] == ["a0", "a1"] and stream.stats.skipped == {"incomplete_tail": 1}
    assert stream.position == Position(str(shard), 2)
    with open(shard, "ab") as f:
        f.write(b'tten"}')  # complete but still no newline: it parses, so it is read
    rest, _ = read_all(cfg(tmp_path, [shard]), stream.position)
    assert [d.id for d in rest] == ["a2"]


# ---------------------------------------------------------------------------------------------
# CSV, parquet, hf


TRIPLES_CSV = (
    b"subject,relation,object\n"
    b"Nagpur Metro Rail,has part,Congress Nagar\n"
    b'"Kool & The Gang, Inc.",has part,Ronald Bell\n'
    b",composer,Paul McCartney\n"
    b"Turnberry Lighthouse,color\n"
    b"Come and Get It,composer,Paul McCartney\n"
    b"Caf\xe9 Tacuba,genre,rock\n"  # latin-1, not UTF-8
)


def test_csv_triples_are_rendered_and_bad_rows_quarantined(tmp_path):
    shard = tmp_path / "0801-0901_changed.csv"
    shard.write_bytes(TRIPLES_CSV)
    got, stream = read_all(cfg(tmp_path, [shard]))
    assert [d.text for d in got] == [
        "Nagpur Metro Rail has part Congress Nagar.",
        "Kool & The Gang, Inc. has part Ronald Bell.",
        "Come and Get It composer Paul McCartney.",
    ]
    assert [d.line for d in got] == [2, 3, 6]
    assert got[0].meta == {
        "source": RENDERED_TRIPLES,
        "subject": "Nagpur Metro Rail",
        "relation": "has part",
        "object": "Congress Nagar",
    }
    assert got[0].id.startswith("sha256:") and len({d.id for d in got}) == 3
    records = quarantine_records(tmp_path, shard.name)
    assert [(r["line"], r["field"], r["kind"]) for r in records] == [
        (4, "subject", "missing_field"),
        (5, "<row>", "bad_columns"),
        (7, "subject", "non_utf8"),
    ]
    assert base64.b64decode(records[2]["raw_base64"]) == b"Caf\xe9 Tacuba,genre,rock"
    rest, _ = read_all(cfg(tmp_path, [shard]), got[1].position)
    assert [d.line for d in rest] == [6]


def test_csv_with_text_column(tmp_path):
    shard = tmp_path / "docs.csv"
    text = 'id,text,time\nd1,"first, with a comma",2021-09\nd2,second,2021-10\n'
    shard.write_text(text, encoding="utf-8-sig")  # with the byte-order mark spreadsheets write
    got, _ = read_all(cfg(tmp_path, [shard]))
    assert [(d.id, d.text, d.meta) for d in got] == [
        ("d1", "first, with a comma", {"time": "2021-09"}),
        ("d2", "second", {"time": "2021-10"}),
    ]


def test_parquet_source_rows_positions_and_nulls(tmp_path):
    shard = tmp_path / "p.parquet"
    table = pa.table(
        {"id": ["p0", "p1", "p2", "p3"], "text": ["zero", None, "two", "three"], "time": [1, 2, 3, 4]}
    )
    pq.write_table(table, shard, row_group_size=2)
    got, stream = read_all(cfg(tmp_path, [shard]))
    assert [(d.id, d.line, d.meta["time"]) for d in got] == [("p0", 1, 1), ("p2", 3, 3), ("p3", 4, 4)]
    (record,) = quarantine_records(tmp_path, "p.parquet")
    assert (record["line"], record["field"]) == (2, "text") and json.loads(record["raw"])["id"] == "p1"
    rest, _ = read_all(cfg(tmp_path, [shard]), got[1].position)
    assert [d.id for d in rest] == ["p3"]


def test_hf_datasets_streaming_matches_the_native_readers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_lines(tmp_path / "a.jsonl", docs("a", 3))
    (tmp_path / "b.csv").write_text("subject,relation,object\nKim Dotcom,native language,German\n")
    native, _ = read_all(cfg(tmp_path, [tmp_path]))
    streamed, _ = read_all(cfg(tmp_path, [tmp_path], format="hf"))
    assert [(d.id, d.text, d.meta) for d in streamed] == [(d.id, d.text, d.meta) for d in native]
    assert len(streamed) == 4 and streamed[-1].meta["source"] == RENDERED_TRIPLES
    # hf counts rows, the csv reader physical lines (header = line 1)
    assert [d.line for d in streamed] == [1, 2, 3, 1] and native[-1].line == 2
    rest, _ = read_all(cfg(tmp_path, [tmp_path], format="hf"), streamed[1].position)
    assert [d.id for d in rest] == [d.id for d in native[2:]]


# ---------------------------------------------------------------------------------------------
# input that used to crash or be lost (issue 12)


def test_a_byte_order_mark_at_the_start_of_a_shard_is_not_bad_input(tmp_path):
    shard = tmp_path / "bom.jsonl"
    shard.write_bytes(b"\xef\xbb\xbf" + json.dumps(docs("b", 1)[0]).encode() + b"\n")
    got, stream = read_all(cfg(tmp_path, [shard]))
    assert [d.id for d in got] == ["b0"] and stream.stats.quarantined == 0


def test_an_unterminated_last_line_is_logged_with_file_and_line(tmp_path, caplog):
    shard = tmp_path / "s.jsonl"
    write_lines(shard, docs("a", 1))
    with open(shard, "ab") as f:
        f.write(b'{"id": "a1", "text": "half wri')
    with caplog.at_level("WARNING", logger="ckl_toolkit.nightly.sources"):
        read_all(cfg(tmp_path, [shard]))
    assert f"{shard}:2: unterminated last line" in caplog.text


def test_csv_fields_up_to_max_chars_are_read_and_longer_ones_quarantined(tmp_path):
    long_text, too_long = "w" * 200_000, "z" * 300_000  # both beyond csv's own 131,072 field limit
    path = tmp_path / "big.csv"
    path.write_text(f"id,text\nok,short\nbig,{long_text}\nhuge,{too_long}\nlast,fine\n")
    got, stream = read_all(cfg(tmp_path, [path], max_chars=250_000))
    assert [d.id for d in got] == ["ok", "big", "last"] and len(got[1].text) == 200_000
    assert stream.stats.skipped == {"too_long": 1}


def test_a_corrupt_parquet_shard_is_quarantined_whole_and_the_others_are_read(tmp_path):
    good = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["p0", "p1"], "text": ["one", "two"]}), good)
    bad = tmp_path / "b.parquet"
    bad.write_bytes(good.read_bytes()[:-40])  # a truncated file: its footer is gone
    got, stream = read_all(cfg(tmp_path, [good, bad]))
    assert [d.id for d in got] == ["p0", "p1"] and stream.stats.skipped == {"bad_shard": 1}
    (record,) = quarantine_records(tmp_path, "b.parquet")
    assert record["shard"] == str(bad) and record["kind"] == "bad_shard" and "parquet" in record["reason"]
    with pytest.raises(StreamError, match=rf"^{bad}:0: <shard>: unreadable parquet"):
        list(DocumentStream(cfg(tmp_path, [good, bad], on_error="fatal", quarantine_dir=None)))


def _changed_text_pass(tmp_path, policy: str, ledger: DocumentLedger):
    shard = write_lines(tmp_path / "dup.jsonl", [
        {"id": "x", "text": "first text"}, {"id": "y", "text": "other"}, {"id": "x", "text": "a new text"},
        {"id": "y", "text": "other"},
    ])  # fmt: skip
    stream = DocumentStream(cfg(tmp_path, [shard], on_duplicate=policy))
    return [d for d in ledger.unseen(stream, stream.stats, on_changed=stream.changed_text)], stream, shard


@pytest.mark.parametrize("policy", ["skip", "quarantine", "new_version"])
def test_an_id_met_again_with_another_text_is_handled_as_the_recipe_says(tmp_path, policy, caplog):
    with caplog.at_level("INFO", logger="ckl_toolkit.nightly.sources"):
        got, stream, shard = _changed_text_pass(tmp_path, policy, DocumentLedger(tmp_path / "ledger.json"))
    assert stream.stats.skipped["changed_text"] == 1 and stream.stats.skipped["duplicate"] == 1
    if policy == "new_version":
        assert [(d.id.split("#")[0], d.text) for d in got] == [
            ("x", "first text"),
            ("y", "other"),
            ("x", "a new text"),
        ]
    else:
        assert [d.id for d in got] == ["x", "y"]
    if policy == "quarantine":
        (record,) = quarantine_records(tmp_path, "dup.jsonl")
        assert (record["line"], record["kind"], record["field"]) == (3, "changed_text", "id")
    elif policy == "skip":
        assert f"{shard}:3: id 'x': its text changed (met earlier in this run): skipped" in caplog.text


def test_a_learned_id_whose_text_changed_is_caught_on_a_later_night(tmp_path):
    ledger = DocumentLedger(tmp_path / "ledger.json")
    ledger.mark([Document("x", "first text", "s", 1)])
    ledger.commit()
    write_lines(tmp_path / "n2.jsonl", [{"id": "x", "text": "first text"}, {"id": "x2", "text": "new"}])
    got, stream = read_all(cfg(tmp_path, [tmp_path / "n2.jsonl"]))
    assert [d.id for d in DocumentLedger(tmp_path / "ledger.json").unseen(got)] == ["x2"]  # same text: seen
    write_lines(tmp_path / "n3.jsonl", [{"id": "x", "text": "rewritten text"}])
    stream = DocumentStream(cfg(tmp_path, [tmp_path / "n3.jsonl"], on_duplicate="new_version"))
    again = list(DocumentLedger(tmp_path / "ledger.json").unseen(stream, stream.stats, stream.changed_text))
    assert [d.text for d in again] == ["rewritten text"] and again[0].id.startswith("x#")


def test_a_ledger_of_the_first_format_is_read_and_written_anew(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "ckl-ledger/1", "count": 2, "ids": ["a", "b"]}))
    ledger = DocumentLedger(old)
    assert ledger.seen("a") and not ledger.changed(
        Document("a", "any text", "s", 1)
    )  # no fingerprint: trusted
    ledger.mark([Document("c", "c text", "s", 3)])
    data = json.loads(ledger.commit(tmp_path / "new.json").read_text())
    assert data["format"] == "ckl-ledger/2" and data["ids"]["a"] is None and len(data["ids"]["c"]) == 16
