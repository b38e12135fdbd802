"""The benchmark recipe: ``ckl eval --recipe R`` runs these methods on the same data, seeds and budget.

Two benchmarks share it: ``lama_ckl`` (learn TO-LEARN for E epochs, keep NOT-TO-FORGET; DESIGN §6)
and ``temporalwiki`` (sequential periods with changed / unchanged probes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.core.models import DTYPES, LoraSpec
from ckl_toolkit.evaluation.lama_ckl import ProtocolConfig
from ckl_toolkit.evaluation.methods import PAPER_METHODS, RecAdamSettings, parse_method
from ckl_toolkit.nightly.config import KAdapterSpec


@dataclass
class EvalModelSpec:
    path: str = fld("", "HF causal-LM directory every method starts from (a fresh copy per method).")
    dtype: str = fld("float32", "Parameter dtype.", choices=tuple(DTYPES))
    attn_implementation: str = fld("sdpa", "Attention kernel.", choices=("eager", "sdpa"))

    def __post_init__(self):
        check_choices(self)
        require(bool(self.path), "path", "a model directory is required")


@dataclass
class EvalDataSpec:
    kind: str = fld(
        "synthetic",
        "synthetic: a `ckl data synth` world dir; lama_ckl: a `ckl data lama-ckl` dir (the paper's files, "
        "split); temporalwiki: the dir of the period files (*_changed.jsonl, *_unchanged.jsonl, ...).",
        choices=("synthetic", "lama_ckl", "temporalwiki"),
    )
    dir: str = fld("", "The data directory.")
    to_learn_limit: int = fld(0, "Evaluate only the first N TO-LEARN facts (0: all).")
    nf_limit: int = fld(0, "Keep at most N NOT-TO-FORGET facts after re-selection (0: all the model knows).")
    nf_select_probe: str = fld(
        "task_descriptive",
        "Probe used to re-select NOT-TO-FORGET: the candidates the model completes exactly, before training.",
        choices=("task_descriptive", "task_schematic"),
    )
    rehearsal_docs: int = fld(
        2000, "Synthetic: rehearsal documents built from pretraining facts that are not evaluated."
    )

    def __post_init__(self):
        check_choices(self)
        require(bool(self.dir), "dir", "a data directory is required")
        require(self.to_learn_limit >= 0, "to_learn_limit", "must be >= 0")
        require(self.nf_limit >= 0, "nf_limit", "must be >= 0")


@dataclass
class MixReviewSettings:
    mix_ratio: float = fld(4.0, "Rehearsal documents per TO-LEARN document in epoch 1 (CKL code: 4).")
    mix_decay: float = fld(0.7, "Factor on mix_ratio after each epoch (CKL code: 0.7).")

    def __post_init__(self):
        require(self.mix_ratio >= 0, "mix_ratio", "must be >= 0")
        require(0 <= self.mix_decay <= 1, "mix_decay", "must be in [0, 1]")


@dataclass
class RecAdamSpec:
    gamma: float = fld(5000.0, "Strength γ of the pull γ/2·‖θ−θ*‖² (lr·γ must stay below 2).")
    k: float = fld(0.5, "Steepness k of λ(t) = 1/(1+exp(−k(t−t0))).")
    t0: float = fld(250.0, "Step t0 where λ = 0.5 (the paper's default; scale it to your run's steps).")

    def build(self) -> RecAdamSettings:
        return RecAdamSettings(self.gamma, self.k, self.t0)


@dataclass
class SweepSpec:
    lrs: list[float] = fld(
        [], "Extra learning rates for the equal-NOT-TO-FORGET view (empty: only the same-lr view)."
    )
    methods: list[str] = fld([], "Methods swept over lrs (empty: all of `methods`).")
    reference: str = fld("finetune", "The method whose NF exact match at protocol.lr sets the target.")
    tolerance: float = fld(0.01, "A run meets the target when its NF EM >= target - tolerance.")


@dataclass
class TemporalWikiSpec:
    periods: list[str] = fld(["0901-1001", "1001-1101"], "Periods trained in this order.")
    documents: list[str] = fld(
        [],
        "Per period, a JSONL of {id, text} diff documents (same order as periods). Empty: the documented "
        "substitute, sentences rendered from the period's changed triples.",
    )
    probe_limit: int = fld(0, "Per probe set, evaluate only the first N probes (0: all).")
    train_limit: int = fld(0, "Per period, train on only the first N documents (0: all).")
    templates: str = fld(
        "",
        "LAMA relations.jsonl ({label, template}): a probe whose relation label has a template ending in "
        "[Y] uses it ('[X] was born in [Y] .' -> 'S was born in O'); other probes, or all when empty, "
        "render as TemporalWiki's '{subject} {relation} {object}'. The object always ends the probe.",
    )
    rehearsal_triples: str = fld(
        "0801-0901_changed.csv",
        "Mix-review's older data for period 1: triples of an earlier period (relative to data.dir; the "
        "period the TA was meta-trained on), rendered like the substitute stream; later periods also "
        "rehearse earlier periods' documents. Empty: period 1 rehearses nothing.",
    )

    def __post_init__(self):
        require(len(self.periods) >= 1, "periods", "give at least one period")
        require(
            not self.documents or len(self.documents) == len(self.periods),
            "documents",
            f"one JSONL per period ({len(self.periods)}), or none for the substitute stream",
        )
        require(self.probe_limit >= 0, "probe_limit", "must be >= 0")
        require(self.train_limit >= 0, "train_limit", "must be >= 0")


@dataclass
class EvalRecipe:
    run_dir: str = fld("runs/eval", "Output: results.json, metrics.jsonl, one result file per finished run.")
    benchmark: str = fld("lama_ckl", "Which protocol.", choices=("lama_ckl", "temporalwiki"))
    title: str = fld("", "Shown at the top of the report.")
    seed: int = fld(0, "Seed of initialisation (LoRA, K-Adapter) and data order; the same for every method.")
    methods: list[str] = fld(
        list(PAPER_METHODS), "Methods: '+'-joined components, e.g. taalm+mix_review (ckl_toolkit/methods.py)."
    )
    model: EvalModelSpec | None = fld(None, "The model every method starts from.")
    ta: str | None = fld(None, "Train-Attention model dir (a `ckl meta-train` output) for the taalm methods.")
    data: EvalDataSpec | None = fld(None, "The benchmark's data.")
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    kadapter: KAdapterSpec = field(default_factory=KAdapterSpec)
    mix_review: MixReviewSettings = field(default_factory=MixReviewSettings)
    recadam: RecAdamSpec = field(default_factory=RecAdamSpec)
    rho1_keep_ratio: float = fld(0.6, "RHO-1: fraction of the batch's tokens kept by excess loss.")
    lr_overrides: dict[str, float] = fld(
        {}, "Per-method learning rate for the same-lr view when a method needs its own (e.g. lora: 1e-3)."
    )
    sweep: SweepSpec = field(default_factory=SweepSpec)
    temporalwiki: TemporalWikiSpec = field(default_factory=TemporalWikiSpec)
    device: str = fld("auto", "auto (cuda when available), cpu or cuda.", choices=("auto", "cpu", "cuda"))
    threads: int = fld(0, "torch intra-op threads (0: torch's default).")
    progress: bool = fld(True, "Show progress bars.")

    def __post_init__(self):
        check_choices(self)
        require(self.model is not None, "model.path", "required: the model every method starts from")
        require(self.data is not None, "data.dir", "required: the benchmark's data")
        require(len(self.methods) >= 1, "methods", "give at least one method")
        require(len(set(self.methods)) == len(self.methods), "methods", "a method is listed twice")
        parsed = [parse_method(m) for m in self.methods]
        for m in self.sweep.methods:
            require(m in self.methods, "sweep.methods", f"'{m}' is not in methods")
        if self.sweep.lrs:
            require(self.sweep.reference in self.methods, "sweep.reference", "must be one of methods")
        for m, lr in self.lr_overrides.items():
            require(m in self.methods, "lr_overrides", f"'{m}' is not in methods")
            try:
                self.lr_overrides[m] = float(lr)
            except (TypeError, ValueError):
                raise ConfigError(f"lr_overrides.{m}: expected a number, got {lr!r}") from None
        require(0 < self.rho1_keep_ratio <= 1, "rho1_keep_ratio", "must be in (0, 1]")
        if any(p.uses_ta for p in parsed) and not self.ta:
            raise ConfigError("ta: required by the taalm methods (a `ckl meta-train` output dir)")
        for p in parsed:
            if p.optimizer != "recadam":
                continue
            lr = max(self.lrs_of(p.name))
            require(
                lr * self.recadam.gamma < 2,
                "recadam.gamma",
                f"lr*gamma = {lr * self.recadam.gamma:g} for {p.name} must be < 2 (the pull diverges)",
            )
        want = "temporalwiki" if self.benchmark == "temporalwiki" else ("synthetic", "lama_ckl")
        require(
            self.data.kind in want,
            "data.kind",
            f"benchmark {self.benchmark} reads data.kind {want}, got {self.data.kind!r}",
        )

    def lr_of(self, method: str) -> float:
        """The method's learning rate in the same-lr view."""
        return self.lr_overrides.get(method, self.protocol.lr)

    def lrs_of(self, method: str) -> list[float]:
        """Every learning rate the method runs at: its own, then the sweep's (if it is swept)."""
        lrs = [self.lr_of(method)]
        if self.sweep.lrs and (not self.sweep.methods or method in self.sweep.methods):
            lrs += [lr for lr in self.sweep.lrs if lr not in lrs]
        return lrs
