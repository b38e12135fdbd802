"""The meta-training recipe: typed sections that ``ckl meta-train`` / ``meta.py`` load from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckl_toolkit.core.config import check_choices, fld, require
from ckl_toolkit.core.models import ModelSpec
from ckl_toolkit.core.ta_model import HEAD_BIAS_INIT
from ckl_toolkit.distributed.ds_config import DsFields
from ckl_toolkit.metalearn.metagrad import MetaGradConfig
from ckl_toolkit.metalearn.ta_train import parse_ta_train


@dataclass
class TASpec:
    init_from: str | None = fld(None, "HF directory whose trunk becomes the TA model (null: the base's).")
    num_layers: int | None = fld(None, "Keep only the trunk's first k layers (null: all).")
    train: str = fld(
        "all",
        "What of φ trains: head (the hidden->1 head only) | last_k:K (+ the trunk's last K layers) | "
        "lora / lora:R (LoRA adapters on the trunk + head; saved merged) | all.",
    )
    head_bias: float = fld(
        HEAD_BIAS_INIT,
        "The head's initial bias (weight 0: every token starts at σ(bias)). 0 starts on the sigmoid's "
        "steep part; with the normalised loss only relative weights matter, so it is still uniform.",
    )

    surprise: bool = fld(
        False,
        "φ also reads the target's own per-token loss log(1+ℓ) beside its hidden states, so tokens the "
        "model already predicts can get low weight (label-free; one more base forward per step).",
    )
    echo: bool = fld(
        False,
        "φ reads each document twice (D D) and weights each token from its second copy, so a weight "
        "can depend on the whole document, not only on what precedes the token (twice φ's tokens).",
    )
    surprise_prior: float = fld(
        0.0,
        "With surprise: the head's initial weight on log(1+ℓ). 0 starts uniform; > 0 with a negative "
        "head_bias (e.g. 2.0 and -3) starts φ from weighting tokens by the target's surprise, and "
        "meta-training moves it from there.",
    )

    def __post_init__(self):
        parse_ta_train(self.train)  # ValueError "train: ..."
        if self.surprise_prior and not self.surprise:
            raise ValueError("surprise_prior: needs surprise: true (the head reads no loss without it)")


@dataclass
class MetaDataSpec:
    train: str = fld("", "JSONL of meta-training pairs {text, task, object} (ARCHITECTURE.md §5).")
    val: str | None = fld(None, "JSONL of held-out pairs for validation (null: no validation).")
    max_length: int = fld(256, "Documents are truncated to this many tokens.")
    task_max_length: int = fld(64, "Tasks (probes) are truncated to this many tokens.")
    window: int = fld(
        0,
        "Evidence windows: cut each document to this many tokens around its object's first "
        "occurrence (0: the whole document, up to max_length).",
    )

    retain: str | None = fld(
        None,
        "JSONL of facts the base already knows {task, object} (task ends with the object), for the "
        "retention term meta.retain_weight: each step scores retain_batch_size of them under θ' "
        "(`ckl data known-facts` writes one). Keep them apart from the facts an evaluation measures.",
    )
    retain_batch_size: int = fld(16, "Known facts scored per TA step (the same ones on every rank).")

    def __post_init__(self):
        require(self.max_length >= 8, "max_length", "must be >= 8")
        require(self.window >= 0, "window", "must be >= 0")
        require(self.retain_batch_size >= 1, "retain_batch_size", "must be >= 1")


@dataclass
class MetaOptimSpec:
    name: str = fld(
        "adamw",
        "Optimizer of the TA model (a torch optimizer; under ZeRO, adamw and adam are "
        "the ones DeepSpeed accepts without zero_allow_untested_optimizer).",
        choices=("adamw", "adam", "sgd"),
    )
    lr: float = fld(3e-4, "Learning rate of the TA model (outer step).")
    weight_decay: float = fld(0.0, "Weight decay of the TA model (decoupled for adamw).")
    grad_clip: float = fld(1.0, "Clip the TA gradient norm (0: off); under DeepSpeed, its gradient_clipping.")
    schedule: str = fld(
        "constant",
        "Outer lr after the warm-up: constant, or cosine decay to min_lr_ratio·lr at the last step.",
        choices=("constant", "cosine"),
    )
    warmup_steps: int = fld(0, "Linear warm-up of the outer lr over this many TA steps.")
    min_lr_ratio: float = fld(0.1, "cosine: the final lr as a fraction of lr.")

    def __post_init__(self):
        check_choices(self)
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")


@dataclass
class DistributedSpec:
    """How meta-training is spread over ranks (docs/ARCHITECTURE.md §3)."""

    ds_config: str | None = fld(
        None,
        "DeepSpeed config for φ: a preset of ds_configs/ (zero2, zero3, zero3_offload) or a JSON path. "
        "null: one process, plain torch, no DeepSpeed.",
    )
    partition_base: bool = fld(
        False,
        "ZeRO-3-partition the frozen base over ranks (bases that do not fit one device). The inner "
        "step then trains a per-rank LoRA set: needs base.lora, meta.method=central and a ZeRO-3 ds_config.",
    )
    precision: str = fld(
        "auto",
        "φ's precision under DeepSpeed (fills the config's 'auto' bf16/fp16 fields): auto (bf16 on a "
        "GPU that supports it, else fp32), fp32, bf16.",
        choices=("auto", "fp32", "bf16"),
    )
    backend: str = fld(
        "auto",
        "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo, nccl.",
        choices=("auto", "gloo", "nccl"),
    )

    def __post_init__(self):
        check_choices(self)  # field names get their "distributed." prefix from the recipe loader
        require(
            not (self.partition_base and self.ds_config is None),
            "partition_base",
            "needs distributed.ds_config (a ZeRO-3 preset, e.g. zero3)",
        )


# How this recipe spells what φ's DeepSpeed config is filled from (for the resolver's messages).
META_DS_FIELDS = DsFields(
    ds_config="distributed.ds_config",
    batch="batch_size",
    clip="optim.grad_clip",
    precision="distributed.precision",
    optimizer="optim.name",
)


@dataclass
class MetaValSpec:
    pairs: int = fld(32, "Held-out pairs used per validation (the first N of data.val; 0: no protocol run).")
    epochs: int = fld(3, "Epochs of the Top-Acc protocol run on those facts.")
    lr: float = fld(3e-4, "Learning rate of that protocol run.")
    batch_size: int = fld(8, "Batch size of that protocol run.")


@dataclass
class MetaRecipe:
    run_dir: str = fld("runs/meta", "Run directory: recipe, metrics.jsonl, checkpoints, exported TA.")
    seed: int = fld(0, "Seed of episode order and initialisation.")
    base: ModelSpec = field(default_factory=ModelSpec)
    ta: TASpec = field(default_factory=TASpec)
    data: MetaDataSpec = field(default_factory=MetaDataSpec)
    meta: MetaGradConfig = field(default_factory=MetaGradConfig)
    optim: MetaOptimSpec = field(default_factory=MetaOptimSpec)
    val: MetaValSpec = field(default_factory=MetaValSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    steps: int = fld(300, "TA optimiser steps.")
    batch_size: int = fld(8, "Documents per TA step (the meta-batch), summed over ranks.")
    log_every: int = fld(10, "Steps between metrics.jsonl records.")
    val_every: int = fld(100, "Steps between validations (0: only at the end).")
    diag_every: int = fld(
        0,
        "Steps between held-out diagnostics on data.val (object-token share of φ's weight; one φ "
        "forward, no protocol run); also logged at step 0. 0: off.",
    )
    save_every: int = fld(100, "Steps between checkpoints (0: only at the end).")
    keep_checkpoints: int = fld(2, "Step checkpoints kept on disk.")
    resume: str = fld(
        "auto",
        "'auto' continues from the latest checkpoint in run_dir; 'never' refuses "
        "to reuse a run_dir that has one.",
        choices=("auto", "never"),
    )
    threads: int = fld(0, "torch intra-op threads (0: leave torch's default).")
    progress: bool = fld(True, "Show a progress bar.")

    def __post_init__(self):
        check_choices(self)
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.diag_every >= 0, "diag_every", "must be >= 0")
        require(not self.diag_every or bool(self.data.val), "data.val", "diag_every needs held-out pairs")
        require(
            bool(self.data.retain) == (self.meta.retain_weight > 0),
            "data.retain" if self.meta.retain_weight > 0 else "meta.retain_weight",
            "the retention term needs both data.retain (known facts) and meta.retain_weight > 0",
        )
        if self.distributed.partition_base:  # the inner step runs on a per-rank LoRA set
            require(
                self.base.lora is not None,
                "base.lora",
                "distributed.partition_base needs LoRA adapters "
                "for the per-rank inner step (the partitioned weights are shared); set base.lora={r: 8}",
            )
            require(
                self.meta.inner.params == "all",
                "meta.inner.params",
                "distributed.partition_base trains a per-rank LoRA set on every layer; keep it all",
            )
            require(
                self.meta.method == "central",
                "meta.method",
                "distributed.partition_base needs "
                "meta.method=central (forward-mode AD does not run through ZeRO-3's gathered layers)",
            )
            require(
                not self.data.val,
                "data.val",
                "validation loads the whole base on rank 0, which "
                "distributed.partition_base exists to avoid; set data.val=null and evaluate the export",
            )
