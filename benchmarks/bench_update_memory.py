"""Peak memory and speed of one nightly-update step: the chunked token loss against today's full logits.

The headline recipe (``recipes/temporalwiki.yaml``: SmolLM2-135M-Instruct, LoRA r=64 on every linear
layer, Train-Attention weights from a 4-layer TA, RecAdam, packed rows of 256 tokens) runs a few real
``training.step.weighted_step`` calls per configuration, each configuration in a fresh process so its
peak resident set (``ru_maxrss``) is its own:

    full_logits     loss_chunk=0: the model's own forward, full (B, T, V) fp32 logits (the path before)
    chunked         loss_chunk=1024: LM head + cross-entropy over 1,024 targets at a time
    *_gc            target.gradient_checkpointing=true: each layer's activations recomputed in backward
    *_glibc         glibc's default allocator policy: freed activations stay resident (the process
                    before; the others call ``core.memory.return_freed_memory`` as ``ckl`` does)

Rows are the headline stream (TemporalWiki 0901-1001 changed triples rendered as sentences, packed),
so every row is full. tokens/s = real tokens per second of the steps after the first (the first pays
one-time costs); both are in the JSON. Read the figures with the machine's load (``loadavg``).

    python benchmarks/bench_update_memory.py                      # ~10 min on 2 cores
    python benchmarks/bench_update_memory.py --configs chunked_gc_b16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (loss_chunk, gradient_checkpointing, rows per batch, freed memory returned)
    "full_logits_glibc_b4": (0, False, 4, False),  # the path before, at a batch that fits
    "chunked_b4": (1024, False, 4, True),
    "chunked_gc_b4": (1024, True, 4, True),
    "full_logits_gc_b16": (0, True, 16, True),
    "chunked_gc_glibc_b16": (1024, True, 16, False),
    "chunked_gc_b16": (1024, True, 16, True),  # the headline recipe's step
    "full_logits_glibc_b16": (0, False, 16, False),  # the path before at 16 x 256: ~12.5 GB, opt-in only
}
DEFAULT = [
    "full_logits_glibc_b4",
    "chunked_b4",
    "chunked_gc_b4",
    "full_logits_gc_b16",
    "chunked_gc_glibc_b16",
    "chunked_gc_b16",
]
STREAM = ROOT.parent / "shared/data/temporalwiki/0901-1001_changed.jsonl"
SENTENCE = "The {relation} of {subject} is {object}."


def rss_mb() -> float:
    """Peak resident set of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def documents(n: int):
    from ckl_toolkit.core.documents import Document

    if STREAM.is_file():
        rows = [json.loads(line) for line in STREAM.open()][:n]
        texts = [SENTENCE.format(**r) for r in rows]
    else:  # no shared data: sentences of the same shape
        texts = [f"The occupation of Person {i} is writer number {i}." for i in range(n)]
    return [Document(f"d{i}", t, "stream", i + 1) for i, t in enumerate(texts)]


def child(args: argparse.Namespace) -> dict:
    """One configuration in this process: build the headline learner, run ``args.steps`` steps."""
    import torch

    from ckl_toolkit.core.memory import return_freed_memory
    from ckl_toolkit.core.ta_model import build_ta_model, save_ta_model
    from ckl_toolkit.training.batching import batches
    from ckl_toolkit.training.learner import build_learner
    from ckl_toolkit.training.sections import OptimSpec, TargetSpec, WeightSpec
    from ckl_toolkit.training.step import NonFiniteGuard, weighted_step

    torch.set_num_threads(args.threads)
    chunk, gc, rows, give_back = CONFIGS[args.child]
    if give_back:
        return_freed_memory()
    ta = args.ta
    if ta is None:  # an untrained 4-layer TA of the same shape (its weights do not change the cost)
        from transformers import AutoTokenizer

        ta = tempfile.mkdtemp(prefix="bench_ta_")
        save_ta_model(build_ta_model(args.model, 4), ta, AutoTokenizer.from_pretrained(args.model))
    target = TargetSpec(path=args.model, kind="lora", gradient_checkpointing=gc)
    target.lora.r, target.lora.alpha = 64, 16
    optim = OptimSpec(name="recadam", lr=1e-4)
    optim.recadam.t0, optim.recadam.k = 0.0, 0.5
    weights = WeightSpec(method="taalm", ta_path=ta)
    t0 = time.perf_counter()
    learner = build_learner(target, weights, optim, None, 0, torch.device("cpu"))
    load_s, rss_loaded = time.perf_counter() - t0, current_rss_mb()
    docs = documents(40 * rows * (args.steps + 1))
    it = batches(docs, learner.tokenizer, 256, rows, pack=True)
    guard, times, tokens = NonFiniteGuard(), [], []
    for _ in range(args.steps):
        batch = next(it)
        t = time.perf_counter()
        res = weighted_step(
            learner.engine, batch, learner.weigher, learner.tokenizer, guard, loss_chunk=chunk
        )
        times.append(time.perf_counter() - t)
        tokens.append(batch.tokens)
        assert res.applied, "non-finite loss"
    later = slice(1, None) if len(times) > 1 else slice(0, None)
    return {
        "config": args.child,
        "loss_chunk": chunk,
        "gradient_checkpointing": gc,
        "freed_memory_returned": give_back,
        "batch": f"{rows}x256",
        "steps": args.steps,
        "step_seconds": [round(x, 2) for x in times],
        "tokens_per_step": tokens,
        "tokens_per_s": round(sum(tokens[later]) / sum(times[later]), 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_after_load_mb": round(rss_loaded, 1),
        "load_seconds": round(load_s, 1),
        "loss": res.loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models/smollm2-135m"))
    parser.add_argument("--ta", default=None, help="A TA model dir (default: an untrained 4-layer TA)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT, choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/update_memory.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    results = []
    for name in args.configs:  # one fresh process each: its peak RSS is its own
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ] + (["--ta", args.ta] if args.ta else [])
        load = os.getloadavg()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            result = {"config": name, "error": proc.stderr[-2000:], "returncode": proc.returncode}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["loadavg_before"] = [round(x, 2) for x in load]
        results.append(result)
        print(json.dumps(result), flush=True)
    out = {
        "benchmark": "update_memory",
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
