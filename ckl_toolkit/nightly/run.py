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
      versions/vNNNNNN/         model/ or adapter/, ledger.json, documents.jsonl, summary.json, recipe.yaml,
                                gate.json + gate.md (with a gate), rejected.json (refused)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ckl_toolkit.core.checkpoint import load_step as core_load_step
from ckl_toolkit.core.checkpoint import save_step as core_save_step
from ckl_toolkit.core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from ckl_toolkit.nightly.contract import (
    GateRejectedError,
    build_version,
    current_version,
    fault_point,
    list_versions,
    reject_version,
    serve_version,
)
from ckl_toolkit.nightly.gate import write_report
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
    rows_dropped: int = 0  # weights.sparse: rows never run (their documents count as processed)
    empty_steps: int = 0  # weights.sparse: steps whose every row was dropped (no forward, no step)

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
    documents: int  # planned
    stream: dict
    exit_code: int | None = None
    documents_learned: int = 0  # marked by applied steps (a skipped step's documents stay unseen)
    rehearsal_documents: int = 0
    tokens: int = 0
    split_documents: int = 0
    steps: int = 0
    skipped_steps: int = 0
    rows_dropped: int = 0  # weights.sparse: rows below doc_min_mass, never run
    empty_steps: int = 0  # weights.sparse: steps without any row left
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    cpu_seconds: float = 0.0
    resumed_from: int = 0
    seconds: float = 0.0
    planned_steps: int = 0
    planned_tokens: int = 0
    recadam: dict | None = None  # λ(t) at the first and last planned step
    weights_moved: dict | None = None  # training.targets.weights_change
    warnings: list[str] = field(default_factory=list)
    version: str | None = None
    files: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    gate: dict | None = None  # the quality gate's report (nightly.gate), None without a gate

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
        self.rows_dropped, self.empty_steps = state.rows_dropped, state.empty_steps
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
    card: Callable[[Path], None] | None = None,
    gate: Callable[[Path], dict] | None = None,
) -> Path | None:
    """Export the model, commit the ledger and summary into a new version, gate it, move ``current`` to it.

    Collective under ZeRO-3 (the export gathers parameters): every rank enters, rank 0 writes.
    ``card`` writes the model card into the version (after the export, whose README it replaces).
    ``gate`` (rank 0, outside the gather) scores the complete version before ``current`` moves and
    returns its report (``nightly.gate``); a failed report leaves the version marked rejected.
    Returns the new version directory on rank 0 (None elsewhere).

    Raises:
        GateRejectedError: on every rank when the gate failed (``current`` unchanged, exit 8).
    """
    version = None
    with engine.gathered():
        if engine.rank == 0:

            def build(tmp: Path) -> None:
                summary.files = export(tmp)
                learned = [
                    d for d in plan.new if ledger.seen(d)
                ]  # unseen when planned: this run learned them
                ledger.commit(tmp / LEDGER_FILE)
                rows = [{"id": d.id, "shard": d.shard, "line": d.line} for d in learned]
                write_jsonl_atomic(tmp / "documents.jsonl", rows)
                (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
                write_json_atomic(tmp / "summary.json", summary.to_dict())
                if card is not None:
                    card(tmp)

            meta = {"period": plan.period, "run": plan.run, "base_version": plan.base_version}
            meta.update(documents=summary.documents_learned, gated=gate is not None, **version_meta)
            version = build_version(output_dir, build, meta=meta)
    engine.barrier()
    report = None
    if engine.rank == 0:  # the gather is over: the gate loads two models, the engine keeps only its shard
        report = gate(version) if gate is not None else None
        if report is not None:
            write_report(version, report)
            fault_point("gate_reported")
        if report is None or report["passed"]:
            serve_version(output_dir, version, keep_versions)
        else:
            reject_version(
                version,
                {
                    "reason": "gate",
                    "detail": "failed: " + ", ".join(report["failed"]),
                    "failing_probes": report["failing_probes"],
                },
            )
    summary.gate = report
    if engine.all_mean(float(bool(report) and not report["passed"])) > 0:  # sync point: rank 0's verdict
        raise GateRejectedError(
            f"the quality gate refused {version.name if version else 'the new version'} "
            f"({', '.join(report['failed']) if report else 'see rank 0'}); it is kept as rejected and "
            "current is unchanged. Its report: gate.md in the version"
        )
    return version


def model_card(recipe, plan: Plan, summary: RunSummary, version_dir: Path) -> None:
    """``README.md`` of a version (and of its ``adapter/``): what was trained, on what, and how to load it."""
    t, w, o = recipe.target, recipe.weights, recipe.optim
    base = os.path.abspath(t.path) if not t.path.startswith("hf://") else t.path
    kind = {
        "full": "every weight (full fine-tune)",
        "subset": f"only the base's {t.subset} weights (the rest frozen)",
        "kadapter": "K-Adapter blocks on the frozen base",
        "lora": f"LoRA r={t.lora.r}, alpha={t.lora.alpha} on {t.lora.target_modules}",
        "qlora": f"QLoRA (4-bit base) r={t.lora.r}, alpha={t.lora.alpha} on {t.lora.target_modules}",
    }[t.kind]
    weights = w.method + (
        f", Train-Attention model {os.path.abspath(w.ta_path)}" if w.method == "taalm" else ""
    )
    schedule = ""
    if summary.recadam:
        r = summary.recadam
        schedule = f", RecAdam γ={o.recadam.gamma:g}, λ(t) {r['lambda_first']:.3g} → {r['lambda_last']:.3g}"
    moved = summary.weights_moved or {}
    streams = ", ".join(os.path.abspath(p) for p in recipe.data.stream.paths)
    lines = [
        "# A ckl-toolkit nightly update",
        "",
        f"- **Base model**: `{base}`{_conversion_note(base)}",
        f"- **Continues**: {summary.base_version or 'the base model (first update)'}",
        f"- **Trained**: {kind}, {t.dtype}",
        f"- **Token weights**: {weights}",
        f"- **Learned**: {summary.documents} new documents from {streams} ({summary.rehearsal_documents} "
        f"rehearsal), {recipe.epochs} epoch(s), {summary.steps} steps, {summary.tokens} tokens, "
        f"batch {recipe.batching.batch_size}×{recipe.batching.max_length}"
        f"{' packed' if recipe.batching.pack else ''}",
        f"- **Optimizer**: {o.name}, lr {o.lr:g}{schedule}",
        f"- **Weights moved**: ‖Δθ‖ ≈ {moved.get('norm_change', 0):.4g} (relative "
        f"{moved.get('relative_change', 0):.3g}), {moved.get('tensors_changed', 0)} of "
        f"{moved.get('tensors', 0)} trained tensors",
        f"- **Run**: {plan.run}, period {plan.period}; documents.jsonl lists its documents, ledger.json "
        "every id learned so far",
        "",
        "## Load",
        "",
    ]
    if (version_dir / "adapter" / "adapter_config.json").is_file():
        lines += [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "# the adapter records its base model by absolute path",
            'model = AutoPeftModelForCausalLM.from_pretrained("<this version>/adapter")',
            "```",
            "Merged or bf16 copies: `ckl export --version <this version> --merge --dtype bfloat16`.",
        ]
    elif (version_dir / "model").is_dir():
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("<this version>/model")',
            "```",
        ]
    else:
        lines += [
            "K-Adapter: `ckl_toolkit.training.kadapter.load_adapter(base_model, '<this version>/adapter')`."
        ]
    text = "\n".join(lines) + "\n"
    (version_dir / "README.md").write_text(text, encoding="utf-8")
    if (version_dir / "adapter").is_dir():
        (version_dir / "adapter" / "README.md").write_text(text, encoding="utf-8")


def _conversion_note(base: str) -> str:
    """What ``make real`` converted, from its ``conversion.json`` (empty for other models)."""
    path = Path(base) / "conversion.json"
    if not path.is_file():
        return ""
    info = json.loads(path.read_text(encoding="utf-8"))
    return (
        f" ({Path(info.get('gguf_file', '?')).stem.replace('.', ' ')} GGUF, dequantized to "
        f"{info.get('dtype', '?')} from {info.get('source_package', '?')} {info.get('source_version', '')})"
    )


def finish_work(work: Path) -> None:
    """Remove the finished run's work dir (its version is published; a crash before this is harmless)."""
    shutil.rmtree(work, ignore_errors=True)


def versions_info(output_dir: Path) -> dict:
    cur = current_version(output_dir)
    return {"current": cur.name if cur else None, "kept": [p.name for p in list_versions(output_dir)]}


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` (for tests and reports)."""
    return read_jsonl(Path(output_dir) / "metrics.jsonl")
