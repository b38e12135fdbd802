"""The bookkeeping around the update loop: its typed state, step checkpoints, summary and version.

Layout (on top of ``contract``'s ``versions/`` and ``current``)::

    output_dir/
      work/                     the run in progress; removed once its version is published
        plan.json               the documents this run learns (and its rehearsal pool), fixed at start
        recipe.yaml
        checkpoints/step_N/     the engine's trainable tensors + optimizer (RecAdam anchors),
                                state.json (UpdateState), rng per rank, ledger.json
      metrics.jsonl             every run's records, tagged with the run id
      logs/update.log
      versions/vNNNNNN/         model/ or adapter/, ledger.json, documents.jsonl, summary.json, recipe.yaml
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ckl_toolkit.core.checkpoint import load_step as core_load_step
from ckl_toolkit.core.checkpoint import save_step as core_save_step
from ckl_toolkit.core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from ckl_toolkit.nightly.contract import current_version, list_versions, publish_version
from ckl_toolkit.nightly.ledger import DocumentLedger
from ckl_toolkit.nightly.plan import Plan
from ckl_toolkit.training.batching import BatchStats, Cursor

LEDGER_FILE = "ledger.json"


@dataclass
class UpdateState:
    """Where a run stands: the loop resumes from exactly this (with the engine, RNG and ledger)."""

    step: int = 0
    epoch: int = 0
    cursor: Cursor = Cursor()  # position in this epoch's document list
    train_seconds: float = 0.0  # wall time inside steps
    cpu_seconds: float = 0.0  # process CPU time inside steps
    rehearsal: int = 0  # rehearsal documents trained so far
    resumed_from: int = 0  # the step of the checkpoint this process started from
    batching: BatchStats = field(default_factory=BatchStats)
    guard: dict = field(default_factory=dict)  # NonFiniteGuard.state_dict()

    def state_dict(self) -> dict:
        return {**asdict(self), "cursor": self.cursor.to_json()}

    @classmethod
    def from_state_dict(cls, state: dict) -> UpdateState:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.items() if k in known}
        values["cursor"] = Cursor.from_json(values.get("cursor"))
        values["batching"] = BatchStats(**values.get("batching", {}))
        return cls(**values)

    @property
    def tokens_per_s(self) -> float:
        return self.batching.tokens / max(self.train_seconds, 1e-9)


@dataclass
class RunSummary:
    """What a run did, for ``metrics.jsonl``, the version's ``summary.json`` and the CLI's output."""

    run: str
    base_version: str | None
    documents: int
    stream: dict
    exit_code: int | None = None
    rehearsal_documents: int = 0
    tokens: int = 0
    split_documents: int = 0
    steps: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    cpu_seconds: float = 0.0
    resumed_from: int = 0
    seconds: float = 0.0
    version: str | None = None
    files: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)

    @classmethod
    def of_plan(cls, plan: Plan) -> RunSummary:
        return cls(plan.run, plan.base_version, len(plan.new), plan.stream_stats)

    def add_state(self, state: UpdateState, skipped_steps: int, seconds: float) -> None:
        self.rehearsal_documents, self.tokens = state.rehearsal, state.batching.tokens
        self.split_documents, self.steps, self.skipped_steps = (
            state.batching.split_docs,
            state.step,
            skipped_steps,
        )
        self.train_seconds, self.cpu_seconds = round(state.train_seconds, 3), round(state.cpu_seconds, 3)
        self.tokens_per_s, self.resumed_from, self.seconds = (
            state.tokens_per_s,
            state.resumed_from,
            round(seconds, 3),
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_step(work: Path, engine, state: UpdateState, ledger: DocumentLedger, keep: int) -> None:
    """A resumable checkpoint (collective): the engine, RNG per rank, the state, and the ledger so far."""
    core_save_step(work / "checkpoints", state.step, engine, state.state_dict(), keep,
                   write_main=lambda staging: ledger.commit(staging / LEDGER_FILE))  # fmt: skip


def load_step(ckpt: Path, engine) -> tuple[UpdateState, DocumentLedger]:
    state = UpdateState.from_state_dict(core_load_step(ckpt, engine))
    state.resumed_from = state.step
    return state, DocumentLedger(ckpt / LEDGER_FILE)


# ---------------------------------------------------------------------------------------------
# Publishing.


def publish(
    output_dir: Path,
    engine,
    export: Callable[[Path], list[str]],
    plan: Plan,
    ledger: DocumentLedger,
    summary: RunSummary,
    recipe_yaml: str,
    version_meta: dict,
    keep_versions: int,
) -> Path | None:
    """Export the model, commit the ledger and summary into a new version, move ``current`` to it.

    Collective under ZeRO-3 (the export gathers parameters): every rank enters, rank 0 writes.
    Returns the new version directory on rank 0 (None elsewhere).
    """
    version = None
    with engine.gathered():
        if engine.rank == 0:

            def build(tmp: Path) -> None:
                summary.files = export(tmp)
                ledger.mark(plan.new)
                ledger.commit(tmp / LEDGER_FILE)
                rows = [{"id": d.id, "shard": d.shard, "line": d.line} for d in plan.new]
                write_jsonl_atomic(tmp / "documents.jsonl", rows)
                (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
                write_json_atomic(tmp / "summary.json", summary.to_dict())

            meta = {"period": plan.period, "run": plan.run, "base_version": plan.base_version}
            meta.update(documents=len(plan.new), **version_meta)
            version = publish_version(output_dir, build, keep_last=keep_versions, meta=meta)
    engine.barrier()
    return version


def finish_work(work: Path) -> None:
    """Remove the finished run's work dir (its version is published; a crash before this is harmless)."""
    shutil.rmtree(work, ignore_errors=True)


def versions_info(output_dir: Path) -> dict:
    cur = current_version(output_dir)
    return {"current": cur.name if cur else None, "kept": [p.name for p in list_versions(output_dir)]}


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` (for tests and reports)."""
    return read_jsonl(Path(output_dir) / "metrics.jsonl")
