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
Exit codes: ``nightly.ExitCode``. DESIGN §8 is the contract this loop keeps.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a script: sys.path[0] is ckl_toolkit/, whose subpackages (data, core, ...)
    # would be importable as top-level modules; import the package from the repository root instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ckl_toolkit.core.checkpoint import latest_checkpoint
from ckl_toolkit.core.config import ConfigError, load_recipe, to_yaml
from ckl_toolkit.core.io import MetricsLogger, write_json_atomic, write_text_atomic
from ckl_toolkit.core.losses import target_mask, token_nll, weighted_loss
from ckl_toolkit.core.text import Encoded
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
    LockedError,
    NonFiniteGuard,
    RunLock,
    current_version,
    exit_code_for,
)
from ckl_toolkit.nightly.run import (
    LEDGER_FILE,
    build_weigher,
    collect_plan,
    epoch_items,
    finish_work,
    load_plan,
    load_step,
    new_run_id,
    plan_documents,
    publish,
    save_step,
    versions_info,
)  # fmt: skip
from ckl_toolkit.nightly.streams import DocumentLedger, StreamStats, batches
from ckl_toolkit.training.engine import Engine, build_engine, update_ds_config
from ckl_toolkit.training.recadam import RecAdam
from ckl_toolkit.training.rho1 import rho1_loss
from ckl_toolkit.training.targets import build_target, check_target_runtime, check_version_kind
from ckl_toolkit.training.token_align import row_text_batch
from ckl_toolkit.training.weighting import TextBatch

logger = logging.getLogger("ckl_toolkit.update")


class StopFlag:
    """While entered, SIGTERM / SIGINT ask the loop to checkpoint and exit 6 after the current step.

    A second SIGINT stops at once (the last checkpoint still resumes). The previous handlers come
    back on exit, so an in-process caller keeps its own.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: checkpointing at the end of this step, then exiting", signum)

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_optimizer(recipe: UpdateRecipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = recipe.optim
    if o.name == "recadam":  # anchors θ* = the weights this run starts from, taken at the first step
        return RecAdam(params, lr=o.lr, weight_decay=o.weight_decay, gamma=o.recadam_gamma,
                       anneal_k=o.recadam_k, anneal_t0=o.recadam_t0)  # fmt: skip
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def make_engine(recipe: UpdateRecipe, target, optimizer, ctx: DistContext) -> Engine:
    return build_engine(target.model, target.trainable(), optimizer, recipe.optim.grad_clip, ctx)


def check_recipe(recipe: UpdateRecipe, world: int | None = None) -> dict | None:
    """The checks that need no process group (before spawning ranks); the effective DeepSpeed config.

    ``world`` defaults to what the launcher announced; None is returned for backend=single.
    """
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
    return update_ds_config(recipe.engine.ds_config, world, recipe.data.batch_size, o.grad_clip,
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


def rank_rows(batch: dict, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch; a rank left without rows trains on a fully masked one."""
    ids, mask = batch["input_ids"][rank::world], batch["attention_mask"][rank::world]  # (b, T)
    if ids.size(0) == 0:  # the last batch is short: still run forward/backward (collectives), at weight 0
        ids, mask = batch["input_ids"][:1], torch.zeros_like(batch["attention_mask"][:1])
    return ids, mask


def update(recipe: UpdateRecipe) -> dict:
    """Run (or resume) one nightly update. Returns the run summary, ``exit_code`` included.

    Raises:
        LockedError, DivergenceError, ConfigError, StreamError, KeyboardInterrupt: see ExitCode.
    """
    check_target_runtime(recipe.target)
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
        (plan, ledger): the plan as every rank sees it, and the ledger of the served version.
    """
    work = out / "work"
    plan = load_plan(work, recipe, version) if ctx.is_main else None
    ledger = DocumentLedger(version / LEDGER_FILE if version else work / LEDGER_FILE)  # absent: empty
    if ctx.is_main and plan is None:
        finish_work(work)  # a stale run (other base version or recipe) is dropped; nothing of it was served
        plan = collect_plan(recipe, ledger, version, new_run_id())
        write_json_atomic(work / "plan.json", plan)
        write_text_atomic(work / "recipe.yaml", to_yaml(recipe))
    return broadcast_object(ctx, plan), ledger


def text_batch(batch: dict, rank: int, world: int, tokenizer, needs_text: bool, objects: dict) -> TextBatch:
    """This rank's rows as a TextBatch; texts and spans are decoded only for weights that read text."""
    ids, mask = rank_rows(batch, rank, world)  # (b, T)
    tb = row_text_batch(tokenizer, ids, mask) if needs_text else TextBatch(Encoded(ids, mask, []), [])
    tb.objects = [objects[d] for d in batch["doc_ids"]]  # the oracle's strings (None if absent)
    return tb


def step_record(
    st: dict, run: str, epoch: int, loss: float, w: torch.Tensor, mask: torch.Tensor, engine
) -> dict:
    """One metrics.jsonl line: loss, mean weight on real targets, tokens/s, RecAdam drift ‖θ−θ*‖."""
    real = target_mask(mask)  # (b, T-1)
    return {
        "event": "step", "run": run, "step": st["step"], "epoch": epoch, "loss": loss,
        "w_mean": float(w[real].mean()) if real.any() else math.nan, "tokens": st["tokens"],
        "tokens_per_s": st["tokens"] / max(st["train_seconds"], 1e-9), "drift": engine.drift(),
    }  # fmt: skip


def _update_locked(recipe: UpdateRecipe, out: Path, ctx: DistContext, stop: StopFlag) -> dict:
    t_start, work = time.perf_counter(), out / "work"
    metrics = MetricsLogger(out / "metrics.jsonl" if ctx.is_main else None)
    version = current_version(out)  # the served model: this run continues from it
    check_version_kind(version, recipe.target)
    plan, ledger = plan_run(recipe, out, ctx, version)
    run, new_ids = plan["run"], {d["id"] for d in plan["new"]}
    summary = {"run": run, "base_version": plan["base_version"], "documents": len(new_ids),
               "stream": plan["stream_stats"]}  # fmt: skip
    if not new_ids:
        if ctx.is_main:
            finish_work(work)
            metrics.log(event="summary", **summary, exit_code=int(ExitCode.NOTHING_TO_DO))
        return {**summary, "exit_code": int(ExitCode.NOTHING_TO_DO), "versions": versions_info(out)}

    # --- models: the target θ (trained), the weight source (frozen), the optimizer, the engine
    target = build_target(recipe.target, version, recipe.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not ctx.deepspeed and recipe.target.kind != "qlora":  # DeepSpeed / bitsandbytes place their own
        target.model.to(device)
    weigh, needs_text = build_weigher(recipe, target, version, device)
    engine = make_engine(recipe, target, make_optimizer(recipe, list(target.trainable().values())), ctx)
    device = engine.module.device if ctx.deepspeed else device
    target.model.train()
    torch.manual_seed(recipe.seed + ctx.rank)  # dropout (LoRA, K-Adapter) differs per rank, repeatably
    guard = NonFiniteGuard(recipe.max_nonfinite)
    field = recipe.weights.object_field
    objects = {d.id: d.meta.get(field) for d in plan_documents(plan, "pool") + plan_documents(plan, "new")}

    # --- resume: the same documents, epoch, batch, weights, optimizer (and anchors), RNG, ledger
    st = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "train_seconds": 0.0, "cpu_seconds": 0.0,
          "position": None, "rehearsal": 0, "resumed_from": 0}  # fmt: skip
    ckpt = latest_checkpoint(work / "checkpoints")
    if ckpt is not None:
        saved, ledger = load_step(ckpt, engine)
        guard.load_state_dict(saved.pop("guard"))
        st.update(saved, resumed_from=saved["step"])
        logger.info("resuming run %s from %s", run, ckpt)

    bar = tqdm(unit="tok", unit_scale=True, desc="update", disable=not recipe.progress or not ctx.is_main)
    data = recipe.data
    for epoch in range(st["epoch"], recipe.epochs):
        items, ratio = epoch_items(plan, recipe, epoch)  # new documents (+ rehearsal), in training order
        if st["batch"] == 0:
            rehearsed = [d.id for d in items if d.id not in new_ids]
            metrics.log(event="epoch", run=run, epoch=epoch, new=len(new_ids), rehearsal=len(rehearsed),
                        ratio=ratio, rehearsal_ids=sorted(set(rehearsed)))  # fmt: skip
            st["rehearsal"] += len(rehearsed)
        rows = batches(
            items, target.tokenizer, data.max_length, data.batch_size, data.pack, stats=StreamStats()
        )
        for i, batch in enumerate(rows):
            if i < st["batch"]:
                continue  # resumed: trained before the checkpoint (re-tokenised, not re-trained)
            t0, c0 = time.perf_counter(), time.process_time()  # wall and CPU time of this step
            tb = text_batch(batch, engine.rank, engine.world, target.tokenizer, needs_text, objects)
            tb.enc = tb.enc.to(device)
            ids, mask = tb.enc.input_ids, tb.enc.attention_mask  # (b, T)
            nll = token_nll(engine.module, ids, mask)  # (b, T-1) nats per target token
            w = weigh(tb, nll.detach()).to(nll.device)  # (b, T-1) token weights in [0, 1]
            if recipe.weights.method == "rho1":
                loss = rho1_loss(nll, w)  # mean over the kept tokens of the batch
            else:
                loss = weighted_loss(nll, w, target_mask(mask), recipe.weights.normalize)
            mean_loss = engine.all_mean(float(loss.detach()))  # sync point: every rank decides alike
            if guard.check(mean_loss, st["step"] + 1):  # NaN/inf: skip (logged), abort after K in a row
                engine.step(loss)  # backward, clip, optimizer step (RecAdam: the pull to θ* included)
            else:
                metrics.log(event="skip", run=run, step=st["step"] + 1, loss=mean_loss)

            # --- bookkeeping: what this step learned and where the data stands
            n_tok = int(batch["attention_mask"].sum())  # the global batch: every rank holds all of it
            st.update(step=st["step"] + 1, batch=i + 1, position=batch["position"])
            st["tokens"] += n_tok
            st["train_seconds"] += time.perf_counter() - t0
            st["cpu_seconds"] += time.process_time() - c0
            ledger.mark(d for d in batch["completed"] if d.id in new_ids)
            bar.update(n_tok)
            if st["step"] % recipe.log_every == 0:
                metrics.log(**step_record(st, run, epoch, mean_loss, w, mask, engine))
                bar.set_postfix(loss=f"{mean_loss:.3f}")
            stopping = engine.all_mean(float(stop.requested)) > 0  # ranks see a signal at different steps
            if stopping or (recipe.save_every and st["step"] % recipe.save_every == 0):
                save_step(work, engine, {**st, "guard": guard.state_dict()}, ledger, recipe.keep_checkpoints)
            if stopping:
                raise KeyboardInterrupt(f"stopped by a signal at step {st['step']}; the next run resumes")
        st.update(epoch=epoch + 1, batch=0)
    bar.close()

    # --- publish: a complete version appears by rename; only then does `current` move
    train_s = st["train_seconds"]
    summary.update(
        rehearsal_documents=st["rehearsal"], tokens=st["tokens"], steps=st["step"],
        skipped_steps=guard.skipped, train_seconds=round(train_s, 3),
        tokens_per_s=st["tokens"] / max(train_s, 1e-9), cpu_seconds=round(st["cpu_seconds"], 3),
        resumed_from=st["resumed_from"],
        position=st["position"], seconds=round(time.perf_counter() - t_start, 3),
    )  # fmt: skip
    new_version = publish(recipe, engine, target, plan, ledger, summary)
    if ctx.is_main:
        finish_work(work)
        summary.update(version=new_version.name, versions=versions_info(out), exit_code=int(ExitCode.OK))
        metrics.log(event="summary", **summary)
    return {**summary, "exit_code": int(ExitCode.OK)}


def setup_logging(output_dir: str) -> None:
    """Log to stderr and to output_dir/logs/update.log (the run log cron keeps); quiet HF's bars."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
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


def run_cli(recipe_path: str, overrides: list[str] | tuple[str, ...], dry_run: bool = False) -> int:
    """Load, validate and run; print the summary; return the exit code (never raises)."""
    try:
        recipe = load_recipe(UpdateRecipe, recipe_path, overrides)
    except (ConfigError, TypeError) as e:  # TypeError: a required field missing in a nested section
        print(f"error: {e}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    if dry_run:
        print(to_yaml(recipe))
        return int(ExitCode.OK)
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
        print(json.dumps(summary, indent=2, default=str))
    return summary["exit_code"]


def main(argv: list[str] | None = None) -> None:
    """Entry of ``python|torchrun|deepspeed ckl_toolkit/update.py --recipe R [key=value ...]``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    sys.exit(run_cli(args.recipe, args.overrides, args.dry_run))


if __name__ == "__main__":
    main()
