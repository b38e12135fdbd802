"""Watermarks and the id store: a night reads what is new, the ledger grows by what it learned.

Store level (fast): appended shards resume from their watermark, rewritten ones are rescanned without
learning their ids again, shards sorting before consumed ones are found, states are references,
JSON ledgers migrate, a damaged store is an error. Then ``ckl update`` end to end on the tiny Llama.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckl_toolkit.core.config import to_yaml
from ckl_toolkit.core.documents import Document
from ckl_toolkit.nightly.contract import ExitCode, current_version, list_versions
from ckl_toolkit.nightly.idstore import STORE_FILE, IdStore, open_ledger
from ckl_toolkit.nightly.plan import PLAN_FILE, collect_plan, sample_pool
from ckl_toolkit.nightly.sources import DocumentStream, StreamConfig
from ckl_toolkit.nightly.watermarks import BLOCK, prefix_fingerprint
from ckl_toolkit.training.mix_review import reservoir_sample
from ckl_toolkit.update import update
from tests.nightly.test_update import facts, ledger_ids, make_recipe, published_tensors, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def rows(prefix: str, n: int, start: int = 0, pad: int = 0) -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "text": f"document {prefix}{i} " + "x" * pad} for i in range(start, start + n)
    ]


def config(tmp: Path, fmt: str = "auto", **kw) -> StreamConfig:
    return StreamConfig(paths=[str(tmp / "data")], format=fmt, quarantine_dir=str(tmp / "q"), **kw)


def night(tmp: Path, cfg: StreamConfig, ref: Path | None) -> tuple[list[str], DocumentStream, Path]:
    """Plan over the stream from the state ``ref`` names, learn every planned document, commit a version
    state (ids + watermarks) and return (learned ids, the pass, the new reference)."""
    ledger = open_ledger(tmp, ref)
    plan = collect_plan(cfg, None, ledger, None, "night", "")
    ledger.mark(plan.new)
    out = tmp / "refs" / f"{len(list((tmp / 'refs').glob('*')) if (tmp / 'refs').exists() else [])}.json"
    ledger.commit(out, "version", "night", plan.published_watermarks(ledger.seen))
    return [d.id for d in plan.new], plan, out


# ---------------------------------------------------------------------------------------------
# watermarks


def test_an_appended_shard_resumes_from_its_watermark_and_an_unchanged_one_is_skipped(tmp_path):
    shard = write_jsonl(tmp_path / "data/a.jsonl", rows("a", 3))
    write_jsonl(tmp_path / "data/b.jsonl", rows("b", 2))
    first, plan, ref = night(tmp_path, config(tmp_path), None)
    assert first == ["a0", "a1", "a2", "b0", "b1"]
    mark = open_ledger(tmp_path, ref).watermarks()[str(shard)]
    assert (mark.line, mark.offset, mark.docs, mark.eof) == (3, shard.stat().st_size, 3, True)

    write_jsonl(shard, rows("a", 2, start=3), mode="a")
    ledger = open_ledger(tmp_path, ref)
    stream = DocumentStream(config(tmp_path), watermarks=ledger.watermarks())
    got = [d for d in ledger.unseen(stream, stream.stats)]
    assert [(d.id, d.line) for d in got] == [("a3", 4), ("a4", 5)]
    assert stream.decisions == {str(shard): "resume", str(tmp_path / "data/b.jsonl"): "skip"}
    # the consumed documents count as seen, as a full pass would count them
    assert stream.stats.read == 7 and stream.stats.skipped["seen"] == 5


def test_a_resumed_shard_is_not_read_before_its_watermark(tmp_path):
    """Only the sampled blocks of the consumed prefix are read: a same-length edit between them is
    not met (the fingerprint's documented blind spot, and the proof the prefix is not parsed)."""
    shard = write_jsonl(tmp_path / "data/a.jsonl", rows("a", 400, pad=200))
    assert shard.stat().st_size > 20 * BLOCK
    _, _, ref = night(tmp_path, config(tmp_path), None)
    data = bytearray(shard.read_bytes())
    middle = data.index(b'"id": "a', len(data) // 2 + BLOCK // 2)  # between two sampled blocks
    data[middle : middle + 5] = b"BROKE"  # that line is no JSON any more
    shard.write_bytes(bytes(data))
    write_jsonl(shard, rows("n", 1), mode="a")
    learned, plan, _ = night(tmp_path, config(tmp_path), ref)
    assert learned == ["n0"] and plan.stream_stats["quarantined"] == 0


def test_a_rewritten_shard_is_rescanned_with_a_warning_and_its_ids_are_not_learned_again(tmp_path, caplog):
    shard = write_jsonl(tmp_path / "data/a.jsonl", rows("a", 4))
    _, _, ref = night(tmp_path, config(tmp_path, on_duplicate="new_version"), None)
    rewritten = rows("a", 4)[::-1] + rows("a", 1, start=4)  # reordered (same ids, same texts) + one new
    rewritten[0] = {"id": "a3", "text": "document a3, corrected"}  # and one text changed under its id
    write_jsonl(shard, rewritten)
    with caplog.at_level(logging.WARNING):
        learned, plan, ref = night(tmp_path, config(tmp_path, on_duplicate="new_version"), ref)
    assert any(str(shard) in r.message and "rescanning" in r.message for r in caplog.records)
    assert plan.stream_stats["rescanned"] == [str(shard)]
    corrected = [i for i in learned if i.startswith("a3#")]
    assert learned == corrected + ["a4"] and len(corrected) == 1  # new_version still applies
    assert plan.stream_stats["skipped"]["seen"] == 3  # a0..a2 met again, not learned again
    assert night(tmp_path, config(tmp_path, on_duplicate="new_version"), ref)[0] == []  # consumed again


def test_a_new_shard_sorting_before_consumed_ones_is_learned(tmp_path):
    write_jsonl(tmp_path / "data/2021-09-02.jsonl", rows("b", 2))
    _, _, ref = night(tmp_path, config(tmp_path), None)
    write_jsonl(tmp_path / "data/2021-09-01.jsonl", rows("late", 2))
    learned, plan, ref = night(tmp_path, config(tmp_path), ref)
    assert learned == ["late0", "late1"]
    assert night(tmp_path, config(tmp_path), ref)[0] == []


def test_csv_resumes_from_its_watermark_and_a_settings_change_reads_again(tmp_path):
    shard = tmp_path / "data/a.csv"
    shard.parent.mkdir(parents=True)
    shard.write_text('id,text\nc0,"first\nwith a newline"\nc1,second\n')
    first, _, ref = night(tmp_path, config(tmp_path), None)
    assert first == ["c0", "c1"]
    with open(shard, "a") as f:
        f.write('c2,"third\nspans lines"\nc3,fourth\n')
    ledger = open_ledger(tmp_path, ref)
    stream = DocumentStream(config(tmp_path), watermarks=ledger.watermarks())
    got = list(ledger.unseen(stream, stream.stats))
    assert [(d.id, d.line, d.text) for d in got] == [("c2", 6, "third\nspans lines"), ("c3", 7, "fourth")]
    assert stream.decisions == {str(shard): "resume"}
    stream = DocumentStream(config(tmp_path, text_field="text", max_chars=99), watermarks=ledger.watermarks())
    list(stream)
    assert stream.decisions == {str(shard): "reread"}  # records may mean something else now


def test_a_parquet_shard_fully_consumed_is_skipped_and_a_partly_consumed_one_resumed(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    shard = tmp_path / "data/a.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows("p", 5)), shard)
    cfg = config(tmp_path)
    ledger = open_ledger(tmp_path, None)
    plan = collect_plan(cfg, None, ledger, None, "n", "", max_documents=2)
    assert [d.id for d in plan.new] == ["p0", "p1"]
    ledger.mark(plan.new)
    ref = ledger.commit(tmp_path / "r1.json", "version", "", plan.published_watermarks(ledger.seen))
    learned, _, ref = night(tmp_path, cfg, ref)
    assert learned == ["p2", "p3", "p4"]
    ledger = open_ledger(tmp_path, ref)
    stream = DocumentStream(cfg, watermarks=ledger.watermarks())
    assert list(stream) == [] and stream.decisions == {str(shard): "skip"}


def test_a_planned_document_not_learned_keeps_its_shard_before_it(tmp_path):
    shard = write_jsonl(tmp_path / "data/a.jsonl", rows("a", 2))
    _, _, ref = night(tmp_path, config(tmp_path), None)
    write_jsonl(shard, rows("a", 3, start=2), mode="a")
    ledger = open_ledger(tmp_path, ref)
    plan = collect_plan(config(tmp_path), None, ledger, None, "n", "")
    ledger.mark([d for d in plan.new if d.id != "a3"])  # a3's step was skipped (non-finite)
    ref = ledger.commit(tmp_path / "r2.json", "version", "", plan.published_watermarks(ledger.seen))
    assert night(tmp_path, config(tmp_path), ref)[0] == ["a3"]


def test_the_fingerprint_covers_the_prefix_length_and_samples_large_prefixes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(50 * BLOCK))
    a = prefix_fingerprint(path, 30 * BLOCK)
    assert a == prefix_fingerprint(path, 30 * BLOCK) and a != prefix_fingerprint(path, 30 * BLOCK - 1)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert prefix_fingerprint(path, 30 * BLOCK) != a


# ---------------------------------------------------------------------------------------------
# the id store


def doc(i: str, text: str = "t") -> Document:
    return Document(i, text, "s", 1)


def test_store_states_are_references_and_an_unnamed_commit_is_dropped(tmp_path):
    store = IdStore(tmp_path / STORE_FILE)
    store.mark([doc("a"), doc("b")])
    r1 = store.commit(tmp_path / "v1.json", "version", "v1")
    assert json.loads(r1.read_text())["format"] == "ckl-ledger/3"
    run = open_ledger(tmp_path, r1)
    run.mark([doc("c")])
    run.commit(tmp_path / "orphan.json", "checkpoint", "killed before its checkpoint was renamed")
    again = open_ledger(tmp_path, r1)  # the served state does not hold c
    assert again.seen("a") and not again.seen("c") and len(again) == 2
    again.mark([doc("d"), doc("a")])  # a: already there, not a second row
    r2 = again.commit(tmp_path / "v2.json", "version", "v2")
    assert open_ledger(tmp_path, r2).ids() == ["a", "b", "d"] and len(open_ledger(tmp_path, r2)) == 3
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM ids").fetchone()[0] == 3  # c's row was deleted
    with pytest.raises(ValueError, match="holds no ledger state"):
        open_ledger(tmp_path, tmp_path / "orphan.json")  # its state was dropped: an error, never empty
    assert open_ledger(tmp_path, r1).ids() == ["a", "b"]  # an older version's state still reads


def test_a_checkpoint_commit_writes_its_rows_not_the_history(tmp_path):
    store = IdStore(tmp_path / STORE_FILE)
    store.mark([doc(f"h{i}") for i in range(20_000)])
    store.commit(tmp_path / "v1.json", "version", "")
    size = (tmp_path / STORE_FILE).stat().st_size
    store.mark([doc("new")])
    store.commit(tmp_path / "c.json", "checkpoint", "")
    assert (tmp_path / STORE_FILE).stat().st_size - size < 64 * 1024  # pages touched, not a copy
    assert (tmp_path / "c.json").stat().st_size < 300


@pytest.mark.parametrize("fmt", ["ckl-ledger/1", "ckl-ledger/2"])
def test_a_json_ledger_is_migrated_once_and_read_only_opens_do_not_write(tmp_path, fmt):
    old = tmp_path / "versions/v000001/ledger.json"
    old.parent.mkdir(parents=True)
    ids = ["a", "b"] if fmt == "ckl-ledger/1" else {"a": None, "b": "0123456789abcdef"}
    old.write_text(json.dumps({"format": fmt, "count": 2, "ids": ids}))
    dry = open_ledger(tmp_path, old, readonly=True)
    assert dry.seen("a") and not (tmp_path / STORE_FILE).exists()
    ledger = open_ledger(tmp_path, old)
    assert ledger.seen("a") and ledger.seen(doc("b")) and not ledger.seen("c")
    assert ledger.changed(doc("b", "other text")) == (fmt == "ckl-ledger/2")
    assert open_ledger(tmp_path, old).seq == ledger.seq  # found again, not migrated twice
    ledger.mark([doc("c")])
    ref = ledger.commit(tmp_path / "v2.json", "version", "")
    assert open_ledger(tmp_path, ref).ids() == ["a", "b", "c"]


def test_a_damaged_or_missing_store_is_an_error_never_an_empty_ledger(tmp_path):
    store = IdStore(tmp_path / STORE_FILE)
    store.mark([doc("a")])
    ref = store.commit(tmp_path / "v.json", "version", "")
    store.close()
    (tmp_path / STORE_FILE).write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="unreadable ledger store"):
        open_ledger(tmp_path, ref)
    (tmp_path / STORE_FILE).unlink()
    with pytest.raises(ValueError, match="missing"):
        open_ledger(tmp_path, ref)
    with pytest.raises(ValueError, match="missing"):
        open_ledger(tmp_path, tmp_path / "versions/v000009/ledger.json")


# ---------------------------------------------------------------------------------------------
# the pool


def test_the_pool_is_a_seeded_reservoir_in_pool_order_or_the_whole_pool(tmp_path):
    write_jsonl(tmp_path / "pool/p.jsonl", rows("p", 50))
    cfg = StreamConfig(paths=[str(tmp_path / "pool")], on_error="fatal")
    a, b = (sample_pool(cfg, 5, "pool:0:1", {}) for _ in range(2))
    assert [d.id for d in a] == [d.id for d in b] and len(a) == 5
    assert [d.line for d in a] == sorted(d.line for d in a)
    assert [d.id for d in sample_pool(cfg, 5, "pool:0:2", {})] != [d.id for d in a]  # another night
    assert [d.id for d in sample_pool(cfg, 0, "x", {})] == [f"p{i}" for i in range(50)]
    assert [d.id for d in sample_pool(cfg, 80, "x", {})] == [f"p{i}" for i in range(50)]
    counts = [0] * 10  # each item is kept with probability k/n
    for seed in range(2000):
        for i, _ in reservoir_sample(range(10), 3, __import__("random").Random(seed)):
            counts[i] += 1
    assert all(abs(c / 2000 - 0.3) < 0.05 for c in counts)


# ---------------------------------------------------------------------------------------------
# ckl update end to end


def run_update(recipe_path: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKL_TEST_FAULT": fault or "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ckl_toolkit.update", "--recipe", str(recipe_path)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300)


def test_killed_between_the_store_commit_and_the_checkpoint_rename_resumes_to_the_same_model(
    tmp_path, tiny_lm_dir
):
    data = write_jsonl(tmp_path / "data/a.jsonl", facts("k", 8)).parent
    ref = update(make_recipe(tmp_path / "ref", tiny_lm_dir, "batching.batch_size=2", data=data))
    recipe = make_recipe(tmp_path / "kill", tiny_lm_dir, "batching.batch_size=2", "save_every=2", data=data)
    path = tmp_path / "kill.yaml"
    path.write_text(to_yaml(recipe))
    assert run_update(path, "ledger_committed").returncode == 137
    plan = json.loads((tmp_path / "kill/out/work" / PLAN_FILE).read_text())
    assert plan["new"] and all("text" not in d and d["offset"] is not None for d in plan["new"])

    # a planned document edited under the run: it refuses to resume over other texts (exit 2)
    original = (data / "a.jsonl").read_bytes()
    lines = original.splitlines(keepends=True)
    lines[3] = lines[3].replace(b"now lives", b"now works")  # k3's text, same length
    (data / "a.jsonl").write_bytes(b"".join(lines))
    failed = run_update(path)
    assert failed.returncode == ExitCode.BAD_INPUT and b"a.jsonl:4" in failed.stderr
    (data / "a.jsonl").write_bytes(original)

    assert run_update(path).returncode == 0
    want, got = published_tensors(tmp_path / "ref/out"), published_tensors(tmp_path / "kill/out")
    assert all(torch.equal(want[k], got[k]) for k in want)
    version = current_version(tmp_path / "kill/out")
    assert ledger_ids(version) == sorted(f"k{i}" for i in range(8)) and ref.documents == 8


def test_a_version_with_a_first_format_ledger_is_migrated_and_only_new_documents_are_learned(
    tmp_path, tiny_lm_dir
):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 4))
    r = make_recipe(tmp_path, tiny_lm_dir)
    assert update(r).exit_code == ExitCode.OK
    (v1,) = list_versions(tmp_path / "out")
    # as an older ckl-toolkit published it: a full id list, and no store
    (v1 / "ledger.json").write_text(json.dumps({"format": "ckl-ledger/1", "count": 4, "ids": ledger_ids(v1)}))
    (tmp_path / "out" / STORE_FILE).unlink()
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 2, start=4), mode="a")
    second = update(r)
    assert second.exit_code == ExitCode.OK and second.documents == 2
    assert second.stream["skipped"]["seen"] == 4  # read whole once (no watermarks yet), ids skipped
    assert ledger_ids(current_version(tmp_path / "out")) == [f"a{i}" for i in range(6)]
    write_jsonl(tmp_path / "data/b.jsonl", facts("b", 1))
    third = update(r)
    assert third.documents == 1 and third.stream["skipped"]["seen"] == 6  # a.jsonl skipped unopened
    assert update(r).exit_code == ExitCode.NOTHING_TO_DO


def test_a_night_with_nothing_new_keeps_what_it_read_consumed(tmp_path, tiny_lm_dir, caplog):
    shard = write_jsonl(tmp_path / "data/a.jsonl", facts("a", 2))
    r = make_recipe(tmp_path, tiny_lm_dir)
    assert update(r).exit_code == ExitCode.OK
    write_jsonl(shard, facts("a", 2)[::-1])  # rewritten, nothing new: rescanned once
    with caplog.at_level(logging.WARNING):
        assert update(r).exit_code == ExitCode.NOTHING_TO_DO
    assert sum("rescanning" in rec.message for rec in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert update(r).exit_code == ExitCode.NOTHING_TO_DO
    assert not any("rescanning" in rec.message for rec in caplog.records)  # not every night
