"""The update recipe: typed sections that ``ckl update`` loads from YAML (DESIGN §3, §4, §7, §8).

Every field's help string is its documentation: ``ckl fields --job update`` lists them and the
README table is drawn from them. Validation names the dotted field; ``load_recipe`` adds file:line.
Checks that need the machine (QLoRA needs CUDA, a ds_config file must exist) run at the start of
``ckl update``, not here, so a GPU recipe still validates on a laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.core.models import DTYPES, LoraSpec
from ckl_toolkit.nightly.streams import StreamConfig
from ckl_toolkit.training.kadapter import KAdapterConfig
from ckl_toolkit.training.mix_review import MixReviewConfig

TARGET_KINDS = ("full", "lora", "qlora", "kadapter")
EXPORTS = ("auto", "model", "merged", "adapter")
WEIGHT_METHODS = ("taalm", "uniform", "oracle", "rho1")


@dataclass
class KAdapterSpec:
    layers: list[int] | None = fld(None, "Base layers the adapters read (null: first, middle, last).")
    adapter_hidden: int = fld(128, "Width of the adapter transformer layers.")
    num_heads: int = fld(4, "Attention heads per adapter layer (must divide adapter_hidden).")
    block_layers: int = fld(2, "Transformer layers inside each adapter.")
    scale: float = fld(0.1, "Factor on the adapter output fused into the last hidden state.")
    dropout: float = fld(0.1, "Dropout inside the adapters.")

    def build(self) -> KAdapterConfig:
        try:
            return KAdapterConfig(**self.__dict__)
        except ValueError as e:  # "kadapter.x=...": from_dict adds the section path itself
            raise ConfigError(str(e).removeprefix("kadapter.")) from None

    def __post_init__(self):
        self.build()


@dataclass
class TargetSpec:
    path: str = fld("", "HF causal-LM directory of the deployed model before its first update.")
    kind: str = fld(
        "full",
        "What trains: full (every weight), lora / qlora (peft adapters; qlora needs CUDA and "
        "bitsandbytes), kadapter (frozen base + K-Adapter blocks).",
        choices=TARGET_KINDS,
    )
    dtype: str = fld("float32", "Parameter dtype of the target.", choices=tuple(DTYPES))
    attn_implementation: str = fld("sdpa", "Attention kernel of the target.", choices=("eager", "sdpa"))
    lora: LoraSpec = field(default_factory=LoraSpec)
    kadapter: KAdapterSpec = field(default_factory=KAdapterSpec)
    export: str = fld(
        "auto",
        "What a version holds: model (HF safetensors), merged (LoRA merged into an HF model, plus "
        "the adapter), adapter (peft or K-Adapter dir); auto: model for full, adapter otherwise.",
        choices=EXPORTS,
    )

    def __post_init__(self):
        check_choices(self)
        require(bool(self.path), "path", "a model directory is required")
        if self.export == "auto":
            self.export = "model" if self.kind == "full" else "adapter"
        require(
            self.export != "merged" or self.kind in ("lora", "qlora"),
            "export",
            f"'merged' needs target.kind lora or qlora, got {self.kind!r}",
        )
        require(
            self.export != "adapter" or self.kind != "full",
            "export",
            "a full fine-tune has no adapter; use 'model'",
        )
        require(
            self.export != "model" or self.kind == "full",
            "export",
            f"target.kind={self.kind!r} exports 'adapter' (or 'merged' for LoRA)",
        )


@dataclass
class WeightSpec:
    method: str = fld(
        "taalm",
        "Token weights: taalm (frozen TA model), uniform (plain fine-tuning), oracle (1 on each "
        "document's object field), rho1 (top keep_ratio tokens by excess loss over the pre-update model).",
        choices=WEIGHT_METHODS,
    )
    ta_path: str | None = fld(None, "TA model directory (ckl meta-train output); needed for taalm.")
    align: str = fld(
        "auto",
        "auto: identity when the TA model records the target's tokenizer, else offsets; "
        "offsets: map weights through character offsets (DESIGN §4).",
        choices=("auto", "identity", "offsets"),
    )
    reduce: str = fld(
        "max", "How a target token combines the TA tokens it overlaps.", choices=("max", "mean")
    )
    normalize: bool = fld(
        True, "Divide each row's weighted loss by its weight sum (TAALM), else by its tokens."
    )
    keep_ratio: float = fld(0.6, "rho1: fraction of the batch's tokens kept.")
    object_field: str = fld("object", "oracle: document field holding the object string.")

    def __post_init__(self):
        check_choices(self)
        require(
            self.method != "taalm" or bool(self.ta_path),
            "ta_path",
            "needed with method=taalm (or choose uniform, oracle, rho1)",
        )
        require(0.0 < self.keep_ratio <= 1.0, "keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")


@dataclass
class UpdateDataSpec:
    stream: StreamConfig | None = fld(None, "The document stream (new knowledge): paths, format, bad input.")
    max_length: int = fld(256, "Tokens per row; longer documents are split into windows, never truncated.")
    batch_size: int = fld(8, "Rows per optimizer step, over all ranks.")
    pack: bool = fld(False, "Pack documents (EOS-separated) into full rows instead of padding each.")
    shuffle: bool = fld(
        False, "Shuffle documents per epoch (seeded); off keeps arrival order, so later wins."
    )
    max_documents: int = fld(0, "New documents per run (0: all); the rest wait for the next run.")

    def __post_init__(self):
        require(self.stream is not None, "stream", "required: give data.stream.paths")
        require(self.max_length >= 2, "max_length", "must be >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.max_documents >= 0, "max_documents", "must be >= 0")


@dataclass
class MixReviewSpec:
    pool: StreamConfig | None = fld(
        None, "Rehearsal pool: older documents, never the evaluation set (null: mix-review off)."
    )
    mix_ratio: float = fld(0.0, "Rehearsal documents per new document at epoch/period 0 (0: off).")
    mix_decay: float = fld(0.7, "Factor on mix_ratio after each epoch or period, in [0, 1].")
    per: str = fld("epoch", "Decay per epoch of a run, or per period (published version).",
                   choices=("epoch", "period"))  # fmt: skip
    seed: int = fld(0, "Seed of the rehearsal draw.")

    def __post_init__(self):
        check_choices(self)
        self.build()
        require(
            self.mix_ratio == 0 or self.pool is not None,
            "pool",
            "needed with mix_ratio > 0 (or set mix_review.mix_ratio=0)",
        )

    def build(self) -> MixReviewConfig:
        try:
            return MixReviewConfig(self.mix_ratio, self.mix_decay, self.seed)
        except ValueError as e:
            raise ConfigError(str(e).removeprefix("mix_review.")) from None


@dataclass
class UpdateOptimSpec:
    name: str = fld("adamw", "adamw, or recadam (annealed pull to the run's starting weights, DESIGN §7).",
                    choices=("adamw", "recadam"))  # fmt: skip
    lr: float = fld(1e-4, "Learning rate (constant).")
    weight_decay: float = fld(0.0, "Decoupled weight decay.")
    grad_clip: float = fld(1.0, "Clip the gradient norm (0: off).")
    recadam_gamma: float = fld(5000.0, "RecAdam: strength γ of γ/2·‖θ−θ*‖² (lr·γ must stay below 2).")
    recadam_k: float = fld(0.5, "RecAdam: steepness k of λ(t) = 1/(1+exp(−k(t−t0))).")
    recadam_t0: float = fld(250.0, "RecAdam: step t0 where λ = 0.5.")

    def __post_init__(self):
        check_choices(self)
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        if self.name == "recadam":
            require(
                self.lr * self.recadam_gamma < 2,
                "recadam_gamma",
                f"lr*gamma = {self.lr * self.recadam_gamma:g} must be < 2 (the pull diverges)",
            )


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
    data: UpdateDataSpec | None = fld(None, "The new documents.")
    mix_review: MixReviewSpec = field(default_factory=MixReviewSpec)
    optim: UpdateOptimSpec = field(default_factory=UpdateOptimSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    epochs: int = fld(1, "Passes over this run's new documents.")
    log_every: int = fld(10, "Steps between metrics.jsonl records.")
    save_every: int = fld(50, "Steps between resumable checkpoints (0: only on a stop signal).")
    keep_checkpoints: int = fld(2, "Step checkpoints kept in work/.")
    keep_versions: int = fld(3, "Published versions kept (the current one always is).")
    max_nonfinite: int = fld(3, "Abort (exit 4) after this many non-finite losses in a row.")
    threads: int = fld(0, "torch intra-op threads (0: torch's default).")
    progress: bool = fld(True, "Show a progress bar with tokens/s.")

    def __post_init__(self):
        require(self.target is not None, "target.path", "required: the model to update")
        require(self.data is not None, "data.stream", "required: the documents to learn")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.save_every >= 0, "save_every", "must be >= 0")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.keep_versions >= 1, "keep_versions", "must be >= 1")
        require(self.max_nonfinite >= 1, "max_nonfinite", "must be >= 1")
        require(
            self.target.kind != "qlora" or self.engine.backend == "single",
            "engine.backend",
            "target.kind=qlora trains on one GPU here (4-bit weights are not ZeRO-partitioned); use single",
        )
