"""A night's planning cost against the size of the history: 1,000 new documents over 10k to 10M learned.

For each history size H the script generates H documents (``--chars`` characters of text each) in
JSONL shards of ``--shard-docs`` documents, then builds the state a long-running deployment would
have: one pass of the real stream (``DocumentStream`` with watermarks) whose ids go to the real id
store (``IdStore``, committed every 500k ids) and whose watermarks are committed last. That setup is
timed but is not the figure. Then the night: 500 documents appended to the last shard and 500 in a
new shard, and, in a fresh process each time (so ``ru_maxrss`` is the night's own):

    plan_s               open the served ledger state and ``collect_plan`` (what ``ckl update`` runs
                         before its first step: watermark decisions, parsing what is new, id lookups)
    peak_rss_mb          that process's peak resident set
    checkpoint_bytes     bytes written (``/proc/self/io`` wchar: store, journal, reference) by one
                         step checkpoint of 8 documents, the mean of 5
    version_bytes        the same for the publish commit (the night's ids and watermarks)
    store_mb             the id store's size

``--baseline-upto`` also times the pass before this change (a JSON ``ckl-ledger/2`` ledger, every
shard read from its first line) for histories up to that size, in the same kind of process.

    python benchmarks/bench_stream_scale.py                            # 10k, 1M, 10M; ~15 min on 2 cores
    python benchmarks/bench_stream_scale.py --histories 10000 100000 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the river city council museum station library harbour bridge winter summer election minister "
    "company founded located population railway university professor season album released born"
).split()


def rss_mb() -> float:
    """Peak resident set of this process (VmHWM: ru_maxrss would carry the parent's over fork+exec)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


@functools.lru_cache
def fillers(chars: int, n: int = 997) -> list[str]:
    """n texts of about ``chars`` characters drawn from WORDS (JSON-safe: plain words and spaces)."""
    out = []
    for k in range(n):
        words, x = [], k + 1
        while sum(map(len, words)) + len(words) < chars:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            words.append(WORDS[x % len(WORDS)])
        out.append(" ".join(words)[:chars])
    return out


def write_shard(path: Path, start: int, n: int, chars: int, mode: str = "w") -> None:
    """n JSONL documents, formatted directly (no json.dumps) and written in 4 MB chunks: a fast writer,
    so 10M documents take about a minute. Ids are unique; texts start with the index, so they differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = fillers(max(chars - 20, 1))
    with open(path, mode, encoding="utf-8", buffering=1 << 22) as f:
        f.writelines(
            f'{{"id": "d{i:09d}", "text": "Document {i}: {texts[i % len(texts)]}"}}\n'
            for i in range(start, start + n)
        )


def generate(data: Path, history: int, shard_docs: int, chars: int) -> list[Path]:
    shards = []
    for k, start in enumerate(range(0, history, shard_docs)):
        shards.append(data / f"shard-{k:06d}.jsonl")
        write_shard(shards[-1], start, min(shard_docs, history - start), chars)
    return shards


def stream_config(out: Path, data: Path):
    """The stream as a recipe gives it (bad records quarantined); history and night read it alike."""
    from ckl_toolkit.nightly.sources import StreamConfig

    return StreamConfig(paths=[str(data)], quarantine_dir=str(out / "quarantine"))


def build_history(out: Path, data: Path) -> Path:
    """The served state after the history was learned: every id in the store, every shard's watermark."""
    from ckl_toolkit.nightly.idstore import open_ledger
    from ckl_toolkit.nightly.sources import DocumentStream

    ledger = open_ledger(out, None)
    stream = DocumentStream(stream_config(out, data), watermarks={})
    ref = out / "versions/v000001/ledger.json"
    for n, doc in enumerate(stream, start=1):
        ledger.mark([doc])
        if n % 500_000 == 0:
            ledger.commit(out / "work/ledger.json", "checkpoint", f"history {n}")
    ledger.commit(ref, "version", "history", stream.new_watermarks())
    return ref


def night(out: Path, data: Path, ref: Path, checkpoints: int) -> dict:
    """One night's planning and commits (run in a fresh process)."""
    from ckl_toolkit.nightly.idstore import open_ledger
    from ckl_toolkit.nightly.plan import collect_plan

    base_rss = rss_mb()
    t0 = time.perf_counter()
    ledger = open_ledger(out, ref)
    plan = collect_plan(stream_config(out, data), None, ledger, None, "bench", "")
    plan_s = time.perf_counter() - t0
    peak = rss_mb()
    work = out / "work-bench"
    wrote = []
    for k in range(checkpoints):
        ledger.mark(plan.new[8 * k : 8 * k + 8])
        before = wchar()
        ledger.commit(work / f"step_{k}/ledger.json", "checkpoint", "bench")
        wrote.append(wchar() - before)
    ledger.mark(plan.new)
    before = wchar()
    ledger.commit(work / "version/ledger.json", "version", "bench", plan.published_watermarks(ledger.seen))
    version_bytes = wchar() - before
    shutil.rmtree(work)
    return {
        "plan_s": round(plan_s, 3),
        "peak_rss_mb": round(peak, 1),
        "rss_after_imports_mb": round(base_rss, 1),
        "new_documents": len(plan.new),
        "seen_reported": plan.stream_stats["skipped"].get("seen", 0),
        "checkpoint_bytes": round(statistics.mean(wrote)),
        "version_bytes": version_bytes,
    }


def baseline(out: Path, data: Path) -> dict:
    """The pass before watermarks: a JSON ledger of every id, every shard read from its first line."""
    from ckl_toolkit.nightly.ledger import DocumentLedger
    from ckl_toolkit.nightly.plan import collect_plan

    t0 = time.perf_counter()
    ledger = DocumentLedger(out / "baseline-ledger.json")
    plan = collect_plan(stream_config(out, data), None, ledger, None, "bench", "")
    plan_s = time.perf_counter() - t0
    ledger.mark(plan.new[:8])
    t1 = time.perf_counter()
    before = wchar()
    ledger.commit(out / "baseline-ckpt.json")
    return {
        "plan_s": round(plan_s, 3),
        "peak_rss_mb": round(rss_mb(), 1),
        "new_documents": len(plan.new),
        "checkpoint_bytes": wchar() - before,
        "checkpoint_s": round(time.perf_counter() - t1, 3),
    }


def child(kind: str, out: Path, data: Path, ref: Path | None, checkpoints: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(out), "--data", str(data)]
    cmd += ["--ref", str(ref or ""), "--checkpoints", str(checkpoints)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_history(args, history: int) -> dict:
    root = Path(args.workdir) / f"h{history}"
    shutil.rmtree(root, ignore_errors=True)
    data, out = root / "data", root / "out"
    t0 = time.perf_counter()
    shards = generate(data, history, args.shard_docs, args.chars)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = build_history(out, data)
    build_s = time.perf_counter() - t0
    if history <= args.baseline_upto:  # the JSON ledger of the history, as the code before wrote it
        from ckl_toolkit.nightly.ledger import DocumentLedger
        from ckl_toolkit.nightly.sources import DocumentStream

        legacy = DocumentLedger(out / "baseline-ledger.json")
        legacy.mark(DocumentStream(stream_config(out, data)))
        legacy.commit()
    half = args.new // 2  # the night: appended to the last shard, and a new shard
    write_shard(shards[-1], history, half, args.chars, mode="a")
    write_shard(data / f"shard-{len(shards):06d}.jsonl", history + half, args.new - half, args.chars)
    nights = [child("night", out, data, ref, args.checkpoints) for _ in range(args.repeats)]
    row = {
        "history": history,
        "shards": len(shards) + 1,
        "data_gb": round(sum(p.stat().st_size for p in data.iterdir()) / 1e9, 3),
        "generate_s": round(gen_s, 1),
        "history_build_s": round(build_s, 1),
        "store_mb": round((out / "ledger.sqlite").stat().st_size / 1e6, 1),
        "night": {
            "plan_s": statistics.median(n["plan_s"] for n in nights),
            "plan_s_runs": [n["plan_s"] for n in nights],
            **{k: v for k, v in nights[0].items() if k not in ("plan_s",)},
            "peak_rss_mb": max(n["peak_rss_mb"] for n in nights),
        },
    }
    if history <= args.baseline_upto:
        row["before"] = child("baseline", out, data, None, 0)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    p.add_argument("--new", type=int, default=1000, help="new documents per night")
    p.add_argument("--chars", type=int, default=300, help="characters of text per document")
    p.add_argument("--shard-docs", type=int, default=10_000)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="night processes per history (median time)")
    p.add_argument("--baseline-upto", type=int, default=1_000_000)
    p.add_argument("--workdir", default="/tmp/ckl_stream_scale")
    p.add_argument("--keep", action="store_true", help="keep the generated shards and stores")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/stream_scale.json"))
    p.add_argument("--child", choices=["night", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        root, data = Path(args.root), Path(args.data)
        if args.child == "night":
            print(json.dumps(night(root, data, Path(args.ref), args.checkpoints)))
        else:
            print(json.dumps(baseline(root, data)))
        return
    rows = [run_history(args, h) for h in args.histories]
    small, large = rows[0]["night"], rows[-1]["night"]
    result = {
        "benchmark": "bench_stream_scale",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "loadavg_end": os.getloadavg(),
        "settings": {k: getattr(args, k) for k in ("new", "chars", "shard_docs", "checkpoints", "repeats")},
        "rows": rows,
        "ratio_largest_to_smallest": {
            "histories": [rows[0]["history"], rows[-1]["history"]],
            "plan_s": round(large["plan_s"] / small["plan_s"], 2),
            "peak_rss_mb": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_largest_to_smallest"]))


if __name__ == "__main__":
    main()
