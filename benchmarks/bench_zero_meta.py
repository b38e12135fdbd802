"""Meta-step time and per-rank memory of ZeRO-3 meta-training: 1 vs 2 ranks, replicated vs partitioned base.

Each configuration is a fresh ``torch.distributed.run`` launch (gloo, DeepSpeed on CPU, or a GPU
where there is one). Every rank builds what ``meta.py`` builds for it (the base, replicated or
ZeRO-3-partitioned with a per-rank LoRA set; φ as a ZeRO-3 engine), runs ``--steps`` meta-steps on
its share of a fixed meta-batch, and reports:

- ``model_state_bytes``: what the rank holds between steps (φ's parameter shard, fp32 master copy,
  gradient buffer and AdamW state; the base's parameters or shard, plus LoRA). This is the figure
  the target is about: with the partitioned base, 2 ranks must hold at most 0.6x of 1 rank.
- ``peak_rss_mb``: the process's VmHWM over the meta-steps (reset with clear_refs before them),
  i.e. everything: the interpreter and libraries (~0.5 GB), activations, gathered layers;
  ``peak_rss_with_loading_mb`` is the VmHWM before that reset (model loading included).
- ``base_peak_gathered_fraction``: the largest share of the partitioned base gathered at once
  during the meta-steps (1.0 for a replicated base);
- ``step_s``: the median wall time of a meta-step after one warm-up step.

    python benchmarks/bench_zero_meta.py --out benchmarks/results/zero_meta.json     # ~2-4 min on CPU
    python benchmarks/bench_zero_meta.py --quick --out /tmp/z.json                  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # base and φ share the architecture (φ = the base's trunk + a 1-unit head)
    "full": {"hidden": 512, "layers": 4, "heads": 8, "intermediate": 1024, "vocab": 8000, "B": 4, "T": 96},
    "quick": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab": 1000, "B": 4, "T": 32},
}
CONFIGS = [(1, False), (2, False), (1, True), (2, True)]  # (ranks, partition_base)


def build_model_dir(path: Path, size: dict) -> None:
    """A random Llama of ``size`` with a BPE tokenizer trained on a few sentences."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckl_toolkit.data.tokenizer import train_bpe_tokenizer

    texts = [f"Person {i} works for company {i % 7} and lives in city {i % 11} ." for i in range(400)]
    tok = train_bpe_tokenizer(texts, vocab_size=size["vocab"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def watch_gathered(base, params: dict) -> list[float]:
    """A box holding the largest fraction of the partitioned base ever gathered at once."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    frozen = [p for n, p in base.named_parameters() if n not in params]
    full, box = sum(p.ds_numel for p in frozen), [0.0]
    release = coordinator.PartitionedParameterCoordinator.release_sub_module

    def probing_release(self, *a, **k):  # runs after each layer's forward / backward, before freeing it
        live = sum(p.ds_numel for p in frozen if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
        box[0] = max(box[0], live / full)
        return release(self, *a, **k)

    coordinator.PartitionedParameterCoordinator.release_sub_module = probing_release
    return box


def worker(args: argparse.Namespace) -> None:
    """One rank: build like meta.py, time the meta-steps, write this rank's JSON."""
    import torch

    from ckl_toolkit.core.config import load_recipe
    from ckl_toolkit.core.ta_model import build_ta_model
    from ckl_toolkit.distributed.process import init_distributed, shutdown
    from ckl_toolkit.meta import build_optimizer, check_recipe, load_base
    from ckl_toolkit.metalearn.config import MetaRecipe
    from ckl_toolkit.metalearn.episodes import episode_slice, make_episode_batch
    from ckl_toolkit.metalearn.step import meta_step
    from ckl_toolkit.metalearn.zero import model_state_bytes
    from ckl_toolkit.training.engine import build_engine

    size = SIZES[args.size]
    overrides = [
        f"base.path={args.model}",
        "distributed.ds_config=zero3",
        f"batch_size={size['B']}",
        f"data.max_length={size['T']}",
        "base.lora={r: 8}",
        "data.val=null",
        "meta.mode=batched",
    ]
    if args.partition:
        overrides.append("distributed.partition_base=true")
    recipe = load_recipe(MetaRecipe, None, overrides)
    ctx = init_distributed(check_recipe(recipe), "auto")
    rss_before_models = _rss_kb("VmRSS") / 1024  # interpreter, torch, transformers, deepspeed
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, params = load_base(recipe, ctx)  # replicated, or ZeRO-3-partitioned with a LoRA set per rank
    peak_gathered = watch_gathered(base, params) if args.partition else [1.0]
    ta = build_ta_model(args.model)
    optimizer = build_optimizer(ta.parameters(), recipe.optim)
    engine = build_engine(ta, dict(ta.named_parameters()), optimizer, recipe.optim.grad_clip, ctx)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    words = " ".join(f"word{i}" for i in range(size["T"]))
    rows = [
        {
            "text": f"Person {b} works for company {b} . {words}",
            "task": f"Person {b} works for company {b}",
            "object": f"company {b}",
        }
        for b in range(size["B"])
    ]
    batch = make_episode_batch(tok, rows, recipe.data.max_length, recipe.data.task_max_length)
    batch = batch.rows(episode_slice(recipe.batch_size, ctx.rank, ctx.world))

    def step() -> float:  # one meta-step, exactly as meta.py takes it
        t = time.perf_counter()
        meta_step(engine, base, params, batch, recipe.meta)
        return time.perf_counter() - t

    step()  # warm-up: lazy imports, the ZeRO-3 trace, AdamW state allocation
    peak_build = _rss_kb("VmHWM") / 1024  # loading included (rank 0 reads the whole checkpoint)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak over the timed steps only
    times = [step() for _ in range(args.steps)]
    report = {
        "rank": ctx.rank,
        "world": ctx.world,
        "partition_base": args.partition,
        "step_s": statistics.median(times),
        "step_s_all": times,
        "model_state_bytes": model_state_bytes(engine, base),
        "peak_rss_mb": _rss_kb("VmHWM") / 1024,
        "peak_rss_with_loading_mb": peak_build,
        "rss_before_models_mb": rss_before_models,
        "base_peak_gathered_fraction": peak_gathered[0],
    }
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    shutdown()


def launch(ranks: int, partition: bool, model: Path, report: Path, args: argparse.Namespace) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        __file__,
        "--worker",
        "--model",
        str(model),
        "--report",
        str(report),
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ] + (["--partition"] if partition else [])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{res.stderr[-4000:]}")
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(ranks)]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarize(results: dict) -> dict:
    """Per configuration: the worst rank's figures; and the 2-rank / 1-rank memory ratios."""
    rows = {}
    for name, ranks in results.items():
        rows[name] = {
            "ranks": len(ranks),
            "step_s": max(r["step_s"] for r in ranks),
            "model_state_mb_per_rank": max(r["model_state_bytes"]["total"] for r in ranks) / 2**20,
            "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
            "rss_before_models_mb": max(r["rss_before_models_mb"] for r in ranks),
            "base_peak_gathered_fraction": max(r["base_peak_gathered_fraction"] for r in ranks),
        }
    for kind in ("replicated", "partitioned"):
        one, two = rows[f"{kind}_1rank"], rows[f"{kind}_2ranks"]
        rows[f"{kind}_ratio_2_over_1"] = {
            "model_state": two["model_state_mb_per_rank"] / one["model_state_mb_per_rank"],
            "peak_rss": two["peak_rss_mb_per_rank"] / one["peak_rss_mb_per_rank"],
            "step_s": two["step_s"] / one["step_s"],
        }
    rows["target_partitioned_model_state_ratio_le_0.6"] = (
        rows["partitioned_ratio_2_over_1"]["model_state"] <= 0.6
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero_meta.json"))
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    parser.add_argument("--steps", type=int, default=3, help="timed meta-steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    # worker side
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--partition", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.size = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model_dir(model, SIZES[args.size])
        results = {}
        for ranks, partition in CONFIGS:
            name = f"{'partitioned' if partition else 'replicated'}_{ranks}rank{'s' if ranks > 1 else ''}"
            print(f"{name} ...", flush=True)
            results[name] = launch(ranks, partition, model, Path(tmp) / name, args)
    import torch

    doc = {
        "benchmark": "bench_zero_meta",
        "size": SIZES[args.size],
        "steps": args.steps,
        "threads": args.threads,
        "device": "cuda" if _has_cuda() else "cpu",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "summary": summarize(results),
        "per_rank": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
