"""Dense vs TA-gated sparse updates on a stream where most documents carry no new fact.

    python benchmarks/bench_sparse.py --demo runs/demo_quick --out benchmarks/results/sparse.json

Needs a ``ckl demo`` output (``ckl demo --quick --out runs/demo_quick``): its world, pretrained base and
TA model. The stream: every TO-LEARN evidence document (one new fact each) and, per new document,
``--no-fact`` documents that carry none: the same kind of evidence with its new-fact sentence removed
(filler and restatements of known facts), and biographies of people outside TO-LEARN (facts the base
already knows). Two ``ckl update`` runs train on it with TA weights, the same recipe, seed and epochs:
dense, and with ``weights.sparse`` (token_min_weight, doc_min_mass, weighted_head). For each: stream
tokens per second of training, wall time, learned TO-LEARN facts (exact match on the held-out probe
wording) and NOT-TO-FORGET exact match (the candidates the base completes exactly), and how the TA
weight mass separates new-fact from no-fact documents. One run each; figures depend on the machine
and its load (recorded).
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
from ckl_toolkit.training.step import Sparsity, sparse_rows  # noqa: E402
from ckl_toolkit.training.weighers import TextBatch, ta_source  # noqa: E402
from ckl_toolkit.update import update  # noqa: E402


def strip_fact(row: dict) -> str:
    """The evidence without its new-fact sentence (the one naming both subject and new object)."""
    sents = [s.strip() for s in row["evidence"].split(".") if s.strip()]
    kept = [s for s in sents if not (row["subject"] in s and row["object"] in s)]
    return ". ".join(kept) + "."


def build_stream(world: Path, no_fact: int, seed: int, max_new: int = 0) -> tuple[list[dict], list[dict]]:
    """(stream documents with a ``kind``, TO-LEARN rows), interleaved new / no-fact in a seeded order."""
    import random

    rng = random.Random(seed)
    to_learn = read_jsonl(world / "to_learn.jsonl")
    to_learn = to_learn[:max_new] if max_new else to_learn
    subjects = {r["subject"] for r in to_learn}
    bios = [b for b in read_jsonl(world / "pretrain.jsonl") if not any(s in b["text"] for s in subjects)]
    rng.shuffle(bios)
    docs = [{"id": f"new{i}", "text": r["evidence"], "kind": "new"} for i, r in enumerate(to_learn)]
    for i, r in enumerate(to_learn):  # one stripped evidence per fact, the rest biographies
        docs.append({"id": f"stripped{i}", "text": strip_fact(r), "kind": "no_fact"})
    need = max(0, no_fact * len(to_learn) - len(to_learn))
    if len(bios) < need:
        raise SystemExit(f"{world}: only {len(bios)} biographies outside TO-LEARN, {need} needed")
    docs += [{"id": f"bio{j}", "text": b["text"], "kind": "no_fact"} for j, b in enumerate(bios[:need])]
    rng.shuffle(docs)
    return docs, to_learn


@torch.no_grad()
def weight_mass(ta_path: str, base: str, docs: list[dict], sparsity: Sparsity, max_length: int) -> dict:
    """TA weight mass Σw per document (after token_min_weight), by kind, and what doc_min_mass drops."""
    from ckl_toolkit.core.models import load_tokenizer

    tok = load_tokenizer(base)
    source, _ = ta_source(ta_path, "auto", "max", tok, torch.device("cpu"))
    out: dict[str, list[float]] = {"new": [], "no_fact": []}
    for i in range(0, len(docs), 16):
        chunk = docs[i : i + 16]
        enc = encode(tok, [d["text"] for d in chunk], max_length)
        w = source(TextBatch(enc, [d["text"] for d in chunk]))  # (B, T-1)
        w, keep = sparse_rows(w, target_mask(enc.attention_mask), sparsity)
        for d, m in zip(chunk, (w * target_mask(enc.attention_mask)).sum(1).tolist()):
            out[d["kind"]].append(m)

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
        dropped = sum(x == 0 or x < sparsity.doc_min_mass for x in xs)
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
    p.add_argument("--doc-min-mass", type=float, default=0.5)
    p.add_argument("--nf-limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-new", type=int, default=0, help="only the first N TO-LEARN facts (0: all; smoke tests)"
    )
    args = p.parse_args()
    torch.manual_seed(args.seed)
    docs, to_learn = build_stream(args.demo / "world", args.no_fact, args.seed, args.max_new)
    stream = args.work / "stream.jsonl"
    write_jsonl_atomic(stream, [{"id": d["id"], "text": d["text"]} for d in docs])
    sparsity = Sparsity(args.doc_min_mass, args.token_min_weight, True)
    sparse = [
        f"weights.sparse.token_min_weight={args.token_min_weight}",
        f"weights.sparse.doc_min_mass={args.doc_min_mass}",
        "weights.sparse.weighted_head=true",
    ]
    base, tok, _ = load_model(args.demo / "base")
    nf = select_known(
        base, tok, read_jsonl(args.demo / "world" / "not_to_forget_candidates.jsonl"), limit=args.nf_limit
    )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_before": os.getloadavg(),
        },
        "stream": {"documents": len(docs), "new_fact": len(to_learn), "no_fact": len(docs) - len(to_learn)},
        "base": {"to_learn_em": em(base, tok, to_learn), "nf_em": 1.0, "nf_facts": len(nf)},
        "ta_weight_mass": weight_mass(
            str(args.demo / "meta" / "ta"), str(args.demo / "base"), docs, sparsity, args.max_length
        ),
        "runs": {},
    }
    for mode in ("dense", "sparse"):
        r = run(mode, args, stream, args.work / mode, sparse)
        model, tok, _ = load_model(r["version"])
        r["learned_em"], r["nf_em"] = em(model, tok, to_learn), em(model, tok, nf)
        result["runs"][mode] = r
        print(mode, json.dumps({k: v for k, v in r.items() if k != "overrides"}), flush=True)
    d, s = result["runs"]["dense"], result["runs"]["sparse"]
    result["speedup_tokens_per_s"] = round(s["stream_tokens_per_s"] / d["stream_tokens_per_s"], 2)
    result["speedup_wall"] = round(d["wall_seconds"] / s["wall_seconds"], 2)
    result["machine"]["load_after"] = os.getloadavg()
    write_json_atomic(args.out, result)
    print(
        json.dumps(
            {k: result[k] for k in ("stream", "ta_weight_mass", "speedup_tokens_per_s", "speedup_wall")}
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
