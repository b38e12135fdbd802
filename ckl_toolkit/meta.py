"""Meta-train a Train-Attention model: ``ckl meta-train --recipe R [key=value ...]``.

Also a script: ``python ckl_toolkit/meta.py --recipe R``, and on several ranks
``deepspeed ckl_toolkit/meta.py --recipe R`` or ``torchrun --nproc_per_node N ckl_toolkit/meta.py --recipe R``
with ``distributed.ds_config`` set (φ is then a ZeRO engine and each rank runs its own episodes).

The loop, per TA step (the paper's Algorithm 1 with an exact meta-gradient, ``metalearn.step``):

    w      = φ(D)                             token weights of the documents, (B, T-1)
    θ'     = θ - a·∇θ TWL(θ; D, w)            one weighted inner step of the base (then undone)
    L_T    = NLL of the task objects under θ'   (+ λ·L_R of known facts under θ': meta.retain_weight)
    dL/dw  = exact, from one directional derivative (no second-order autograd)
    φ     <- AdamW step on (w · stopgrad(dL/dw)).sum()

The base θ never keeps an update: every episode starts from the same θ.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a script: sys.path[0] is ckl_toolkit/, whose subpackages (data, core, ...)
    # would be importable as top-level modules; import the package from the repository root instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ckl_toolkit.core.checkpoint import latest_checkpoint, load_state, load_step, save_step
from ckl_toolkit.core.config import ConfigError, load_recipe, recipe_hash, require, to_yaml
from ckl_toolkit.core.io import MetricsLogger, write_text_atomic
from ckl_toolkit.core.models import LoraSpec, load_causal_lm, trainable_parameters
from ckl_toolkit.core.signals import StopFlag
from ckl_toolkit.core.ta_model import TrainAttentionModel, build_ta_model, save_ta_model
from ckl_toolkit.distributed.ds_config import model_hidden_size, resolve_ds_config
from ckl_toolkit.distributed.process import (
    DistContext,
    init_distributed,
    launched_world_size,
    mean_over_ranks,
    print0,
    shutdown,
)
from ckl_toolkit.evaluation.lama_ckl import run_lama_ckl
from ckl_toolkit.metalearn.config import META_DS_FIELDS, MetaRecipe
from ckl_toolkit.metalearn.episodes import (
    PROBE_FIELDS,
    EpisodeBatch,
    episode_indices,
    episode_slice,
    load_pairs,
    make_episode_batch,
    make_probe_batch,
    require_task_objects,
    weight_stats,
)
from ckl_toolkit.metalearn.step import MetaStepResult, meta_step
from ckl_toolkit.metalearn.subset import select_inner_params
from ckl_toolkit.metalearn.ta_train import configure_ta_training, object_weight_share, outer_lr, window_pairs
from ckl_toolkit.metalearn.zero import (
    consolidated_ta,
    load_partitioned_base,
    save_effective_config,
)
from ckl_toolkit.nightly.contract import ExitCode
from ckl_toolkit.training.engine import Engine, build_engine
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec, OptimSpec, TargetSpec, WeightSpec
from ckl_toolkit.training.weighers import TokenWeigher, TrainAttentionWeights

DIAG_BATCH = 16  # validation pairs per φ forward of the held-out diagnostic


def check_recipe(recipe: MetaRecipe, world: int | None = None) -> dict | None:
    """Every check that needs no process group: run before any work (and before spawning ranks).

    Args:
        recipe: the meta-training recipe.
        world: ranks of the run; default: what the launcher announced (1 without one).

    Returns:
        φ's effective DeepSpeed config (None: one plain process).
    """
    world = launched_world_size() if world is None else world
    spec = recipe.distributed
    if spec.ds_config is None:
        require(
            world == 1,
            "distributed.ds_config",
            f"{world} ranks were launched but the recipe names no DeepSpeed config; set "
            "distributed.ds_config=zero3 (or run one process)",
        )
        return None
    trunk_field = "ta.init_from" if recipe.ta.init_from else "base.path"
    hidden = model_hidden_size(recipe.ta.init_from or recipe.base.path, trunk_field)  # sizes ZeRO buckets
    return resolve_ds_config(
        spec.ds_config, world=world, batch_size=recipe.batch_size, grad_clip=recipe.optim.grad_clip,
        precision=spec.precision, optimizer=recipe.optim.name, jvp=recipe.meta.method == "jvp",
        partition_base=spec.partition_base, hidden_size=hidden, fields=META_DS_FIELDS,
    )  # fmt: skip


def build_optimizer(params, optim) -> torch.optim.Optimizer:
    """φ's optimizer: a client torch optimizer, also under DeepSpeed (its own optimizers JIT-compile)."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.weight_decay)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def load_base(recipe: MetaRecipe, ctx: DistContext) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    """The base θ, frozen apart from the undone inner step, and the subset that inner step moves."""
    if recipe.distributed.partition_base:  # frozen weights ZeRO-3-sharded over ranks, a LoRA set per rank
        return load_partitioned_base(recipe.base, ctx.ds_config, recipe.seed)
    base = load_causal_lm(recipe.base).requires_grad_(False)
    inner = recipe.meta.inner
    # all of θ or its LoRA adapters, then the part the inner step moves (meta.inner.params)
    params = select_inner_params(base, trainable_parameters(base), inner.params, inner.tied_embedding)
    for p in params.values():
        p.requires_grad_(True)
    return base, params


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


def save_run_checkpoint(
    run_dir: Path, step: int, engine: Engine, ta: TrainAttentionModel, tokenizer, recipe: MetaRecipe
) -> None:
    """Write ``checkpoints/step_N``; collective.

    φ's engine state and the RNG state of every rank, the step, and ``ta/``: φ consolidated, which
    ``ckl export --run`` reads.
    """
    full = consolidated_ta(engine, ta)  # None except on rank 0
    state = {"step": step, "recipe_hash": recipe_hash(recipe), "run_hash": run_hash(recipe)}
    state["torch"] = torch.__version__
    save_step(
        run_dir / "checkpoints", step, engine, state, recipe.keep_checkpoints,
        write_main=lambda d: save_ta_model(full, d / "ta", tokenizer, recipe_hash(recipe)),
    )  # fmt: skip


# What decides φ: a checkpoint written under other values of these is not resumed. steps, logging,
# validation, saving, threads and progress may change on resume (e.g. to extend a run).
RUN_KEYS = ("seed", "base", "ta", "data", "meta", "optim", "distributed", "batch_size")


def run_hash(recipe: MetaRecipe) -> str:
    """Hash of the recipe sections that decide φ (as ``ckl update``'s run hash)."""
    return recipe_hash({k: getattr(recipe, k) for k in RUN_KEYS})


def resume(run_dir: Path, engine: Engine, recipe: MetaRecipe, ctx: DistContext) -> int:
    """Load the latest checkpoint into φ's engine and this rank's RNG; return the step to continue from.

    A checkpoint of another run hash (a changed seed, model, data, meta, optim... section) is not
    resumed, as ``ckl update`` drops a stale run: continuing would mix two recipes in one φ. Here
    nothing is deleted: its checkpoints and metrics move to ``run_dir/stale-<hash>/`` and the run
    starts at step 0.
    """
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return 0
    if recipe.resume == "never":
        raise ConfigError(f"resume: {run_dir} already holds {ckpt.name}; use resume=auto or a new run_dir")
    old = load_state(ckpt / "state").get("run_hash")  # None: written before run hashes (resumed as before)
    if old is not None and old != run_hash(recipe):
        engine.barrier()
        if ctx.is_main:
            stale = run_dir / f"stale-{old}"
            stale.mkdir(exist_ok=True)
            for name in ("checkpoints", "metrics.jsonl"):
                if (run_dir / name).exists():
                    os.replace(run_dir / name, stale / name)
            what = ", ".join(RUN_KEYS)
            print0(
                f"warning: {ckpt} was written by a different recipe ({what}); moved to {stale}",
                file=sys.stderr,
            )
        engine.barrier()
        return 0
    return int(load_step(ckpt, engine)["step"])  # refuses another number of ranks or ZeRO stage


def diagnostic_batches(tokenizer, val_rows: list[dict], recipe: MetaRecipe) -> list[EpisodeBatch]:
    """The held-out pairs as φ sees documents, DIAG_BATCH at a time."""
    d = recipe.data
    return [
        make_episode_batch(tokenizer, val_rows[i : i + DIAG_BATCH], d.max_length, d.task_max_length)
        for i in range(0, len(val_rows), DIAG_BATCH)
    ]


def diagnose(
    engine: Engine, ta: TrainAttentionModel, batches: list[EpisodeBatch], ctx: DistContext, base
) -> dict:
    """The held-out diagnostic on rank 0 (``object_weight_share``); collective (φ is consolidated)."""
    full = consolidated_ta(engine, ta)
    return object_weight_share(full, batches, base) if ctx.is_main else {}


def step_record(
    step: int,
    res: MetaStepResult,
    batch: EpisodeBatch,
    ctx: DistContext,
    seconds: float,
    retain: bool = False,
) -> dict:
    """One metrics.jsonl line: the losses, φ's gradient norm, its weights on object vs other tokens
    (and, with the retention term, the known facts' loss at θ and under θ')."""
    stats = {
        "outer_loss": res.outer_loss,
        "outer_loss_before": res.outer_loss_before,
        "inner_loss": res.inner_loss,
        "grad_norm": res.grad_norm,
        **weight_stats(res.w, batch),
    }
    if retain:
        stats.update(retain_loss=res.retain_loss, retain_loss_before=res.retain_loss_before)
    return {"step": step, **mean_over_ranks(ctx, stats), "seconds": seconds}  # a sync point on several ranks


def meta_train(recipe: MetaRecipe) -> Path:
    """Run (or resume) meta-training; returns the directory of the final TA model.

    Without ``distributed.ds_config`` this is one plain torch process. With it, every rank of the
    launch (or a single process) runs this same loop: φ is a DeepSpeed ZeRO engine and each rank
    takes its own slice of the step's episodes.
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

    # --- models: the base θ and φ, trained through an engine (ZeRO partitions φ there)
    tokenizer = AutoTokenizer.from_pretrained(recipe.base.path)
    base, params = load_base(recipe, ctx)
    ta = build_ta_model(
        recipe.ta.init_from or recipe.base.path,
        recipe.ta.num_layers,
        surprise=recipe.ta.surprise,
        echo=recipe.ta.echo,
    ).train()
    trainable = configure_ta_training(ta, recipe.ta.train, recipe.ta.head_bias, recipe.ta.surprise_prior)
    optimizer = build_optimizer(list(trainable.values()), recipe.optim)
    engine = build_engine(ta, trainable, optimizer, recipe.optim.grad_clip, ctx)

    window = recipe.data.window  # evidence windows around each pair's object (0: whole documents)
    pairs = window_pairs(tokenizer, load_pairs(recipe.data.train, "data.train"), window)
    val_rows = (
        window_pairs(tokenizer, load_pairs(recipe.data.val, "data.val"), window) if recipe.data.val else []
    )
    diag = diagnostic_batches(tokenizer, val_rows, recipe) if recipe.diag_every else []
    known = load_pairs(recipe.data.retain, "data.retain", PROBE_FIELDS) if recipe.data.retain else []
    start = resume(run_dir, engine, recipe, ctx)
    if start:
        print0(f"resuming from step {start}")
    metrics = MetricsLogger(run_dir / "metrics.jsonl" if ctx.is_main else None)
    metrics.resume_at(start)  # steps logged after the checkpoint are run (and logged) again
    if diag and start == 0:  # the curve's start: φ before any step
        metrics.log(step=0, **diagnose(engine, ta, diag, ctx, base))
    o = recipe.optim
    mine = episode_slice(recipe.batch_size, ctx.rank, ctx.world)  # this rank's episodes of every meta-batch
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="meta-train",
               disable=not (recipe.progress and ctx.is_main))  # fmt: skip
    t0, tokens = time.perf_counter(), 0  # tokens: this rank's documents and tasks since the (re)start
    with StopFlag() as stop:  # SIGTERM / SIGINT: checkpoint after this step, exit 6 (as ckl update)
        for step in bar:
            rows = [pairs[i] for i in episode_indices(len(pairs), recipe.batch_size, step, recipe.seed)]
            batch = make_episode_batch(tokenizer, rows, recipe.data.max_length, recipe.data.task_max_length)
            if recipe.distributed.partition_base:  # ranks gather shards together: no episode may skip a pass
                require_task_objects(batch, rows, recipe.data.task_max_length)
            batch = batch.rows(mine)
            retain = None  # the retention term's known facts: the same on every rank, a function of the step
            if known:
                picked = episode_indices(len(known), recipe.data.retain_batch_size, step, recipe.seed + 1)
                retain = make_probe_batch(tokenizer, [known[i] for i in picked], recipe.data.task_max_length)
            done = step + 1
            diag_now = bool(diag) and done % recipe.diag_every == 0
            log = done % recipe.log_every == 0 or done == recipe.steps or diag_now
            lr = outer_lr(step, o.lr, recipe.steps, o.schedule, o.warmup_steps, o.min_lr_ratio)
            for group in engine.optimizer.param_groups:  # a pure function of the step: nothing to resume
                group["lr"] = lr
            res = meta_step(
                engine, base, params, batch, recipe.meta, log, recipe.ta.surprise, retain
            )  # φ(D), dL/dw, φ's step
            tokens += int(batch.doc_mask.sum()) + int(batch.task_mask.sum())

            if log:
                seconds = time.perf_counter() - t0
                record = {**step_record(done, res, batch, ctx, seconds, bool(known)), "lr": lr}
                validating = done == recipe.steps or (recipe.val_every and done % recipe.val_every == 0)
                if val_rows and recipe.val.pairs and validating:
                    full = consolidated_ta(engine, ta)  # collective; rank 0 validates
                    if ctx.is_main:
                        record.update(validate(full, recipe.base, val_rows, recipe))
                if diag_now:
                    record.update(diagnose(engine, ta, diag, ctx, base))
                metrics.log(**record)
                speed = tokens / (time.perf_counter() - t0)  # tokens/s of this process, documents and tasks
                bar.set_postfix(outer=f"{record['outer_loss']:.3f}", w_obj=f"{record['w_object']:.2f}",
                                w_oth=f"{record['w_other']:.2f}", tok_s=f"{speed:.0f}")  # fmt: skip
            stopping = engine.all_mean(float(stop.requested)) > 0  # ranks see a signal at different steps
            if stopping or done == recipe.steps or (recipe.save_every and done % recipe.save_every == 0):
                save_run_checkpoint(run_dir, done, engine, ta, tokenizer, recipe)
            if stopping and done < recipe.steps:
                raise KeyboardInterrupt(f"stopped by a signal at step {done}; the next run resumes")

    full, final = consolidated_ta(engine, ta), run_dir / "ta"  # collective
    if ctx.is_main:
        save_ta_model(full, final, tokenizer, recipe_hash(recipe))
    engine.barrier()
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
    except KeyboardInterrupt as e:  # a signal: checkpointed; the next run resumes
        print0(f"meta-train stopped: {e}", file=sys.stderr)
        raise SystemExit(int(ExitCode.INTERRUPTED)) from None
    finally:
        shutdown()
    print0(f"TA model written to {final}")


if __name__ == "__main__":
    main()
