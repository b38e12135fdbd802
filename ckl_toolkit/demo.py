"""``ckl demo``: the whole method on an embedded synthetic world, on CPU.

    synthetic world -> pretrain a tiny Llama (cached) -> meta-train a TA model
    -> LAMA-ckl protocol (``ckl eval``'s, i.e. the nightly job's training code) for uniform
       fine-tuning, TAALM and the oracle -> table + report.json

Every stage writes under ``--out`` and is reused when its inputs have not changed, so a second run
(or a run resumed after a kill) skips the finished stages.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ckl_toolkit.core.config import load_recipe, to_dict
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.data.pretrain import PretrainConfig, pretrain
from ckl_toolkit.data.world import WorldConfig, build_world, write_world
from ckl_toolkit.evaluate import run_lama_benchmark
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.meta import meta_train
from ckl_toolkit.metalearn.config import MetaRecipe

# The demo's three rows: name in the table -> method of ``ckl eval``.
METHODS = {"uniform": "finetune", "taalm": "taalm", "oracle": "oracle"}


@dataclass
class DemoPlan:
    """Everything the demo runs; ``quick`` shrinks the world, the base and the meta-training."""

    world: WorldConfig
    pretrain: PretrainConfig
    meta_overrides: list[str]
    eval_overrides: list[str]

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> DemoPlan:
        meta = [
            "meta.method=central", "meta.mode=batched", "meta.inner.optimizer=sgd", "meta.inner.lr=0.3",
            "optim.lr=3e-4", "batch_size=8", "val.pairs=32", "val.epochs=3", "base.attn_implementation=sdpa",
            f"seed={seed}",
        ]  # fmt: skip
        protocol = ["optim.lr=3e-4", "batching.batch_size=8", "batching.shuffle=true", f"seed={seed}"]
        if quick:
            return cls(
                WorldConfig.quick(seed),
                PretrainConfig.quick(seed=seed),
                meta + ["steps=120", "val_every=0", "save_every=60", "log_every=10"],
                protocol + ["protocol.epochs=5", "data.nf_limit=200"],
            )
        return cls(
            WorldConfig.default(seed),
            PretrainConfig.default(seed=seed),
            meta + ["steps=400", "val_every=100", "save_every=50", "log_every=10"],
            protocol + ["protocol.epochs=6", "data.nf_limit=300"],
        )


def _world(plan: DemoPlan, out: Path) -> Path:
    """Write the world unless the same config already wrote it."""
    world_dir = out / "world"
    info = world_dir / "world.json"
    if info.exists() and json.loads(info.read_text()).get("config") == asdict(plan.world):
        return world_dir
    return write_world(build_world(plan.world), world_dir)


def format_table(methods: dict[str, dict]) -> str:
    cols = [("Top EM", 7), ("EM ep", 6), ("NF EM", 7), ("Top Acc", 8)]
    cols += [("Epoch", 6), ("NF Acc", 7), ("Total", 7)]
    head = f"{'method':<10} " + " ".join(f"{name:>{width}}" for name, width in cols)
    lines = [head, "-" * len(head)]
    for name, s in methods.items():
        lines.append(
            f"{name:<10} {s['top_em']:>7.3f} {s['em_epoch']:>6d} {s['nf_em']:>7.3f} {s['top_acc']:>8.3f} "
            f"{s['epoch']:>6d} {s['nf_acc']:>7.3f} {s['total']:>7.3f}"
        )
    return "\n".join(lines)


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run every stage and write ``out/report.json``; returns the report."""
    start = time.perf_counter()
    out = Path(out)
    plan = DemoPlan.make(quick, seed)
    torch.manual_seed(seed)

    print(f"[1/4] synthetic world -> {out / 'world'}")
    world_dir = _world(plan, out)
    print(f"[2/4] pretraining the base (cached) -> {out / 'base'}")
    base_dir = pretrain(world_dir, out / "base", plan.pretrain, progress=progress)

    print(f"[3/4] meta-training the Train-Attention model -> {out / 'meta'}")
    overrides = [
        f"run_dir={out / 'meta'}",
        f"base.path={base_dir}",
        f"data.train={world_dir / 'meta_train.jsonl'}",
        f"data.val={world_dir / 'meta_val.jsonl'}",
        f"progress={str(progress).lower()}",
    ]
    meta = load_recipe(MetaRecipe, None, plan.meta_overrides + overrides)
    ta_dir = meta_train(meta)

    print("[4/4] LAMA-ckl protocol: uniform, TAALM, oracle")
    evaluation = load_recipe(EvalRecipe, None, plan.eval_overrides + [
        f"run_dir={out / 'eval'}", f"target.path={base_dir}", f"weights.ta_path={ta_dir}",
        "data.kind=synthetic", f"data.dir={world_dir}", f"methods=[{', '.join(METHODS.values())}]",
        f"progress={str(progress).lower()}",
    ])  # fmt: skip
    results = run_lama_benchmark(evaluation)
    methods = {name: results["methods"][m] for name, m in METHODS.items()}
    report = {
        "methods": methods,
        "config": {
            "quick": quick,
            "seed": seed,
            "world": asdict(plan.world),
            "pretrain": asdict(plan.pretrain),
            "meta": to_dict(meta),
            "eval": to_dict(evaluation),
            "to_learn": results["data"]["to_learn"],
            "not_to_forget": results["data"]["not_to_forget"],
        },
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(out / "report.json", report)
    print()
    print(format_table(methods))
    ratio = methods["taalm"]["top_em"] / max(methods["oracle"]["top_em"], 1e-9)
    print(
        f"\nTAALM / Oracle (exact match): {ratio:.2f}   total {report['seconds']:.0f} s"
        f"   -> {out / 'report.json'}"
    )
    return report
