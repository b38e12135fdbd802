"""Dense vs TA-gated sparse updates on a stream where most documents carry no new fact.

    python benchmarks/bench_sparse.py --demo runs/demo --out benchmarks/results/sparse.json

Needs a ``ckl demo`` output (``ckl demo`` or ``ckl demo --quick --out DIR``): its world, pretrained
base and TA model. A stream holds every TO-LEARN evidence document (one new fact each) and, per new
document, ``--no-fact`` documents that carry none, of one of two kinds:

    chatter  fact-free filler (the world's filler sentences, 12 a document, as long as an evidence
             document's filler): what most of a news or web crawl is
    known    biographies of people outside TO-LEARN: facts the base already knows

Two ``ckl update`` runs train on each stream with TA weights, the same recipe, seed and epochs: dense,
and with ``weights.sparse`` (token_min_weight, doc_min_mass, weighted_head). For each: stream tokens
per second of training, wall time, rows dropped, learned TO-LEARN facts (exact match on the held-out
probe wording) and NOT-TO-FORGET exact match (candidates the base completes exactly), and how the TA
weight mass separates new-fact from no-fact documents. One run each; figures depend on the machine and
its load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ckl_toolkit.core.config import load_recipe  # noqa: E402
from ckl_toolkit.core.io import read_jsonl, write_json_atomic, write_jsonl_atomic  # noqa: E402
from ckl_toolkit.core.losses import target_mask  # noqa: E402
from ckl_toolkit.core.text import encode  # noqa: E402
from ckl_toolkit.evaluation.not_to_forget import select_known  # noqa: E402
from ckl_toolkit.evaluation.probes import score_probes  # noqa: E402
from ckl_toolkit.nightly.config import UpdateRecipe  # noqa: E402
from ckl_toolkit.nightly.contract import current_version  # noqa: E402
from ckl_toolkit.nightly.export import load_model  # noqa: E402
from ckl_toolkit.training.step import Sparsity, row_mass, sparse_rows  # noqa: E402
from ckl_toolkit.training.weighers import TextBatch, ta_source  # noqa: E402
from ckl_toolkit.update import update  # noqa: E402


def filler_only(row: dict, fillers: set[str]) -> str:
    """The evidence without its new fact and without its restatements: only the filler chatter."""
    sents = [s.strip() for s in row["evidence"].split(".") if s.strip()]
    return ". ".join(s for s in sents if s in fillers) + "."


def fact_sentences(world: Path) -> set[str]:
    """Every sentence that states a fact (pretraining biographies hold one filler sentence each)."""
    out = set()
    for b in read_jsonl(world / "pretrain.jsonl"):
        out.update(s.strip() for s in b["text"].split(".") if s.strip())
    for r in read_jsonl(world / "to_learn.jsonl"):
        out.update(s.strip() for s in r["evidence"].split(".") if r["object"] in s and r["subject"] in s)
    return out


def build_stream(
    world: Path, no_fact: int, kind: str, seed: int, max_new: int = 0
) -> tuple[list[dict], list[dict]]:
    """(stream documents with a ``kind``, TO-LEARN rows): every new-fact document and ``no_fact`` others each.

    kind "chatter": the no-fact documents are evidence filler alone (no fact, new or known);
    kind "known": biographies of people outside TO-LEARN (facts the base already knows).
    """
    import random

    rng = random.Random(seed)
    to_learn = read_jsonl(world / "to_learn.jsonl")
    to_learn = to_learn[:max_new] if max_new else to_learn
    docs = [{"id": f"new{i}", "text": r["evidence"], "kind": "new"} for i, r in enumerate(to_learn)]
    need = no_fact * len(to_learn)
    if kind == "chatter":
        facts = fact_sentences(world)
        rows = read_jsonl(world / "to_learn.jsonl")
        fillers = {
            s.strip() for r in rows for s in r["evidence"].split(".") if s.strip() and s.strip() not in facts
        }
        texts = [filler_only(r, fillers) for r in rows]
        texts = [t for t in texts if len(t) > 40]
        rng.shuffle(texts)
        # as long as an evidence document's filler: 12 filler sentences drawn from the whole pool
        pool = sorted({sent.rstrip(".") for t in texts for sent in t.split(". ")})
        texts = [". ".join(rng.sample(pool, 12)) + "." for _ in range(need)]
    else:
        subjects = {r["subject"] for r in read_jsonl(world / "to_learn.jsonl")}
        bios = [
            b["text"]
            for b in read_jsonl(world / "pretrain.jsonl")
            if not any(x in b["text"] for x in subjects)
        ]
        rng.shuffle(bios)
        if len(bios) < need:
            raise SystemExit(f"{world}: only {len(bios)} biographies outside TO-LEARN, {need} needed")
        texts = bios[:need]
    docs += [{"id": f"{kind}{j}", "text": t, "kind": "no_fact"} for j, t in enumerate(texts)]
    rng.shuffle(docs)
    return docs, to_learn


@torch.no_grad()
def weight_mass(ta_path: str, base: str, docs: list[dict], sparsity: Sparsity, max_length: int) -> dict:
    """TA weight mass Σw per document (after token_min_weight), by kind, and what doc_min_mass drops."""
    from ckl_toolkit.core.models import load_tokenizer

    tok = load_tokenizer(base)
    source, _ = ta_source(ta_path, "auto", "max", tok, torch.device("cpu"))
    out: dict[str, list[tuple[float, bool]]] = {"new": [], "no_fact": []}
    for i in range(0, len(docs), 16):
        chunk = docs[i : i + 16]
        enc = encode(tok, [d["text"] for d in chunk], max_length)
        w = source(TextBatch(enc, [d["text"] for d in chunk]))  # (B, T-1)
        real = target_mask(enc.attention_mask)
        w, keep = sparse_rows(w, real, sparsity)
        for d, m, k in zip(chunk, row_mass(w, real, sparsity).tolist(), keep.tolist()):
            out[d["kind"]].append((m, k))

    def stats(rows: list[tuple[float, bool]]) -> dict:
        xs = sorted(m for m, _ in rows)
        q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
        dropped = sum(not k for _, k in rows)
        return {
            "n": len(xs),
            "min": xs[0],
            "p10": q(0.1),
            "median": q(0.5),
            "p90": q(0.9),
            "max": xs[-1],
            "dropped": dropped,
        }

    return {kind: stats(xs) for kind, xs in out.items()}


def em(model, tok, rows: list[dict]) -> float:
    s = score_probes(model, tok, [r["task_descriptive"] for r in rows], [r["object"] for r in rows])
    return s.em


def run(mode: str, args, stream: Path, out: Path, sparse: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"output_dir={out}",
        f"target.path={args.demo / 'base'}",
        "weights.method=taalm",
        f"weights.ta_path={args.demo / 'meta' / 'ta'}",
        f"data.stream={{paths: [{stream}], quarantine_dir: {out / 'quarantine'}}}",
        f"epochs={args.epochs}",
        f"optim.lr={args.lr}",
        f"batching.batch_size={args.batch_size}",
        f"batching.max_length={args.max_length}",
        "batching.shuffle=true",
        "progress=false",
        "save_every=0",
        "keep_checkpoints=1",
        f"seed={args.seed}",
        "log_every=1000",
    ] + (sparse if mode == "sparse" else [])
    recipe = load_recipe(UpdateRecipe, None, overrides)
    t0 = time.perf_counter()
    summary = update(recipe)
    wall = time.perf_counter() - t0
    assert summary.exit_code == 0, summary.exit_code
    return {
        "overrides": overrides,
        "wall_seconds": round(wall, 2),
        "train_seconds": summary.train_seconds,
        "cpu_seconds": summary.cpu_seconds,
        "stream_tokens": summary.planned_tokens,
        "stream_tokens_per_s": round(summary.planned_tokens / max(summary.train_seconds, 1e-9), 1),
        "steps": summary.steps,
        "empty_steps": summary.empty_steps,
        "rows_dropped": summary.rows_dropped,
        "documents_learned": summary.documents_learned,
        "version": str(current_version(out)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=Path("runs/demo_quick"), help="a `ckl demo` output dir")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse.json"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_sparse"))
    p.add_argument("--no-fact", type=int, default=4, help="no-fact documents per new-fact document")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--token-min-weight", type=float, default=0.5)
    p.add_argument("--doc-min-mass", type=float, default=3.0)
    p.add_argument(
        "--doc-token-weight", type=float, default=0.0, help="count only these tokens in a row's mass"
    )
    p.add_argument("--skip-dense", type=Path, default=None, help="reuse the dense runs of this earlier JSON")
    p.add_argument("--nf-limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--streams",
        nargs="+",
        default=["chatter", "known"],
        choices=["chatter", "known"],
        help="no-fact documents: fact-free filler chatter, and/or biographies of known facts",
    )
    p.add_argument(
        "--max-new", type=int, default=0, help="only the first N TO-LEARN facts (0: all; smoke tests)"
    )
    args = p.parse_args()
    torch.manual_seed(args.seed)
    sparsity = Sparsity(args.doc_min_mass, args.token_min_weight, True, args.doc_token_weight)
    sparse = [
        f"weights.sparse.token_min_weight={args.token_min_weight}",
        f"weights.sparse.doc_min_mass={args.doc_min_mass}",
        f"weights.sparse.doc_token_weight={args.doc_token_weight}",
        "weights.sparse.weighted_head=true",
    ]
    base, tok, _ = load_model(args.demo / "base")
    nf_rows = read_jsonl(args.demo / "world" / "not_to_forget_candidates.jsonl")
    nf = select_known(base, tok, nf_rows, limit=args.nf_limit)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_before": os.getloadavg(),
        },
        "demo": str(args.demo),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "nf_facts": len(nf),
        "streams": {},
    }
    for kind in args.streams:
        docs, to_learn = build_stream(args.demo / "world", args.no_fact, kind, args.seed, args.max_new)
        stream = args.work / kind / "stream.jsonl"
        write_jsonl_atomic(stream, [{"id": d["id"], "text": d["text"]} for d in docs])
        entry = {
            "documents": len(docs),
            "new_fact": len(to_learn),
            "no_fact": len(docs) - len(to_learn),
            "base_to_learn_em": em(base, tok, to_learn),
            "ta_weight_mass": weight_mass(
                str(args.demo / "meta" / "ta"), str(args.demo / "base"), docs, sparsity, args.max_length
            ),
            "runs": {},
        }
        earlier = json.loads(args.skip_dense.read_text())["streams"].get(kind) if args.skip_dense else None
        if earlier is not None:  # the same stream and recipe: its dense run is not repeated
            entry["runs"]["dense"] = earlier["runs"]["dense"]
        for mode in ("dense", "sparse"):
            if mode in entry["runs"]:
                continue
            r = run(mode, args, stream, args.work / kind / mode, sparse)
            model, mtok, _ = load_model(r["version"])
            r["learned_em"], r["nf_em"] = em(model, mtok, to_learn), em(model, mtok, nf)
            entry["runs"][mode] = r
            print(kind, mode, json.dumps({k: v for k, v in r.items() if k != "overrides"}), flush=True)
        d, sp = entry["runs"]["dense"], entry["runs"]["sparse"]
        entry["speedup_tokens_per_s"] = round(sp["stream_tokens_per_s"] / d["stream_tokens_per_s"], 2)
        entry["speedup_wall"] = round(d["wall_seconds"] / sp["wall_seconds"], 2)
        result["streams"][kind] = entry
        print(
            kind,
            json.dumps({k: entry[k] for k in ("ta_weight_mass", "speedup_tokens_per_s", "speedup_wall")}),
        )
    result["machine"]["load_after"] = os.getloadavg()
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
