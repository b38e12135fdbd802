"""The recipe sections of the shared training layer, the same in ``ckl update`` and ``ckl eval``.

    target      what trains: full / lora / qlora / kadapter           -> TargetSpec.build -> Target
    weights     which tokens count: uniform / oracle / taalm / rho1    -> WeightSpec.build -> Weigher
                (weights.sparse: TA-gated sparse updates                -> SparseSpec.build -> Sparsity)
    optim       AdamW or RecAdam, lr, clipping                         -> OptimSpec.build -> Optimizer
    mix_review  how much older data to rehearse (the pool is data)     -> MixReviewSpec.epoch -> documents
    batching    rows, windows of long documents, packing, shuffling    -> training.batching.batches

One spelling per setting: RecAdam's γ is ``optim.recadam.gamma`` in every recipe. Field help is the
documentation (``ckl fields``). A benchmark method (``taalm+mix_review``) only sets ``weights.method``,
``target.kind``, ``optim.name`` and whether mix-review is on (``evaluation.methods``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.models import DTYPES, LoraSpec
from ckl_toolkit.training.batching import epoch_documents
from ckl_toolkit.training.kadapter import KAdapterConfig
from ckl_toolkit.training.mix_review import MixReviewConfig
from ckl_toolkit.training.recadam import RecAdam, recadam_lambda
from ckl_toolkit.training.step import Sparsity
from ckl_toolkit.training.subset import check_subset
from ckl_toolkit.training.targets import Target, build_target
from ckl_toolkit.training.weighers import Weigher, build_weigher

TARGET_KINDS = ("full", "subset", "lora", "qlora", "kadapter")
EXPORTS = ("auto", "model", "merged", "adapter")
WEIGHT_METHODS = ("taalm", "uniform", "oracle", "rho1")
OPTIMIZERS = ("adamw", "recadam")


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
    path: str = fld("", "HF causal-LM directory of the model before its first update.")
    kind: str = fld(
        "full",
        "What trains: full (every weight), subset (only target.subset of the base's weights), lora / qlora "
        "(peft adapters; qlora needs CUDA and bitsandbytes), kadapter (frozen base + K-Adapter blocks).",
        choices=TARGET_KINDS,
    )
    dtype: str = fld("float32", "Parameter dtype of the target.", choices=tuple(DTYPES))
    attn_implementation: str = fld("sdpa", "Attention kernel of the target.", choices=("eager", "sdpa"))
    subset: str = fld(
        "attention",
        "kind=subset: attention, mlp, mlp_gate_up, top_k_layers:K, freeze_bottom_k:K, or a regular "
        "expression over parameter names (training.subset).",
    )
    lora: LoraSpec = field(default_factory=LoraSpec)
    kadapter: KAdapterSpec = field(default_factory=KAdapterSpec)
    export: str = fld(
        "auto",
        "What a version holds: model (HF safetensors), merged (LoRA merged into an HF model, plus "
        "the adapter), adapter (peft or K-Adapter dir); auto: model for full, adapter otherwise.",
        choices=EXPORTS,
    )
    gradient_checkpointing: bool = fld(
        False,
        "Recompute each layer's activations in backward instead of keeping them: several times less "
        "activation memory for ~30% more compute (full and LoRA targets; K-Adapter's base keeps none).",
    )

    def __post_init__(self):
        check_choices(self)
        require(bool(self.path), "path", "a model directory is required")
        if self.kind == "subset":
            try:
                check_subset(self.subset, "subset")
            except ConfigError as e:
                raise ConfigError(str(e)) from None
        export = self.export_kind
        require(
            export != "merged" or self.kind in ("lora", "qlora"),
            "export",
            f"'merged' needs target.kind lora or qlora, got {self.kind!r}",
        )
        require(
            export != "adapter" or self.kind not in ("full", "subset"),
            "export",
            "a full or subset fine-tune has no adapter; use 'model'",
        )
        require(
            export != "model" or self.kind in ("full", "subset"),
            "export",
            f"target.kind={self.kind!r} exports 'adapter' (or 'merged' for LoRA)",
        )

    @property
    def export_kind(self) -> str:
        """``export`` with auto resolved: model for a full fine-tune, adapter otherwise."""
        if self.export == "auto":
            return "model" if self.kind in ("full", "subset") else "adapter"
        return self.export

    def build(self, version: Path | None, seed: int) -> Target:
        """The target of a run starting from ``version`` (None: from ``path``); see training.targets."""
        return build_target(self, version, seed)


@dataclass
class SparseSpec:
    doc_min_mass: float = fld(
        0.0,
        "Skip a row (a document, its window, or a packed row) whose token-weight mass Σw, after "
        "token_min_weight, is below this: no forward, backward or LM head for it (0: off).",
    )
    token_min_weight: float = fld(
        0.0, "Token weights below this become 0: those tokens leave the loss (0: off)."
    )
    weighted_head: bool = fld(
        False,
        "Run the LM head and cross-entropy only at targets whose weight is > 0 (same loss, less compute).",
    )
    doc_token_weight: float = fld(
        0.0,
        "A row's mass for doc_min_mass counts only tokens weighted at least this (0: all); unlike "
        "token_min_weight it leaves the loss of the rows kept unchanged.",
    )

    def __post_init__(self):
        require(self.doc_min_mass >= 0, "doc_min_mass", "must be >= 0")
        require(0 <= self.token_min_weight <= 1, "token_min_weight", "must be in [0, 1]")
        require(0 <= self.doc_token_weight <= 1, "doc_token_weight", "must be in [0, 1]")

    def build(self) -> Sparsity:
        return Sparsity(self.doc_min_mass, self.token_min_weight, self.weighted_head, self.doc_token_weight)


@dataclass
class WeightSpec:
    method: str = fld(
        "uniform",
        "Token weights: taalm (frozen TA model), uniform (plain fine-tuning), oracle (1 on each "
        "document's object field), rho1 (top keep_ratio tokens by excess loss over the pre-update model).",
        choices=WEIGHT_METHODS,
    )
    ta_path: str | None = fld(None, "TA model directory (ckl meta-train output); needed for taalm.")
    align: str = fld(
        "auto",
        "auto: identity when the TA model records the target's tokenizer, else offsets; "
        "offsets: map weights through character offsets (docs/ARCHITECTURE.md §4).",
        choices=("auto", "identity", "offsets"),
    )
    reduce: str = fld(
        "max", "How a target token combines the TA tokens it overlaps.", choices=("max", "mean")
    )
    normalize: bool = fld(
        True, "Divide each row's weighted loss by its weight sum (TAALM), else by its tokens."
    )
    floor: float = fld(
        0.0,
        "taalm / oracle: every real token weighs at least this much, w' = floor + (1 - floor)·w "
        "(0: the weights as they are; 1: uniform; uniform and rho1 ignore it): keeps the sentence's "
        "own tokens in the update beside the weighted ones (README, 'Did the night learn its facts?').",
    )
    keep_ratio: float = fld(0.6, "rho1: fraction of the batch's tokens kept.")
    object_field: str = fld("object", "oracle: document field holding the object string.")
    sparse: SparseSpec = field(default_factory=SparseSpec)

    def __post_init__(self):
        check_choices(self)
        require(
            self.method != "rho1" or not self.sparse.build().active,
            "sparse",
            "RHO-1's weights need the target's losses first; sparse updates gate on weights known before "
            "the forward (taalm, oracle, uniform)",
        )
        require(
            self.method != "taalm" or bool(self.ta_path),
            "ta_path",
            "needed with method=taalm (or choose uniform, oracle, rho1)",
        )
        require(0.0 < self.keep_ratio <= 1.0, "keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        require(0.0 <= self.floor <= 1.0, "floor", f"must be in [0, 1], got {self.floor}")

    def build(self, target: Target, version: Path | None, seed: int, device) -> Weigher:
        """The weigher of this section for ``target`` (see training.weighers.build_weigher)."""
        return build_weigher(self, target, version, seed, device)


# Below this λ(t) for a whole run, RecAdam's task step is < 1/1000 of Adam's: the run learns nothing.
MIN_RECADAM_LAMBDA = 1e-3


@dataclass
class RecAdamSpec:
    gamma: float = fld(5000.0, "Strength γ of the pull γ/2·‖θ−θ*‖² (lr·γ must stay below 2).")
    k: float = fld(
        0.5, "Steepness k of λ(t) = 1/(1+exp(−k(t−t0))); with relative: per run (λ = σ(k·(t/N − t0)))."
    )
    t0: float = fld(
        250.0,
        "Step t0 where λ = 0.5 (the paper's 250 suits runs of thousands of steps); with relative: a "
        "fraction of the run's N planned steps (0.5: midway).",
    )
    relative: bool = fld(
        False,
        "t0 and k relative to the run's planned steps N: t0·N and k/N steps (a nightly run's N changes "
        "with the night's documents; 'ckl validate' prints N and the λ(t) range).",
    )

    def __post_init__(self):
        require(self.k > 0, "k", f"must be > 0, got {self.k}")
        require(
            not self.relative or 0.0 <= self.t0 <= 1.0, "t0", f"relative: a fraction in [0, 1], got {self.t0}"
        )

    def schedule(self, planned_steps: int | None) -> tuple[float, float]:
        """(k, t0) in steps for a run of ``planned_steps`` steps.

        Raises:
            ConfigError: a relative schedule without the run's planned steps.
        """
        if not self.relative:
            return self.k, self.t0
        if not planned_steps:
            raise ConfigError(
                "optim.recadam.relative: this job does not plan its steps ahead (ckl eval); "
                "give t0 and k in steps (relative=false)"
            )
        return self.k / planned_steps, self.t0 * planned_steps

    def lambda_range(self, planned_steps: int) -> tuple[float, float]:
        """λ(1) and λ(N) over a run of N planned steps (λ rises with t)."""
        k, t0 = self.schedule(planned_steps)
        return recadam_lambda(1, k, t0), recadam_lambda(planned_steps, k, t0)

    def check(self, planned_steps: int) -> tuple[float, float]:
        """λ(t)'s range over the run; refuses a schedule under which the run cannot learn.

        Raises:
            ConfigError: λ(t) < MIN_RECADAM_LAMBDA at every planned step.
        """
        lo, hi = self.lambda_range(planned_steps)
        if hi < MIN_RECADAM_LAMBDA:
            k, t0 = self.schedule(planned_steps)
            raise ConfigError(
                f"optim.recadam: λ(t) stays below {hi:.1e} over the run's {planned_steps} planned steps "
                f"(t0={t0:g}, k={k:g}): each step is λ·Adam's, so the weights would not move. Set "
                "optim.recadam.relative=true with t0=0.5 and k=10 (λ from 0.007 to 0.99 over any run), "
                f"or t0 below {planned_steps}"
            )
        return lo, hi


@dataclass
class OptimSpec:
    name: str = fld(
        "adamw", "adamw, or recadam (annealed pull back to the run's starting weights).", choices=OPTIMIZERS
    )
    lr: float = fld(1e-4, "Learning rate (constant).")
    weight_decay: float = fld(0.0, "Decoupled weight decay.")
    grad_clip: float = fld(1.0, "Clip the gradient norm (0: off).")
    recadam: RecAdamSpec = field(default_factory=RecAdamSpec)

    moved: ClassVar[dict[str, str]] = {
        "recadam_gamma": "optim.recadam.gamma",
        "recadam_k": "optim.recadam.k",
        "recadam_t0": "optim.recadam.t0",
    }

    def __post_init__(self):
        check_choices(self)
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        if self.name == "recadam":
            require(
                self.lr * self.recadam.gamma < 2,
                "recadam.gamma",
                f"lr*gamma = {self.lr * self.recadam.gamma:g} must be < 2 (the pull diverges)",
            )

    def build(self, params, planned_steps: int | None = None) -> torch.optim.Optimizer:
        """AdamW, or RecAdam anchored at the weights of its first step, over ``params``.

        ``planned_steps``: the run's steps, which a relative RecAdam schedule is scaled to.
        """
        if self.name == "recadam":
            k, t0 = self.recadam.schedule(planned_steps)
            return RecAdam(
                params,
                lr=self.lr,
                weight_decay=self.weight_decay,
                gamma=self.recadam.gamma,
                anneal_k=k,
                anneal_t0=t0,
            )
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class MixReviewSpec:
    mix_ratio: float = fld(
        0.0, "Rehearsal documents per new document at epoch/period 0 (0: off); the pool is the job's data."
    )
    mix_decay: float = fld(0.7, "Factor on mix_ratio after each epoch or period, in [0, 1].")
    per: str = fld("epoch", "Decay per epoch of a run, or per period (published version).",
                   choices=("epoch", "period"))  # fmt: skip
    seed: int = fld(0, "Seed of the rehearsal draw.")

    moved: ClassVar[dict[str, str]] = {"pool": "data.pool"}

    def __post_init__(self):
        check_choices(self)
        try:
            MixReviewConfig(self.mix_ratio, self.mix_decay, self.seed)
        except ValueError as e:
            raise ConfigError(str(e).removeprefix("mix_review.")) from None

    def epoch(
        self, new: list[Document], pool: list[Document], period: int, epoch: int, shuffle_key: str | None
    ) -> tuple[list[Document], float]:
        """The documents of ``epoch`` of ``period`` in training order, and the rehearsal ratio.

        ratio = mix_ratio · mix_decay**e, e the epoch (per='epoch') or the period (per='period');
        the draw is fresh per night (per='epoch') or per epoch (per='period').
        """
        exponent = epoch if self.per == "epoch" else period
        salt = period if self.per == "epoch" else epoch
        return epoch_documents(
            new, pool, self.mix_ratio, self.mix_decay, self.seed * 1_000_003 + salt, exponent, shuffle_key
        )


@dataclass
class BatchSpec:
    max_length: int = fld(256, "Tokens per row; longer documents are split into windows, never truncated.")
    batch_size: int = fld(8, "Rows per optimizer step, over all ranks.")
    pack: bool = fld(False, "Pack documents (EOS-separated) into full rows instead of padding each.")
    shuffle: bool = fld(
        False, "Shuffle documents per epoch (seeded); off keeps arrival order, so later wins."
    )

    def __post_init__(self):
        require(self.max_length >= 2, "max_length", "must be >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")

    def shuffle_key(self, seed: int, period: int, epoch: int) -> str | None:
        """The seed string of an epoch's shuffle (None: arrival order)."""
        return f"update:{seed}:{period}:{epoch}" if self.shuffle else None
