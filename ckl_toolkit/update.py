"""The nightly update: ``ckl update --recipe R [key=value ...]`` teaches a deployed model new documents.

    plan   = the stream's documents the ledger has not seen (fixed for the run; bad lines quarantined)
    for each epoch, for each batch of rows (new documents, plus rehearsal under mix-review):
        w    = token weights (frozen TA model φ, uniform, oracle or RHO-1)      (B, T-1)
        loss = token-weighted NLL of the target                                 scalar
        skip the step if the loss is not finite (abort after K in a row), else backward + step
        log metrics; checkpoint every save_every steps (position, ledger, optimizer, RNG)
    publish a version (model, ledger, summary) by atomic rename; move `current`; clear the work dir

Runs as one process, or as a DeepSpeed engine under ``deepspeed ckl_toolkit/update.py --recipe R``
or ``torchrun --nproc_per_node N ckl_toolkit/update.py --recipe R`` (engine.backend=deepspeed).
Exit codes: ``nightly.ExitCode``. ARCHITECTURE.md §8 is the contract this loop keeps.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a script: sys.path[0] is ckl_toolkit/, whose subpackages (data, core, ...)
    # would be importable as top-level modules; import the package from the repository root instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import functools
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ckl_toolkit.core.checkpoint import latest_checkpoint
from ckl_toolkit.core.config import ConfigError, load_recipe, recipe_hash, to_yaml
from ckl_toolkit.core.errors import DivergenceError
from ckl_toolkit.core.io import MetricsLogger, write_text_atomic
from ckl_toolkit.core.losses import LOSS_CHUNK_TOKENS
from ckl_toolkit.core.memory import return_freed_memory
from ckl_toolkit.core.models import load_tokenizer, silence_known_noise
from ckl_toolkit.core.signals import StopFlag
from ckl_toolkit.distributed.ds_config import model_hidden_size
from ckl_toolkit.distributed.process import (
    DistContext,
    broadcast_object,
    init_distributed,
    launched_world_size,
    shutdown,
)
from ckl_toolkit.nightly.config import UpdateRecipe
from ckl_toolkit.nightly.contract import (
    ExitCode,
    GateRejectedError,
    LockedError,
    NotLearnedError,
    RunLock,
    exit_code_for,
    reconcile,
)
from ckl_toolkit.nightly.idstore import IdStore, open_ledger
from ckl_toolkit.nightly.plan import collect_plan, load_plan, new_run_id
from ckl_toolkit.nightly.preflight import check_paths, check_schedule, planned_work, resolve_run
from ckl_toolkit.nightly.run import (
    LEDGER_FILE,
    RunSummary,
    UpdateState,
    finish_work,
    load_step,
    model_card,
    publish,
    save_step,
    versions_info,
)
from ckl_toolkit.training.batching import Cursor, batches
from ckl_toolkit.training.engine import update_ds_config
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.step import NonFiniteGuard, StepResult, weighted_step
from ckl_toolkit.training.targets import (
    check_target_runtime,
    check_version_kind,
    export_target,
    weights_change,
    weights_fingerprint,
)

logger = logging.getLogger("ckl_toolkit.update")

# Below this ‖Δθ‖/‖θ₀‖ a run's summary carries a warning that the model barely changed.
MIN_RELATIVE_CHANGE = 1e-6


def check_recipe(recipe: UpdateRecipe, world: int | None = None) -> dict | None:
    """The checks that need no process group (before spawning ranks); the effective DeepSpeed config.

    ``world`` defaults to what the launcher announced; None is returned for backend=single.
    """
    check_paths(recipe)  # a missing model, TA model or stream fails here, in seconds, naming the field
    world = launched_world_size() if world is None else world
    if recipe.engine.backend == "single":
        if world > 1:
            raise ConfigError(
                f"engine.backend: {world} ranks were launched but backend=single; set "
                "engine.backend=deepspeed engine.ds_config=zero3 (or run one process)"
            )
        return None
    hidden = model_hidden_size(recipe.target.path, "target.path", default=1024)
    o = recipe.optim
    return update_ds_config(recipe.engine.ds_config, world, recipe.batching.batch_size, o.grad_clip,
                            recipe.target.dtype, o.name, hidden)  # fmt: skip


def join_ranks(recipe: UpdateRecipe) -> DistContext:
    """This process's place: rank 0 of 1 (backend=single), or a rank of the DeepSpeed group."""
    return init_distributed(check_recipe(recipe))


def take_lock(out: Path, ctx: DistContext) -> RunLock | None:
    """Rank 0 locks the output directory; every rank learns whether it could (and fails alike)."""
    lock, refused = None, None
    if ctx.is_main:
        try:
            lock = RunLock(out).acquire()
        except LockedError as e:
            refused = str(e)
    refused = broadcast_object(ctx, refused)
    if refused:
        raise LockedError(refused)
    return lock


def run_hash(recipe: UpdateRecipe) -> str:
    """Hash of what decides the model; logging, saving and retention settings may change on resume."""
    keys = ("seed", "target", "weights", "optim", "mix_review", "batching", "data", "engine", "epochs")
    return recipe_hash({k: getattr(recipe, k) for k in keys})


def update(recipe: UpdateRecipe) -> RunSummary:
    """Run (or resume) one nightly update. Returns the run summary, ``exit_code`` included.

    Raises:
        LockedError, DivergenceError, ConfigError, StreamError, KeyboardInterrupt: see ExitCode.
    """
    check_target_runtime(recipe.target)
    return_freed_memory()  # freed activations leave the resident set (core.memory)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    ctx = join_ranks(recipe)
    out = Path(recipe.output_dir)
    lock = take_lock(out, ctx)  # one writer per output directory
    try:
        with StopFlag() as stop:
            return _update_locked(recipe, out, ctx, stop)
    finally:
        if lock is not None:
            lock.release()


def plan_run(recipe: UpdateRecipe, out: Path, ctx: DistContext, version: Path | None):
    """The interrupted run's plan, or a new one from the stream (rank 0 reads it; bad input stops here).

    Returns:
        (plan, ledger): the plan as every rank sees it, and the ledger state of the served version
        (rank 0 opens it, migrating a JSON ledger; the others read the state it names).
    """
    work, key = out / "work", run_hash(recipe)
    data, pool = recipe.data, recipe.data.pool if recipe.mix_review.mix_ratio > 0 else None
    plan = load_plan(work, version, key, data.stream, pool) if ctx.is_main else None
    ledger = open_ledger(out, version / LEDGER_FILE if version else None) if ctx.is_main else None
    if ctx.is_main and plan is None:
        finish_work(work)  # a stale run (other base version or recipe) is dropped; nothing of it was served
        oracle_field = recipe.weights.object_field if recipe.weights.method == "oracle" else None
        tokenizer = load_tokenizer(recipe.target.path)  # what it cannot tokenise is bad input
        plan = collect_plan(
            data.stream,
            pool,
            ledger,
            version,
            new_run_id(),
            key,
            data.max_documents,
            oracle_field,
            tokenizer,
            data.pool_sample,
            recipe.mix_review.mix_ratio,
            recipe.mix_review.seed,
        )
        plan.save(work)
        write_text_atomic(work / "recipe.yaml", to_yaml(recipe))
    state = broadcast_object(ctx, (str(ledger.path), ledger.seq, ledger.root) if ctx.is_main else None)
    if not ctx.is_main:
        ledger = IdStore(state[0], state[1], state[2], readonly=True)
    return broadcast_object(ctx, plan), ledger


def step_record(state: UpdateState, run: str, epoch: int, result: StepResult, engine) -> dict:
    """One metrics.jsonl line: loss, mean weight on real targets, tokens/s, RecAdam drift ‖θ−θ*‖."""
    return {
        "event": "step", "run": run, "step": state.step, "epoch": epoch, "loss": result.loss,
        "w_mean": result.mean_weight, "grad_norm": result.grad_norm, "tokens": state.batching.tokens,
        "tokens_per_s": state.tokens_per_s, "drift": engine.drift(), "rows_dropped": result.rows_dropped,
    }  # fmt: skip


def _update_locked(recipe: UpdateRecipe, out: Path, ctx: DistContext, stop: StopFlag) -> RunSummary:
    t_start, work = time.perf_counter(), out / "work"
    metrics = MetricsLogger(out / "metrics.jsonl" if ctx.is_main else None)
    # A publish killed half-way is finished first (its complete version adopted, pointers agreeing).
    version = reconcile(out) if ctx.is_main else None
    version = broadcast_object(ctx, str(version) if version else None)
    version = Path(version) if version else None  # the served model: this run continues from it
    logger.info(
        "update start: output %s, served version %s, recipe %s, pid %d",
        out,
        version.name if version else "none (first run)",
        run_hash(recipe),
        os.getpid(),
    )
    check_version_kind(version, recipe.target)
    plan, ledger = plan_run(recipe, out, ctx, version)
    summary = RunSummary.of_plan(plan)
    if not plan.new:
        summary.exit_code = int(ExitCode.NOTHING_TO_DO)
        logger.info(
            "nothing to learn: every document of the stream is in the ledger of %s", summary.base_version
        )
        if ctx.is_main:
            if plan.watermarks:  # what was read stays read: a watermark-only state on top of the served one
                ledger.commit(None, "advance", plan.run, plan.published_watermarks(ledger.seen))
            finish_work(work)
            metrics.log(event="summary", **summary.to_dict())
        summary.versions = versions_info(out)
        return summary

    # --- the work the plan means: steps and tokens over all epochs; a RecAdam schedule must let it learn
    todo = planned_work(recipe, plan, load_tokenizer(recipe.target.path))
    summary.planned_steps, summary.planned_tokens = todo.steps, todo.tokens
    summary.stream = {**summary.stream, "tokens": todo.new_tokens}  # the new documents' tokens, one pass
    summary.recadam = check_schedule(recipe, todo.steps)
    logger.info(
        "plan %s: %d new documents (+ %d rehearsal pool), %d epoch(s), %d steps, %d tokens%s",
        plan.run,
        len(plan.new),
        len(plan.pool),
        recipe.epochs,
        todo.steps,
        todo.tokens,
        _lambda_note(summary.recadam),
    )

    gate = build_gate(recipe, version) if ctx.is_main else None  # its files are read (and checked) now

    # --- the learner: target θ (trained), weights (frozen source), optimizer inside its engine
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    learner = build_learner(
        recipe.target,
        recipe.weights,
        recipe.optim,
        version,
        recipe.seed,
        device,
        ctx,
        planned_steps=todo.steps,
    )
    engine, tokenizer = learner.engine, learner.tokenizer
    guard = NonFiniteGuard(recipe.max_nonfinite)
    with engine.gathered():  # the run's starting weights (also after a resume: rebuilt from `version`)
        start_weights = weights_fingerprint(learner.target.trainable())

    # --- resume: the same documents, epoch, cursor, weights, optimizer (and anchors), RNG, ledger
    state = UpdateState()
    ckpt = latest_checkpoint(work / "checkpoints")
    if ckpt is not None:
        state, ledger = load_step(ckpt, engine, out, ctx.is_main)
        guard.load_state_dict(state.guard)
        logger.info("resuming run %s from %s (step %d of %d)", plan.run, ckpt, state.step, todo.steps)

    new_ids = {d.id for d in plan.new}
    b = recipe.batching
    bar = tqdm(
        total=todo.tokens,
        initial=state.batching.tokens,
        unit="tok",
        unit_scale=True,
        desc="update",
        disable=not recipe.progress or not ctx.is_main,
    )
    last_save = time.monotonic()
    for epoch in range(state.epoch, recipe.epochs):
        docs, ratio = plan.epoch_documents(recipe.mix_review, b, recipe.seed, epoch)  # training order
        if state.cursor == Cursor():
            rehearsed = [d.id for d in docs if d.id not in new_ids]
            metrics.log(event="epoch", run=plan.run, epoch=epoch, new=len(new_ids), rehearsal=len(rehearsed),
                        ratio=ratio, rehearsal_ids=sorted(set(rehearsed)))  # fmt: skip
            state.rehearsal += len(rehearsed)
        for batch in batches(
            docs, tokenizer, b.max_length, b.batch_size, b.pack, state.cursor, state.batching
        ):
            t0, c0 = time.perf_counter(), time.process_time()  # wall and CPU time of this step
            result = weighted_step(engine, batch, learner.weigher, tokenizer, guard,
                                   learner.object_field, step=state.step + 1,
                                   sparsity=learner.sparsity)  # fmt: skip
            if not result.applied:  # NaN/inf on some rank: skipped (logged), abort after K in a row
                metrics.log(event="skip", run=plan.run, step=state.step + 1, loss=result.loss)

            # --- bookkeeping: what this step learned and where the data stands
            state.step, state.cursor = state.step + 1, batch.cursor
            state.train_seconds += time.perf_counter() - t0
            state.cpu_seconds += time.process_time() - c0
            state.rows_dropped += result.rows_dropped
            state.empty_steps += int(not result.stepped)
            if result.applied:  # a skipped step learned nothing: its documents stay unseen
                ledger.mark(d for d in batch.completed if d.id in new_ids)
            bar.update(batch.tokens)
            if state.step % recipe.log_every == 0:
                metrics.log(**step_record(state, plan.run, epoch, result, engine))
                bar.set_postfix(loss=f"{result.loss:.3f}", step=f"{state.step}/{todo.steps}")
            stopping = engine.all_mean(float(stop.requested)) > 0  # ranks see a signal at different steps
            reason = checkpoint_due(recipe, state.step, last_save, engine, stopping)
            if reason:
                state.guard = guard.state_dict()
                save_step(work, engine, state, ledger, recipe.keep_checkpoints, plan.run)
                last_save = time.monotonic()
                logger.info(
                    "checkpoint step %d of %d (%s): %s", state.step, todo.steps, reason, work / "checkpoints"
                )
            if stopping:
                raise KeyboardInterrupt(f"stopped by a signal at step {state.step}; the next run resumes")
        state.epoch, state.cursor = epoch + 1, Cursor()
    bar.close()

    # --- did it learn? a version whose weights never moved must not mark its documents learned
    summary.add_state(state, guard.skipped, time.perf_counter() - t_start)
    with engine.gathered():
        summary.weights_moved = weights_change(start_weights, learner.target.trainable())
        finite = all(bool(torch.isfinite(p).all()) for p in learner.target.trainable().values())
    summary.documents_learned = sum(ledger.seen(d) for d in plan.new)  # all unseen when planned
    check_publishable(summary, recipe, finite)

    # --- publish: a complete version appears by rename; the gate scores it; only then does `current` move
    meta = {"target_kind": recipe.target.kind, "recipe_hash": run_hash(recipe)}
    card = functools.partial(model_card, recipe, plan, summary)  # README.md of the version
    try:
        new_version = publish(
            out,
            engine,
            lambda tmp: export_target(learner.target, tmp),
            plan,
            ledger,
            summary,
            to_yaml(recipe),
            meta,
            recipe.keep_versions,
            card,
            gate,
        )
    except GateRejectedError:  # the run is over: its documents stay unseen, its version stays rejected
        summary.exit_code = int(ExitCode.GATE_REJECTED)
        if ctx.is_main:
            finish_work(work)
            summary.versions = versions_info(out)
            metrics.log(event="summary", **summary.to_dict())
        raise
    summary.exit_code = int(ExitCode.OK)
    if ctx.is_main:
        finish_work(work)
        summary.version, summary.versions = new_version.name, versions_info(out)
        metrics.log(event="summary", **summary.to_dict())
        moved = summary.weights_moved
        logger.info(
            "published %s: %d documents, %d steps, %d tokens in %.0f s; weights moved %.3g (relative %.2g)",
            new_version,
            summary.documents,
            summary.steps,
            summary.tokens,
            summary.seconds,
            moved["norm_change"],
            moved["relative_change"],
        )
    return summary


def _lambda_note(recadam: dict | None) -> str:
    if recadam is None:
        return ""
    return f"; RecAdam λ(t) from {recadam['lambda_first']:.3g} to {recadam['lambda_last']:.3g}"


def checkpoint_due(recipe: UpdateRecipe, step: int, last_save: float, engine, stopping: bool) -> str | None:
    """Why a checkpoint is due after ``step`` (None: it is not): a signal, the step count, or the clock.

    The clock's answer is all-reduced: every rank must save at the same step.
    """
    if stopping:
        return "stop signal"
    if recipe.save_every and step % recipe.save_every == 0:
        return f"every {recipe.save_every} steps"
    if recipe.save_every_minutes:
        late = time.monotonic() - last_save >= 60 * recipe.save_every_minutes
        if engine.all_mean(float(late)) > 0:
            return f"every {recipe.save_every_minutes:g} minutes"
    return None


def build_gate(recipe: UpdateRecipe, version: Path | None):
    """The quality gate as a function of the candidate version (None without a ``gate`` section).

    The candidate is compared with the served version, or with ``target.path`` on the first night.
    """
    if not recipe.gate.enabled:
        return None
    gate = recipe.gate.build()
    baseline = str(version) if version is not None else recipe.target.path
    return functools.partial(gate.evaluate, baseline=baseline, dtype=recipe.target.dtype)


def check_publishable(summary: RunSummary, recipe: UpdateRecipe, finite: bool) -> None:
    """Refuse to publish weights that are not finite, moved too far, or did not move; warn when barely.

    Raises:
        DivergenceError: a non-finite trained weight, or ‖θ−θ₀‖/‖θ₀‖ above ``max_weight_change``
            (exit 4; ``current`` keeps serving the previous version).
        NotLearnedError: no trained tensor changed (exit 7; the documents stay unseen for the next run).
    """
    moved = summary.weights_moved
    if not finite:
        raise DivergenceError(
            "a trained weight is NaN or infinite; nothing was published (current is unchanged). Lower "
            "optim.lr, keep optim.grad_clip on, check the stream and the TA model"
        )
    bound = recipe.max_weight_change
    if bound and not moved["relative_change"] <= bound:
        raise DivergenceError(
            f"the night moved the trained weights by ‖Δθ‖/‖θ₀‖ = {moved['relative_change']:.3g} > "
            f"max_weight_change={bound:g}; nothing was published (current is unchanged). Lower optim.lr "
            "or raise max_weight_change if such a change is intended"
        )
    why = f"lr {recipe.optim.lr:g}, {summary.steps} steps ({summary.skipped_steps} skipped)" + _lambda_note(
        summary.recadam
    )
    if moved["tensors_changed"] == 0 and summary.empty_steps == summary.steps > 0:
        note = (
            f"weights.sparse dropped every row of the night ({summary.rows_dropped} rows without weight): "
            "nothing was trained; the version records the documents as processed"
        )
        summary.warnings.append(note)
        logger.warning(note)
        return
    if moved["tensors_changed"] == 0:
        raise NotLearnedError(
            f"the trained weights did not move in {summary.steps} steps ({why}); nothing was published and "
            "the documents stay unseen. Check optim.lr, optim.recadam and the token weights (w_mean in "
            "metrics.jsonl)"
        )
    if moved["relative_change"] < MIN_RELATIVE_CHANGE:
        note = f"the weights barely moved: ‖Δθ‖/‖θ‖ = {moved['relative_change']:.1e} ({why})"
        summary.warnings.append(note)
        logger.warning(note)


def setup_logging(output_dir: str) -> None:
    """Log to stderr and to output_dir/logs/update.log (the run log cron keeps); quiet HF bars and reports."""
    silence_known_noise()
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("ckl_toolkit")
    root.setLevel(logging.INFO)
    for old in [h for h in root.handlers if getattr(h, "_ckl_update", False)]:  # a second run in-process
        root.removeHandler(old)
        old.close()
    for handler in (logging.StreamHandler(), logging.FileHandler(log_dir / "update.log")):
        handler.setFormatter(fmt)
        handler._ckl_update = True
        root.addHandler(handler)


def dry_run(recipe: UpdateRecipe) -> str:
    """The resolved recipe and the run it would start now (``ckl update --dry-run``, ``ckl validate``).

    Raises:
        ConfigError, StreamError: what the run itself would fail with before training.
    """
    resolved = resolve_run(recipe, LOSS_CHUNK_TOKENS)
    return to_yaml(recipe) + "\n# the run, resolved (nothing trained or written):\n" + describe_run(resolved)


def describe_run(resolved: dict) -> str:
    """The resolved run as commented YAML lines, each figure with its unit."""
    w, docs, mem, lam = (
        resolved["work"],
        resolved["documents"],
        resolved["memory_estimate"],
        resolved["recadam"],
    )
    rt = resolved["runtime"]
    lines = [
        f"served version: {resolved['served_version'] or 'none (the first run starts from target.path)'}",
        f"documents: {docs['new']} new, {docs['tokens']} tokens (rehearsal pool {docs['rehearsal_pool']}); "
        f"stream {docs['stream']}",
        f"planned: {w['steps']} optimizer steps, {w['tokens']} tokens, rows per epoch {w['rows']}",
        f"runtime: {rt['device']}, backend {rt['backend']}, {rt['threads']} threads",
    ]
    if lam is not None:
        lines.append(
            f"RecAdam λ(t): {lam['lambda_first']:.3g} at step 1 -> {lam['lambda_last']:.3g} at step "
            f"{lam['steps']} (t0 = step {lam['t0_steps']:.1f}, k = {lam['k_per_step']:.3g}/step)"
        )
    if mem is not None:
        parts = ", ".join(f"{k} {v}" for k, v in mem["parts_mb"].items())
        lines.append(f"peak memory, estimated: {mem['peak_mb']} MB ({parts}; MB)")
    return "".join(f"#   {line}\n" for line in lines)


def run_cli(recipe_path: str, overrides: list[str] | tuple[str, ...], dry_run_only: bool = False) -> int:
    """Load, validate and run; print the summary; return the exit code (never raises)."""
    try:
        recipe = load_recipe(UpdateRecipe, recipe_path, overrides)
        if dry_run_only:
            print(dry_run(recipe))
            return int(ExitCode.OK)
        check_paths(recipe)  # before any model loads: a missing path costs seconds, not a hub timeout
    except (ValueError, TypeError, FileNotFoundError) as e:  # ConfigError, StreamError; TypeError: a nested
        print(f"error: {e}", file=sys.stderr)  # required field missing
        return int(ExitCode.BAD_INPUT)
    setup_logging(recipe.output_dir)
    try:
        summary = update(recipe)
    except BaseException as e:  # noqa: BLE001  (every failure must become an exit code for cron)
        code = exit_code_for(e)
        level = logging.WARNING if code == ExitCode.INTERRUPTED else logging.ERROR
        logger.log(
            level, "update stopped (exit %d %s): %s", code, code.name, e, exc_info=code == ExitCode.FAILURE
        )
        return int(code)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    return summary.exit_code


def main(argv: list[str] | None = None) -> None:
    """Entry of ``python|torchrun|deepspeed ckl_toolkit/update.py --recipe R [key=value ...]``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and run, then exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    sys.exit(run_cli(args.recipe, args.overrides, args.dry_run))


if __name__ == "__main__":
    main()
