"""The update recipe: what ``ckl update`` loads from YAML (docs/ARCHITECTURE.md §8).

The training sections (``target``, ``weights``, ``optim``, ``mix_review``, ``batching``) are the shared
ones of ``ckl_toolkit.training.sections``, spelled exactly as in an eval recipe; this module adds
the update's own: the stream (``data``), the engine, and the run's bookkeeping. Every field's help
string is its documentation (``ckl fields --job update``). Validation names the dotted field;
``load_recipe`` adds file:line. Checks that need the machine (QLoRA needs CUDA, paths exist) run at
the start of ``ckl update``, so a GPU recipe still validates on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ckl_toolkit.core.config import check_choices, fld, require
from ckl_toolkit.nightly.gate import GateSpec
from ckl_toolkit.nightly.sources import StreamConfig
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec, OptimSpec, TargetSpec, WeightSpec


@dataclass
class UpdateDataSpec:
    stream: StreamConfig | None = fld(None, "The document stream (new knowledge): paths, format, bad input.")
    pool: StreamConfig | None = fld(
        None,
        "Mix-review's rehearsal pool: older documents, never an evaluation set (needs mix_review.mix_ratio).",
    )
    max_documents: int = fld(0, "New documents per run (0: all); the rest wait for the next run.")

    moved: ClassVar[dict[str, str]] = {
        "max_length": "batching.max_length",
        "batch_size": "batching.batch_size",
        "pack": "batching.pack",
        "shuffle": "batching.shuffle",
    }

    def __post_init__(self):
        require(self.stream is not None, "stream", "required: give data.stream.paths")
        require(self.max_documents >= 0, "max_documents", "must be >= 0")


@dataclass
class EngineSpec:
    backend: str = fld("single", "single (one process) or deepspeed (ZeRO engine; launch with "
                       "torchrun / deepspeed / plain python).", choices=("single", "deepspeed"))  # fmt: skip
    ds_config: str | None = fld(
        None, "DeepSpeed config: a ds_configs/ preset (zero2, zero3, zero3_offload) or a JSON path; "
        "its 'auto' fields are filled from the recipe."
    )  # fmt: skip

    def __post_init__(self):
        check_choices(self)
        require(
            self.backend != "deepspeed" or bool(self.ds_config),
            "ds_config",
            "needed with backend=deepspeed (e.g. ds_configs/zero3.json)",
        )


@dataclass
class UpdateRecipe:
    output_dir: str = fld("runs/update", "Output: versions/, current, work/ (the run in progress), logs.")
    seed: int = fld(0, "Seed of initialisation (LoRA, K-Adapter), shuffling and dropout.")
    target: TargetSpec | None = fld(None, "The model being updated.")
    weights: WeightSpec = field(default_factory=WeightSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    mix_review: MixReviewSpec = field(default_factory=MixReviewSpec)
    batching: BatchSpec = field(default_factory=BatchSpec)
    data: UpdateDataSpec | None = fld(None, "The new documents (and mix-review's pool).")
    engine: EngineSpec = field(default_factory=EngineSpec)
    gate: GateSpec = field(default_factory=GateSpec)
    epochs: int = fld(1, "Passes over this run's new documents.")
    log_every: int = fld(10, "Steps between metrics.jsonl records.")
    save_every: int = fld(50, "Steps between resumable checkpoints (0: by the clock or a stop signal only).")
    save_every_minutes: float = fld(
        0.0, "Also checkpoint when this many minutes passed since the last one (0: off); slow steps are kept."
    )
    keep_checkpoints: int = fld(2, "Step checkpoints kept in work/.")
    keep_versions: int = fld(3, "Published versions kept (the current one always is).")
    max_nonfinite: int = fld(3, "Abort (exit 4) after this many non-finite losses in a row.")
    max_weight_change: float = fld(
        2.0,
        "Refuse to publish (exit 4) when the trained weights moved by more than this relative to where the "
        "night started, ‖θ−θ₀‖/‖θ₀‖ (0: no bound). Non-finite weights are always refused.",
    )
    threads: int = fld(0, "torch intra-op threads (0: torch's default).")
    progress: bool = fld(True, "Show a progress bar with tokens/s.")

    def __post_init__(self):
        require(self.target is not None, "target.path", "required: the model to update")
        require(self.data is not None, "data.stream", "required: the documents to learn")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.save_every >= 0, "save_every", "must be >= 0")
        require(self.save_every_minutes >= 0, "save_every_minutes", "must be >= 0")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.keep_versions >= 1, "keep_versions", "must be >= 1")
        require(self.max_nonfinite >= 1, "max_nonfinite", "must be >= 1")
        require(self.max_weight_change >= 0, "max_weight_change", "must be >= 0 (0: no bound)")
        require(
            self.mix_review.mix_ratio == 0 or self.data.pool is not None,
            "data.pool",
            "needed with mix_review.mix_ratio > 0 (or set mix_review.mix_ratio=0)",
        )
        require(
            self.target.kind != "qlora" or self.engine.backend == "single",
            "engine.backend",
            "target.kind=qlora trains on one GPU here (4-bit weights are not ZeRO-partitioned); use single",
        )
