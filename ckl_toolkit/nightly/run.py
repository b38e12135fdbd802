"""The bookkeeping around the update loop: the run's plan, its checkpoints, its weights, its version.

Layout (on top of ``nightly``'s ``versions/`` and ``current``)::

    output_dir/
      work/                     the run in progress; removed once its version is published
        plan.json               the documents this run learns (and its rehearsal pool), fixed at start
        checkpoints/step_N/     trainable tensors + optimizer (RecAdam anchors), state.json (epoch,
                                batch, data position, guard, counters), rng per rank, ledger.json
      metrics.jsonl             every run's records, tagged with the run id
      logs/update.log
      versions/vNNNNNN/         model/ or adapter/, ledger.json, documents.jsonl, summary.json, recipe.yaml

Why a plan: a run fixes the set of documents it learns before the first step, so a killed run
resumes over exactly the same documents (and epochs and rehearsal draws) even if more arrived since;
those wait for the next run, which finds them unseen in the published ledger.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ckl_toolkit.core.checkpoint import load_state, rng_state, save_checkpoint, save_state
from ckl_toolkit.core.config import ConfigError, recipe_hash, to_yaml
from ckl_toolkit.core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from ckl_toolkit.core.ta_model import load_ta_model, load_ta_tokenizer
from ckl_toolkit.evaluation.methods import Rho1Weigher
from ckl_toolkit.nightly.config import UpdateRecipe
from ckl_toolkit.nightly.contract import current_version, list_versions, publish_version
from ckl_toolkit.nightly.streams import Document, DocumentLedger, DocumentStream
from ckl_toolkit.training.mix_review import MixReviewConfig, mix_epoch
from ckl_toolkit.training.targets import Target, build_target, export_target
from ckl_toolkit.training.token_align import CrossTokenizerTAWeights, same_tokenizer
from ckl_toolkit.training.weighting import OracleWeights, TextBatch, TrainAttentionWeights, UniformWeights

logger = logging.getLogger(__name__)

PLAN_FORMAT = "ckl-update-plan/1"
LEDGER_FILE = "ledger.json"


def run_hash(recipe: UpdateRecipe) -> str:
    """Hash of what decides the model; logging, saving and retention settings may change on resume."""
    keys = ("seed", "target", "weights", "data", "mix_review", "optim", "engine", "epochs")
    return recipe_hash({k: getattr(recipe, k) for k in keys})


# ---------------------------------------------------------------------------------------------
# The plan.


def _doc_json(doc: Document) -> dict:
    return {"id": doc.id, "text": doc.text, "shard": doc.shard, "line": doc.line, "meta": doc.meta}


def collect_plan(recipe: UpdateRecipe, ledger: DocumentLedger, version: Path | None, run_id: str) -> dict:
    """One pass over the stream: the unseen documents (capped by data.max_documents), and the pool.

    Bad records are quarantined or fatal here, before any training. Raises StreamError (fatal).
    """
    stream = DocumentStream(recipe.data.stream)
    new: list[Document] = []
    for doc in ledger.unseen(stream, stream.stats):
        new.append(doc)
        if recipe.data.max_documents and len(new) >= recipe.data.max_documents:
            break
    pool = list(DocumentStream(recipe.mix_review.pool)) if recipe.mix_review.mix_ratio > 0 else []
    if recipe.weights.method == "oracle":
        for doc in new + pool:
            if not doc.meta.get(recipe.weights.object_field):
                raise ConfigError(
                    f"weights.method=oracle: {doc.shard}:{doc.line}: document has no "
                    f"'{recipe.weights.object_field}' field (weights.object_field)"
                )
    period = 0
    if version is not None:
        period = json.loads((version / "version.json").read_text()).get("period", 0) + 1
    return {
        "format": PLAN_FORMAT, "run": run_id, "base_version": version.name if version else None,
        "period": period, "recipe_hash": run_hash(recipe), "stream_end": stream.position.to_json(),
        "stream_stats": stream.stats.to_dict(), "new": [_doc_json(d) for d in new],
        "pool": [_doc_json(d) for d in pool],
    }  # fmt: skip


def load_plan(work: Path, recipe: UpdateRecipe, version: Path | None) -> dict | None:
    """The plan of an interrupted run that may resume, or None (no plan, or a stale one)."""
    path = work / "plan.json"
    if not path.is_file():
        return None
    plan = json.loads(path.read_text(encoding="utf-8"))
    base = version.name if version else None
    if plan.get("format") != PLAN_FORMAT or plan.get("base_version") != base:
        logger.info(
            "discarding %s: it was planned on version %s, current is %s", work, plan.get("base_version"), base
        )
        return None
    if plan.get("recipe_hash") != run_hash(recipe):
        logger.warning("discarding the interrupted run in %s: the recipe changed since; starting over", work)
        return None
    return plan


def plan_documents(plan: dict, role: str) -> list[Document]:
    return [Document(d["id"], d["text"], d["shard"], d["line"], d["meta"]) for d in plan[role]]


def epoch_items(plan: dict, recipe: UpdateRecipe, epoch: int) -> tuple[list[Document], float]:
    """The documents of one epoch, in training order, and the mix-review ratio used.

    Mix-review: ratio = mix_ratio · mix_decay**e with e the epoch (per='epoch') or the period (the
    number of versions before this run, per='period'); rehearsal documents come from the pool only.
    """
    new, mr = plan_documents(plan, "new"), recipe.mix_review
    if mr.mix_ratio > 0:
        exponent = epoch if mr.per == "epoch" else plan["period"]
        salt = plan["period"] if mr.per == "epoch" else epoch  # a fresh draw per night / per epoch
        cfg = MixReviewConfig(mr.mix_ratio, mr.mix_decay, seed=mr.seed * 1_000_003 + salt)
        items = mix_epoch(new, plan_documents(plan, "pool"), cfg, exponent)  # shuffled: new + rehearsal
        return items, mr.mix_ratio * mr.mix_decay**exponent
    if recipe.data.shuffle:
        random.Random(f"update:{recipe.seed}:{plan['period']}:{epoch}").shuffle(new)
    return new, 0.0


# ---------------------------------------------------------------------------------------------
# Token weights.

Weigher = Callable[[TextBatch, torch.Tensor], torch.Tensor]


def _ta_source(recipe: UpdateRecipe, target: Target, device: torch.device):
    spec, path = recipe.weights, Path(recipe.weights.ta_path)
    if not (path / "ta_config.json").is_file():
        raise ConfigError(f"weights.ta_path: {path} is not a TA model directory (no ta_config.json)")
    ta = load_ta_model(path).to(device)
    align = spec.align
    if align == "auto":
        same = same_tokenizer(json.loads((path / "ta_config.json").read_text()), target.tokenizer)
        if same is None:
            raise ConfigError(
                f"weights.ta_path: {path} records no tokenizer; set weights.align=identity if it uses "
                "the target's tokenizer, or save the TA model with its tokenizer"
            )
        align = "identity" if same else "offsets"
    if align == "identity":
        if ta.config.vocab_size < len(target.tokenizer):
            raise ConfigError(
                f"weights.align=identity: the TA model's vocabulary ({ta.config.vocab_size}) is "
                f"smaller than the target's ({len(target.tokenizer)}); use weights.align=offsets"
            )
        return TrainAttentionWeights(ta), False
    if not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"weights.align=offsets: {path} has no tokenizer files to tokenise with")
    return CrossTokenizerTAWeights(ta, load_ta_tokenizer(path), spec.reduce), True


def build_weigher(recipe: UpdateRecipe, target: Target, version: Path | None, device) -> tuple[Weigher, bool]:
    """The recipe's weight source as ``weigh(text_batch, nll) -> (B, T-1)``, and whether it needs texts."""
    method = recipe.weights.method
    if method == "uniform":
        src = UniformWeights()
        return (lambda tb, nll: src.weights(tb)), False
    if method == "oracle":
        src = OracleWeights()

        def oracle(
            tb: TextBatch, nll: torch.Tensor
        ) -> torch.Tensor:  # any member's object, anywhere in a row
            masks = [src.weights(TextBatch(tb.enc, tb.texts, [o] * len(tb.texts))) for o in tb.objects]
            return torch.stack(masks).amax(dim=0)

        return oracle, True
    if method == "taalm":
        src, needs_text = _ta_source(recipe, target, device)
        return (lambda tb, nll: src.weights(tb)), needs_text
    # rho1: the reference is the model before this update, frozen (a second copy in memory).
    ref = build_target(recipe.target, version, recipe.seed).model.to(device)
    return Rho1Weigher(ref, recipe.weights.keep_ratio).weights, False


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_step(work: Path, engine, state: dict, ledger: DocumentLedger, keep: int) -> None:
    """A resumable checkpoint, written by every rank into one staging dir, then renamed by rank 0."""
    root, step = work / "checkpoints", state["step"]
    staging = root / f".staging_{step:08d}"
    if engine.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    engine.barrier()
    engine.save(staging)
    save_state(staging / f"rng_rank{engine.rank}", rng_state())
    if engine.rank == 0:
        save_state(staging / "state", state)
        ledger.commit(staging / LEDGER_FILE)  # base ledger + documents finished so far

    engine.barrier()
    if engine.rank == 0:

        def move(tmp: Path) -> None:
            for item in staging.iterdir():
                item.rename(tmp / item.name)

        save_checkpoint(root, step, move, keep=keep)
        shutil.rmtree(staging, ignore_errors=True)
    engine.barrier()


def load_step(ckpt: Path, engine) -> tuple[dict, DocumentLedger]:
    from ckl_toolkit.core.checkpoint import set_rng_state

    engine.load(ckpt)
    set_rng_state(load_state(ckpt / f"rng_rank{engine.rank}"))
    return load_state(ckpt / "state"), DocumentLedger(ckpt / LEDGER_FILE)


# ---------------------------------------------------------------------------------------------
# Publishing.


def publish(recipe: UpdateRecipe, engine, target: Target, plan: dict, ledger: DocumentLedger, summary: dict):
    """Export the model, commit the ledger and summary into a new version, move ``current`` to it."""
    out = Path(recipe.output_dir)
    new = plan_documents(plan, "new")
    version = None
    with engine.gathered():  # collective under ZeRO-3: every rank enters, rank 0 writes
        if engine.rank == 0:

            def build(tmp: Path) -> None:
                summary["files"] = export_target(target, tmp)
                ledger.mark(new)
                ledger.commit(tmp / LEDGER_FILE)
                write_jsonl_atomic(
                    tmp / "documents.jsonl", [{"id": d.id, "shard": d.shard, "line": d.line} for d in new]
                )
                (tmp / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
                write_json_atomic(tmp / "summary.json", summary)

            meta = {"target_kind": recipe.target.kind, "period": plan["period"], "run": plan["run"],
                    "documents": len(new), "recipe_hash": run_hash(recipe)}  # fmt: skip
            version = publish_version(out, build, keep_last=recipe.keep_versions, meta=meta)
    engine.barrier()
    return version


def finish_work(work: Path) -> None:
    """Remove the finished run's work dir (its version is published; a crash before this is harmless)."""
    shutil.rmtree(work, ignore_errors=True)


def versions_info(output_dir: Path) -> dict:
    cur = current_version(output_dir)
    return {"current": cur.name if cur else None, "kept": [p.name for p in list_versions(output_dir)]}


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S")


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` (for tests and reports)."""
    return read_jsonl(Path(output_dir) / "metrics.jsonl")
