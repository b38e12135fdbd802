"""Meta-train a Train-Attention model: ``ckl meta-train --recipe R [key=value ...]``.

Also a script: ``python ckl_toolkit/meta.py --recipe R``, and on several ranks
``deepspeed ckl_toolkit/meta.py --recipe R`` or ``torchrun --nproc_per_node N ckl_toolkit/meta.py --recipe R``
with ``distributed.ds_config`` set (ARCHITECTURE.md §3: φ is a ZeRO engine, each rank runs its own episodes).

The loop, per TA step (ARCHITECTURE.md §2, the paper's Algorithm 1 with an exact meta-gradient):

    w      = φ(D)                             token weights of the documents, (B, T-1)
    θ'     = θ - a·∇θ TWL(θ; D, w)            one weighted inner step of the base (then undone)
    L_T    = NLL of the task objects under θ'
    dL/dw  = exact, from one directional derivative (no second-order autograd)
    φ     <- AdamW step on (w · stopgrad(dL/dw)).sum()

The base θ never keeps an update: every episode starts from the same θ.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a script: sys.path[0] is ckl_toolkit/, whose io.py, text.py, config.py
    # would be importable as top-level modules; import the package from the repository root instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ckl_toolkit.core.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
)
from ckl_toolkit.core.config import ConfigError, load_recipe, recipe_hash, to_yaml
from ckl_toolkit.core.io import MetricsLogger, read_jsonl, write_text_atomic
from ckl_toolkit.core.models import LoraSpec, load_causal_lm, trainable_parameters
from ckl_toolkit.core.ta_model import TrainAttentionModel, build_ta_model, load_ta_model, save_ta_model
from ckl_toolkit.core.text import encode, object_target_mask
from ckl_toolkit.distributed import (
    DistContext,
    barrier,
    check_recipe,
    consolidated_ta,
    episode_slice,
    init_distributed,
    load_partitioned_base,
    mean_over_ranks,
    print0,
    resume_distributed,
    save_checkpoint_distributed,
    save_effective_config,
    shutdown,
    ta_engine,
)
from ckl_toolkit.evaluation.lama_ckl import run_lama_ckl
from ckl_toolkit.metalearn.config import MetaRecipe
from ckl_toolkit.metalearn.metagrad import meta_gradient
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec, OptimSpec, TargetSpec, WeightSpec
from ckl_toolkit.training.weighers import TokenWeigher, TrainAttentionWeights

PAIR_FIELDS = ("text", "task", "object")


@dataclass
class EpisodeBatch:
    doc_ids: torch.Tensor  # (B, T) documents D
    doc_mask: torch.Tensor  # (B, T)
    doc_obj: torch.Tensor  # (B, T-1) bool: object tokens in D (diagnostics only)
    task_ids: torch.Tensor  # (B, Tt) tasks T (probes)
    task_mask: torch.Tensor  # (B, Tt)
    task_obj: torch.Tensor  # (B, Tt-1) bool: the object's last occurrence in the task

    def rows(self, sl: slice) -> EpisodeBatch:
        """Episodes ``sl`` (one rank's share), padded like the whole batch, so a rank computes
        on exactly the tensors a single process would."""
        return EpisodeBatch(*(getattr(self, f.name)[sl] for f in fields(self)))


def load_pairs(path: str, field_name: str) -> list[dict]:
    if not path:
        raise ConfigError(f"{field_name}: a JSONL file of meta-training pairs is required")
    if not Path(path).exists():
        raise ConfigError(f"{field_name}: {path} does not exist")
    rows = read_jsonl(path, required=PAIR_FIELDS)
    for i, r in enumerate(rows, start=1):
        if r["object"] not in r["task"]:
            raise ConfigError(f"{path}:{i}: field 'object' {r['object']!r} does not occur in 'task'")
    return rows


def episode_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The pairs of TA step ``step``: a seeded permutation per epoch, read in order.

    The position in the data is a pure function of the step, so a resumed run sees exactly the
    episodes an uninterrupted one would.
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def make_episode_batch(tokenizer, rows: list[dict], recipe: MetaRecipe) -> EpisodeBatch:
    docs, tasks, objects = [r["text"] for r in rows], [r["task"] for r in rows], [r["object"] for r in rows]
    d = encode(tokenizer, docs, recipe.data.max_length)
    t = encode(tokenizer, tasks, recipe.data.task_max_length)
    return EpisodeBatch(
        d.input_ids,
        d.attention_mask,
        object_target_mask(d, docs, objects, "all"),
        t.input_ids,
        t.attention_mask,
        object_target_mask(t, tasks, objects, "last"),
    )


def require_task_objects(batch: EpisodeBatch, rows: list[dict], recipe: MetaRecipe) -> None:
    """Every task must keep an object token after truncation (checked on the global batch: ranks agree).

    An episode without one has no outer gradient, and the meta-gradient then skips its
    directional derivative: with a partitioned base that rank would skip two forward passes whose
    shard gathers the other ranks still make.
    """
    for row, has_object in zip(rows, batch.task_obj.any(dim=1).tolist()):
        if not has_object:
            raise ConfigError(
                f"data.task_max_length: the object {row['object']!r} falls outside the first "
                f"{recipe.data.task_max_length} tokens of its task {row['task'][:60]!r}; with "
                "distributed.partition_base every episode needs an outer loss: raise "
                "data.task_max_length or drop the pair"
            )


def weight_stats(w: torch.Tensor, batch: EpisodeBatch) -> dict[str, float]:
    """Mean weight on the documents' object tokens vs every other real token: what φ has learned."""
    real = batch.doc_mask[:, 1:].bool()
    obj, other = batch.doc_obj & real, ~batch.doc_obj & real
    return {
        "w_object": float(w[obj].mean()) if obj.any() else float("nan"),
        "w_other": float(w[other].mean()) if other.any() else float("nan"),
    }


def validate(ta: TrainAttentionModel, base_spec, val_rows: list[dict], recipe: MetaRecipe) -> dict:
    """The Top-Acc protocol on a few held-out facts: fine-tune a fresh base copy with φ's weights.

    It runs ``ckl eval``'s LAMA-ckl protocol (the nightly job's training code) under its own RNG, so
    validating does not change the meta-training run.
    """
    rows = [
        {"evidence": r["text"], "task_descriptive": r["task"], "object": r["object"]}
        for r in val_rows[: recipe.val.pairs]
    ]
    b = base_spec
    kind, lora = ("lora", b.lora) if b.lora else ("full", LoraSpec())
    target = TargetSpec(b.path, kind, b.dtype, b.attn_implementation, lora)
    ta_was_training = ta.training
    with torch.random.fork_rng():
        weigher = TokenWeigher("taalm", TrainAttentionWeights(ta))
        learner = build_learner(target, WeightSpec(), OptimSpec(lr=recipe.val.lr), None, recipe.seed,
                                torch.device("cpu"), weigher=weigher)  # fmt: skip
        batching = BatchSpec(
            max_length=recipe.data.max_length, batch_size=recipe.val.batch_size, shuffle=True
        )
        res = run_lama_ckl(learner, rows, [], recipe.val.epochs, batching, MixReviewSpec(), recipe.seed,
                           progress=False)  # fmt: skip
    ta.train(ta_was_training).requires_grad_(True)
    s = res.summary()
    return {"val_top_acc": s["top_acc"], "val_top_em": s["top_em"], "val_em_epoch": s["em_epoch"]}


def build_optimizer(params, optim) -> torch.optim.Optimizer:
    """φ's optimizer: a client torch optimizer, also under DeepSpeed (ARCHITECTURE.md §9)."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.weight_decay)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def save_run_checkpoint(
    run_dir: Path,
    step: int,
    ta,
    optimizer,
    tokenizer,
    recipe: MetaRecipe,
    engine=None,
    ctx: DistContext | None = None,
) -> None:
    if engine is not None:  # each rank its optimizer partition, rank 0 the consolidated φ (collective)
        save_checkpoint_distributed(
            run_dir / "checkpoints",
            step,
            engine,
            ctx,
            tokenizer,
            recipe_hash(recipe),
            recipe.keep_checkpoints,
        )
        return

    def write(tmp: Path) -> None:
        save_ta_model(ta, tmp / "ta", tokenizer, recipe_hash(recipe))
        save_state(
            tmp / "state",
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
                "recipe_hash": recipe_hash(recipe),
                "torch": torch.__version__,
            },
        )

    save_checkpoint(run_dir / "checkpoints", step, write, keep=recipe.keep_checkpoints)


def resume_from(run_dir: Path, ta: TrainAttentionModel, optimizer, recipe: MetaRecipe) -> int:
    """Load the latest checkpoint into (ta, optimizer, RNG); return the step to continue from."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return 0
    if recipe.resume == "never":
        raise ConfigError(f"resume: {run_dir} already holds {ckpt.name}; use resume=auto or a new run_dir")
    if (ckpt / "distributed.json").exists():
        raise ConfigError(
            f"resume: {ckpt} was written by a DeepSpeed run (distributed.ds_config); resume it "
            "with the same ds_config and number of ranks, or use a new run_dir"
        )
    state = load_state(ckpt / "state")
    if state["recipe_hash"] != recipe_hash(recipe):
        print(f"warning: {ckpt} was written by a different recipe; resuming anyway", file=sys.stderr)
    ta.load_state_dict(load_ta_model(ckpt / "ta").state_dict())
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return checkpoint_step(ckpt)


def meta_train(recipe: MetaRecipe) -> Path:
    """Run (or resume) meta-training; returns the directory of the final TA model.

    Without ``distributed.ds_config`` this is one plain torch process. With it, every rank of the
    launch (or a single process) runs this same loop: φ is a DeepSpeed ZeRO engine and each rank
    takes its own slice of the step's episodes (ARCHITECTURE.md §3).
    """
    ds_config = check_recipe(recipe)  # bad combinations fail here, before any work
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    ctx = init_distributed(ds_config, recipe.distributed.backend)  # rank 0 of 1 without DeepSpeed
    torch.manual_seed(recipe.seed)
    run_dir = Path(recipe.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "recipe.yaml", to_yaml(recipe))
        save_effective_config(run_dir, ctx)

    # --- models: the base θ (frozen apart from the undone inner step) and φ
    tokenizer = AutoTokenizer.from_pretrained(recipe.base.path)
    if recipe.distributed.partition_base:  # frozen weights ZeRO-3-sharded over ranks, a LoRA set per rank
        base, params = load_partitioned_base(recipe.base, ctx, recipe.seed)
    else:
        base = load_causal_lm(recipe.base).requires_grad_(False)
        params = trainable_parameters(base)  # the subset the inner step moves
        for p in params.values():
            p.requires_grad_(True)
    ta = build_ta_model(recipe.ta.init_from or recipe.base.path, recipe.ta.num_layers)
    ta.train()
    optimizer = build_optimizer(ta.parameters(), recipe.optim)
    engine = ta_engine(ta, optimizer, ctx) if ctx.deepspeed else None  # ZeRO partitions φ here
    phi = engine or ta

    pairs = load_pairs(recipe.data.train, "data.train")
    val_rows = load_pairs(recipe.data.val, "data.val") if recipe.data.val else []
    if engine is None:
        start = resume_from(run_dir, ta, optimizer, recipe)
    else:
        start = resume_distributed(run_dir / "checkpoints", engine, ctx, recipe_hash(recipe), recipe.resume)
    metrics = MetricsLogger(run_dir / "metrics.jsonl" if ctx.is_main else None)
    if start:
        print0(f"resuming from step {start}")
    my_rows = episode_slice(recipe.batch_size, ctx)  # this rank's episodes of every meta-batch

    bar = tqdm(
        range(start, recipe.steps),
        initial=start,
        total=recipe.steps,
        desc="meta-train",
        disable=not (recipe.progress and ctx.is_main),
    )
    t0 = time.perf_counter()
    for step in bar:
        rows = [pairs[i] for i in episode_indices(len(pairs), recipe.batch_size, step, recipe.seed)]
        batch = make_episode_batch(tokenizer, rows, recipe)
        if recipe.distributed.partition_base:  # ranks gather shards together: no episode may skip a pass
            require_task_objects(batch, rows, recipe)
        batch = batch.rows(my_rows)

        w = phi(batch.doc_ids, batch.doc_mask)[:, 1:]  # (B, T-1) token weights in (0, 1), with graph to φ
        # This rank's episodes only: no inner step, direction or dL/dw is reduced across ranks.
        out = meta_gradient(
            base,
            params,
            batch.doc_ids,
            batch.doc_mask,
            w.detach(),
            batch.task_ids,
            batch.task_mask,
            batch.task_obj,
            recipe.meta,
        )
        surrogate = (w * out.dL_dw).sum()  # its gradient w.r.t. φ is the exact meta-gradient
        if engine is None:
            optimizer.zero_grad(set_to_none=True)
            surrogate.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(ta.parameters(), recipe.optim.grad_clip or math.inf)
            optimizer.step()
        else:  # ZeRO averages φ's gradient over ranks (= the meta-batch mean; sync point), clips, steps
            engine.backward(surrogate)
            engine.step()
            grad_norm = engine.get_global_grad_norm()

        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            stats = {
                "outer_loss": out.outer_loss,
                "outer_loss_before": out.outer_loss_before,
                "inner_loss": out.inner_loss,
                "grad_norm": float(grad_norm),
                **weight_stats(w.detach(), batch),
            }
            stats = mean_over_ranks(ctx, stats)  # sync point on several ranks
            record = {"step": done, **stats, "seconds": time.perf_counter() - t0}
            if val_rows and (done == recipe.steps or (recipe.val_every and done % recipe.val_every == 0)):
                full = ta if engine is None else consolidated_ta(engine, ctx)  # collective; rank 0 validates
                if ctx.is_main:
                    record.update(validate(full, recipe.base, val_rows, recipe))
            metrics.log(**record)
            bar.set_postfix(
                outer=f"{record['outer_loss']:.3f}",
                w_obj=f"{record['w_object']:.2f}",
                w_oth=f"{record['w_other']:.2f}",
            )
        if done == recipe.steps or (recipe.save_every and done % recipe.save_every == 0):
            save_run_checkpoint(run_dir, done, ta, optimizer, tokenizer, recipe, engine, ctx)

    full = ta if engine is None else consolidated_ta(engine, ctx)  # collective
    final = run_dir / "ta"
    if ctx.is_main:
        save_ta_model(full, final, tokenizer, recipe_hash(recipe))
    barrier(ctx)
    return final


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python ckl_toolkit/meta.py --recipe R [key=value ...]``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(MetaRecipe, args.recipe, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.dry_run:
        print(to_yaml(recipe))
        return
    try:
        final = meta_train(recipe)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        shutdown()
    print0(f"TA model written to {final}")


if __name__ == "__main__":
    main()
