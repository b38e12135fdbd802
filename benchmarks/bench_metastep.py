"""Time the meta-gradient and its peak extra memory, exact vs second-order reference; and a whole meta-step.

Most configurations time dL/dw alone, the part of a meta-step where the methods differ (the
reference differentiates through the inner step with create_graph). ``meta_step_*`` times one
whole meta-step as ``meta.py`` takes it (``metalearn.step.meta_step``: φ's forward, dL/dw, the
surrogate's backward and φ's optimizer step), with φ a TA model of the base's size.

Memory: one fresh subprocess per configuration (so allocator state and peaks do not leak between
them), measuring the process's resident set. After building the base and the batch and a tiny
warm-up meta-step (lazy imports, one-time set-up), the worker resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``), notes VmRSS, runs one full meta-step and reads VmHWM:
extra = VmHWM − VmRSS before. That sees every CPU allocation, torch's included (``tracemalloc``
does not). The workers run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS
(glibc would otherwise keep the warm-up's freed blocks and under-read the peak). Without
clear_refs (not Linux) it falls back to the ru_maxrss delta.

Time: all configurations in one more fresh process, interleaved round-robin (a warm-up round,
then ``--repeats`` rounds), so load from other jobs on the machine drifts over all of them alike;
the median wall time per meta-step, and the process CPU time as a second opinion. Workers run with
OMP_WAIT_POLICY=PASSIVE unless set (see below why).

    OMP_NUM_THREADS=2 python benchmarks/bench_metastep.py            # the real figures (minutes)
    python benchmarks/bench_metastep.py --quick --out /tmp/m.json    # smoke run (seconds)

``--smollm2``: the issue's comparison on a SmolLM2-135M-shaped base (random init; the shape from
``--config``, default SmolLM2-135M's), one process, every configuration interleaved round-robin:
today's path (AdamW inner step on all parameters, jvp Jacobian, the logging forward every step, φ
with 4 trainable layers) against the new one (top 4 layers + norm with the prefix cache,
closed-form Jacobian, no logging forward, head-only φ), each at the shipped batch (4 × 192 tokens,
tasks of 48) and the new one also at the CPU recipe's (8 × 64); and one plain forward+backward
of the base on the same documents, the floor.

    flock /tmp/ckl/cpu.lock env OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE \
        python benchmarks/bench_metastep.py --smollm2          # -> results/metastep_smollm2.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.metalearn.reference_metagrad and an uninstalled ckl_toolkit

from ckl_toolkit.metalearn.metagrad import InnerStepConfig, MetaGradConfig, meta_gradient  # noqa: E402
from tests.metalearn.reference_metagrad import reference_meta_gradient  # noqa: E402

# name -> (method, mode, attention). jvp and the double backward need eager attention on CPU;
# central differences take any kernel, so they run with SDPA as a user would.
CONFIGS = {
    "exact_jvp_independent": ("jvp", "independent", "eager"),
    "exact_jvp_batched": ("jvp", "batched", "eager"),
    "exact_central_independent": ("central", "independent", "sdpa"),
    "exact_central_batched": ("central", "batched", "sdpa"),
    "reference_independent": ("reference", "independent", "eager"),
    "reference_batched": ("reference", "batched", "eager"),
    "meta_step_central_batched": ("central", "batched", "sdpa"),  # the whole step, φ included
}
SIZES = {  # ~21.6M parameters; --quick: ~0.5M
    "full": {
        "hidden": 512,
        "layers": 6,
        "heads": 8,
        "intermediate": 768,
        "vocab": 8000,
        "B": 8,
        "T": 128,
        "Tt": 32,
    },
    "quick": {
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "intermediate": 128,
        "vocab": 1000,
        "B": 4,
        "T": 32,
        "Tt": 12,
    },
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _build(size: dict, attn: str):
    """(base, batch, φ's engine): the same weights for every attention kernel (same seeds)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    from ckl_toolkit.core.ta_model import TrainAttentionModel
    from ckl_toolkit.training.engine import PlainEngine

    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        intermediate_size=size["intermediate"],
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    B, T, Tt, V = size["B"], size["T"], size["Tt"], size["vocab"]
    obj = torch.zeros(B, Tt - 1, dtype=torch.bool)
    obj[:, -4:] = True  # the last 4 targets of each task are its object
    batch = {
        "doc_ids": torch.randint(0, V, (B, T), generator=g),
        "doc_mask": torch.ones(B, T, dtype=torch.long),
        "w": torch.rand(B, T - 1, generator=g),
        "task_ids": torch.randint(0, V, (B, Tt), generator=g),
        "task_mask": torch.ones(B, Tt, dtype=torch.long),
        "task_obj_mask": obj,
    }
    torch.manual_seed(2)
    phi = TrainAttentionModel(LlamaModel(config), size["hidden"]).train()
    engine = PlainEngine(phi, dict(phi.named_parameters()), torch.optim.AdamW(phi.parameters(), lr=3e-4), 1.0)
    return base, batch, engine


def _episodes(batch: dict):
    """The batch as meta_step takes it (φ computes w; no object tokens marked in the documents)."""
    from ckl_toolkit.metalearn.episodes import EpisodeBatch

    doc_obj = torch.zeros_like(batch["w"], dtype=torch.bool)
    return EpisodeBatch(batch["doc_ids"], batch["doc_mask"], doc_obj, batch["task_ids"], batch["task_mask"],
                        batch["task_obj_mask"])  # fmt: skip


def _tiny(batch: dict) -> dict:
    """The first document cut to 8 tokens, its task to 6."""
    lengths = {"doc_ids": 8, "doc_mask": 8, "w": 7, "task_ids": 6, "task_mask": 6, "task_obj_mask": 5}
    return {k: v[:1, : lengths[k]] for k, v in batch.items()}


def _run(name: str, base, params: dict, batch: dict, engine, inner: InnerStepConfig):
    """What configuration ``name`` times: a whole meta-step, or dL/dw the way its method produces it."""
    method, mode, _ = CONFIGS[name]
    if name.startswith("meta_step"):
        from ckl_toolkit.metalearn.step import meta_step

        return meta_step(
            engine, base, params, _episodes(batch), MetaGradConfig(inner=inner, method=method, mode=mode)
        )
    if method == "reference":
        cfg = MetaGradConfig(inner=inner, mode=mode)
        w = batch["w"].clone().requires_grad_(True)
        return reference_meta_gradient(base, params, cfg=cfg, **{**batch, "w": w})[0]
    return meta_gradient(
        base, params, cfg=MetaGradConfig(inner=inner, method=method, mode=mode), **batch
    ).dL_dw


def memory_worker(name: str, args: argparse.Namespace) -> dict:
    """Peak extra RSS of one meta-step of one configuration, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    base, batch, engine = _build(SIZES["quick" if args.quick else "full"], CONFIGS[name][2])
    params, inner = dict(base.named_parameters()), _inner(args)
    # A tiny meta-step first, so lazy imports and one-time set-up do not count as the step's memory.
    _run(name, base, params, _tiny(batch), engine, inner)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        how, before = "VmHWM - VmRSS (clear_refs)", _rss_kb("VmRSS")
    except OSError:
        how, before = "ru_maxrss delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _run(name, base, params, batch, engine, inner)
    peak = _rss_kb("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mb": (peak - before) / 1024, "memory_method": how}


def time_round_robin(names: list[str], args: argparse.Namespace) -> dict:
    """Wall and CPU seconds per meta-step, the configurations interleaved so drifting load hits all alike."""
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    bases = {attn: _build(size, attn) for attn in {CONFIGS[n][2] for n in names}}  # same seed: same weights
    inner, wall, cpu = _inner(args), {n: [] for n in names}, {n: [] for n in names}
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        for name in names:
            base, batch, engine = bases[CONFIGS[name][2]]
            t0, c0 = time.perf_counter(), time.process_time()
            _run(name, base, dict(base.named_parameters()), batch, engine, inner)
            if r:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        done = ", ".join(f"{n} {wall[n][-1]:.1f}s" for n in names) if r else "warm-up done"
        print(f"round {r}: {done}", file=sys.stderr, flush=True)
    out = {}
    for name in names:
        method, mode, attn = CONFIGS[name]
        median = statistics.median(wall[name])
        out[name] = {
            "method": method,
            "mode": mode,
            "attention": attn,
            "sec_per_meta_step": median,
            "episodes_per_s": size["B"] / median,
            "times_s": wall[name],
            "cpu_s_per_meta_step": statistics.median(
                cpu[name]
            ),  # all threads; less sensitive to others' load
        }
    return out


def _inner(args: argparse.Namespace) -> InnerStepConfig:
    return InnerStepConfig(optimizer=args.optimizer, lr=args.lr, warmup_steps=args.warmup_steps)


def _run_worker(worker: str, flags: list[str], env: dict) -> dict:
    """Run this script as a worker in a fresh process and return its JSON result."""
    cmd = [sys.executable, __file__, "--worker", worker, *flags]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # stderr: straight through
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"worker {worker} failed (its stderr is above)")
    return json.loads(line[len("RESULT ") :])


def _ratios(results: dict) -> dict:
    """The issue's targets: exact vs the reference in the same mode, batched vs independent."""
    out = {}
    step, metagrad = results.get("meta_step_central_batched"), results.get("exact_central_batched")
    if step and metagrad:  # a whole meta-step over its dL/dw alone: what φ (forward, backward, step) adds
        out["meta_step_over_meta_gradient_central_batched"] = (
            step["sec_per_meta_step"] / metagrad["sec_per_meta_step"]
        )
    for name, r in results.items():
        if (
            name.startswith("meta_step")
            or r["method"] == "reference"
            or f"reference_{r['mode']}" not in results
        ):
            continue
        ref = results[f"reference_{r['mode']}"]
        out[f"{name}_speedup_vs_reference"] = ref["sec_per_meta_step"] / r["sec_per_meta_step"]
        out[f"{name}_memory_vs_reference"] = r["peak_extra_mb"] / ref["peak_extra_mb"]
    for method in ("exact_jvp", "exact_central", "reference"):
        ind, bat = results.get(f"{method}_independent"), results.get(f"{method}_batched")
        if ind and bat:
            out[f"{method}_batched_vs_independent_episodes_per_s"] = (
                bat["episodes_per_s"] / ind["episodes_per_s"]
            )
    return out


# SmolLM2-135M's shape (its config.json); --config reads another one
SMOLLM2 = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
}
# name -> (inner params, jacobian, log every step, φ trains, B, T, Tt)
SMOLLM2_CONFIGS = {
    "old_shipped": ("all", "jvp", True, "last4", 4, 192, 48),
    "new_shipped_batch": ("top_k_layers:4", "closed_form", False, "head", 4, 192, 48),
    "new_cpu_recipe": ("top_k_layers:4", "closed_form", False, "head", 8, 64, 48),
}


def smollm2_bench(args: argparse.Namespace) -> dict:
    """Seconds per meta-step of each SMOLLM2_CONFIGS entry and of a plain fwd+bwd, round-robin."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    from ckl_toolkit.core.losses import target_mask, token_nll, weighted_loss
    from ckl_toolkit.core.ta_model import TrainAttentionModel
    from ckl_toolkit.metalearn.step import meta_step
    from ckl_toolkit.metalearn.subset import select_inner_params
    from ckl_toolkit.training.engine import PlainEngine

    torch.set_num_threads(args.threads)
    shape = json.loads(Path(args.config).read_text()) if args.config else dict(SMOLLM2)
    keep = set(SMOLLM2) | {"rope_parameters", "rope_theta"}
    config = LlamaConfig(**{k: v for k, v in shape.items() if k in keep}, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval().requires_grad_(False)
    ta_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 4})
    g = torch.Generator().manual_seed(1)

    def episodes(b: int, t: int, tt: int):
        from ckl_toolkit.metalearn.episodes import EpisodeBatch

        obj = torch.zeros(b, tt - 1, dtype=torch.bool)
        obj[:, -3:] = True
        ids = torch.randint(0, config.vocab_size, (b, t), generator=g)
        doc_mask, task_mask = torch.ones(b, t, dtype=torch.long), torch.ones(b, tt, dtype=torch.long)
        task = torch.randint(0, config.vocab_size, (b, tt), generator=g)
        return EpisodeBatch(ids, doc_mask, torch.zeros(b, t - 1, dtype=torch.bool), task, task_mask, obj)

    runs = {}
    for name, (params, jac, log, phi_trains, b, t, tt) in SMOLLM2_CONFIGS.items():
        torch.manual_seed(2)
        phi = TrainAttentionModel(LlamaModel(ta_config), config.hidden_size).train()
        phi.trunk.requires_grad_(phi_trains != "head")
        trainable = {n: p for n, p in phi.named_parameters() if p.requires_grad}
        engine = PlainEngine(phi, trainable, torch.optim.AdamW(trainable.values(), lr=3e-4), 1.0)
        inner = InnerStepConfig(optimizer="adamw", lr=2e-4, jacobian=jac, params=params)
        named = select_inner_params(base, dict(base.named_parameters()), params)
        cfg = MetaGradConfig(inner=inner, method="central", mode="batched")
        batch = episodes(b, t, tt)
        runs[name] = (b, functools.partial(_subset_step, meta_step, engine, base, named, batch, cfg, log))
    floor_batch = episodes(4, 192, 48)

    def plain_fwd_bwd():  # the floor: one weighted forward+backward of the whole base, all parameters
        params = list(base.parameters())
        base.requires_grad_(True)
        w = torch.rand(4, 191, generator=g)
        nll = token_nll(base, floor_batch.doc_ids, floor_batch.doc_mask)
        loss = weighted_loss(nll, w, target_mask(floor_batch.doc_mask))
        torch.autograd.grad(loss, params)
        base.requires_grad_(False)

    runs["plain_fwd_bwd_4x192"] = (4, plain_fwd_bwd)
    wall = {n: [] for n in runs}
    for r in range(args.repeats + 1):  # round 0 warms up
        for name, (_, fn) in runs.items():
            t0 = time.perf_counter()
            fn()
            if r:
                wall[name].append(time.perf_counter() - t0)
        print(f"round {r}: " + ", ".join(f"{n} {w[-1]:.2f}s" for n, w in wall.items() if w), file=sys.stderr)
    out = {}
    for name, (b, _) in runs.items():
        sec = statistics.median(wall[name])
        out[name] = {"sec_per_step": sec, "episodes_per_s": b / sec, "times_s": wall[name]}
        if name in SMOLLM2_CONFIGS:
            params, jac, log, phi_trains, b, t, tt = SMOLLM2_CONFIGS[name]
            out[name]["setup"] = {
                "inner_params": params,
                "jacobian": jac,
                "log_forward_every_step": log,
                "phi_trains": phi_trains,
                "B": b,
                "T": t,
                "Tt": tt,
            }
    floor = out["plain_fwd_bwd_4x192"]["sec_per_step"]
    ratios = {
        "new_over_old_episodes_per_s_shipped_batch": out["new_shipped_batch"]["episodes_per_s"]
        / out["old_shipped"]["episodes_per_s"],
        "new_cpu_recipe_over_old_episodes_per_s": out["new_cpu_recipe"]["episodes_per_s"]
        / out["old_shipped"]["episodes_per_s"],
        "old_step_over_plain_fwd_bwd": out["old_shipped"]["sec_per_step"] / floor,
        "new_step_over_plain_fwd_bwd_shipped_batch": out["new_shipped_batch"]["sec_per_step"] / floor,
    }
    return {"results": out, "ratios": ratios, "n_params": sum(p.numel() for p in base.parameters())}


def _subset_step(meta_step, engine, base, named: dict, batch, cfg, log: bool):
    """One meta-step with exactly ``named`` trainable in the base (as meta.py sets it up)."""
    base.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    return meta_step(engine, base, named, batch, cfg, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny base and batch (smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metastep.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="torch / OMP threads per worker")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="the inner step")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "memory:<config>" | "time"
    parser.add_argument("--smollm2", action="store_true", help="old vs new meta-step on a SmolLM2 shape")
    parser.add_argument("--config", help="--smollm2: a config.json for the shape (default SmolLM2-135M's)")
    args = parser.parse_args()
    if args.smollm2:
        load = os.getloadavg()
        report = smollm2_bench(args)
        report["machine"] = {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "platform": platform.platform(),
            "loadavg_at_start": load,
            "loadavg_at_end": os.getloadavg(),
        }
        report["setup"] = {
            "inner": "adamw lr 2e-4, central, batched, fp32, sdpa, random init",
            "repeats": args.repeats,
            "timing": "round-robin, median after a warm-up round",
        }
        default = parser.get_default("out")
        out = Path(
            ROOT / "benchmarks" / "results" / "metastep_smollm2.json" if args.out == default else args.out
        )
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["ratios"], indent=2))
        print(f"wrote {out}")
        return

    if args.worker == "time":
        print("RESULT " + json.dumps(time_round_robin(args.configs, args)))
        return
    if args.worker:
        print("RESULT " + json.dumps(memory_worker(args.worker.removeprefix("memory:"), args)))
        return

    loadavg_start = os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    # Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads fight the
    # other jobs and one fwd+bwd measured 1.5 s (passive) vs 2.5-7.5 s (default) here.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    flags = ["--threads", str(args.threads), "--optimizer", args.optimizer, "--lr", str(args.lr)]
    flags += ["--warmup-steps", str(args.warmup_steps), "--repeats", str(args.repeats)]
    flags += ["--quick"] * args.quick + ["--configs", *args.configs]
    memory = {}
    for name in args.configs:  # one fresh process per configuration
        # A fixed mmap threshold turns off glibc's adaptive one: every block over 64 KiB goes back to
        # the OS when freed, so RSS tracks live memory and freed warm-up blocks cannot hide the peak.
        memory[name] = _run_worker(f"memory:{name}", flags, {**env, "MALLOC_MMAP_THRESHOLD_": "65536"})
        print(f"{name:28s} peak +{memory[name]['peak_extra_mb']:7.1f} MB", flush=True)
    results = _run_worker("time", flags, env)
    for name, r in results.items():
        r.update(memory[name])
        print(
            f"{name:28s} {r['sec_per_meta_step']:8.2f} s/step  {r['episodes_per_s']:6.2f} episodes/s  "
            f"peak +{r['peak_extra_mb']:7.1f} MB"
        )

    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "omp_wait_policy": env["OMP_WAIT_POLICY"],
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_at_start": loadavg_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "setup": {
            "size": SIZES["quick" if args.quick else "full"],
            "inner": {"optimizer": args.optimizer, "lr": args.lr, "warmup_steps": args.warmup_steps},
            "repeats": args.repeats,
            "timing": "configurations interleaved round-robin in one fresh process; median of the "
            "repeats after a warm-up round",
            "dtype": "float32",
            "params": "all base parameters",
        },
        "results": results,
        "ratios": _ratios(results),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
