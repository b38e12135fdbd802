"""The benchmark recipe: ``ckl eval --recipe R`` runs these methods on the same data, seeds and budget.

Two benchmarks share it: ``lama_ckl`` (learn TO-LEARN for E epochs, keep NOT-TO-FORGET;
docs/ARCHITECTURE.md §6) and ``temporalwiki`` (sequential periods with changed / unchanged probes).

The training sections (``target``, ``weights``, ``optim``, ``mix_review``, ``batching``) are the ones
``ckl update`` reads, spelled the same way; a method name (``taalm+mix_review``) sets
``weights.method``, ``target.kind``, ``optim.name`` and whether mix-review is on, so those four are
not set in an eval recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.evaluation.methods import PAPER_METHODS, parse_method
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec, OptimSpec, TargetSpec, WeightSpec


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
    rehearsal_docs: int = fld(
        2000, "Synthetic: rehearsal documents built from pretraining facts that are not evaluated."
    )

    moved: ClassVar[dict[str, str]] = {"nf_select_probe": "protocol.probe_field"}

    def __post_init__(self):
        check_choices(self)
        require(bool(self.dir), "dir", "a data directory is required")
        require(self.to_learn_limit >= 0, "to_learn_limit", "must be >= 0")
        require(self.nf_limit >= 0, "nf_limit", "must be >= 0")


@dataclass
class ProtocolSpec:
    epochs: int = fld(6, "LAMA-ckl: passes over the TO-LEARN evidence; TemporalWiki: passes per period.")
    eval_batch_size: int = fld(64, "Probes per evaluation forward pass.")
    probe_field: str = fld(
        "task_descriptive",
        "Which probe of a fact to score (and to re-select NOT-TO-FORGET with).",
        choices=("task_descriptive", "task_schematic"),
    )

    moved: ClassVar[dict[str, str]] = {
        "lr": "optim.lr",
        "batch_size": "batching.batch_size",
        "weight_decay": "optim.weight_decay",
        "max_length": "batching.max_length",
        "normalize": "weights.normalize",
        "seed": "seed",
    }

    def __post_init__(self):
        check_choices(self)
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")


@dataclass
class SweepSpec:
    lrs: list[float] = fld(
        [], "Extra learning rates for the equal-NOT-TO-FORGET view (empty: only the same-lr view)."
    )
    epochs: list[int] = fld(
        [],
        "TemporalWiki: extra epochs per period, crossed with the lrs (the fact gain / retention trade-off).",
    )
    points: list[str] = fld(
        [],
        "TemporalWiki: extra runs of the swept methods beside the lrs x epochs grid, each 'LRxEPOCHS' "
        "(e.g. '5e-4x3'): chosen points of the trade-off without running the whole grid.",
    )
    methods: list[str] = fld([], "Methods swept (empty: all of `methods`).")
    reference: str = fld("finetune", "The method whose NF exact match at optim.lr sets the target.")
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
    stream_template: str = fld(
        "The {relation} of {subject} is {object}.",
        "How the substitute stream renders a triple (as ckl update's data.stream.triple_template does); "
        "also the fact gain's 'verbatim' probe (without the full stop).",
    )
    reworded_template: str = fld(
        "{subject} {relation} {object}",
        "The fact gain's 'reworded' probe: a wording no stream sentence has (the object last).",
    )
    control_per_relation: int = fld(
        5,
        "Fact gain: up to N unchanged facts of each relation the night teaches serve as its control "
        "(what format and priors alone improve).",
    )
    retention: str = fld(
        "",
        "JSONL of facts the model should keep ({object, <protocol.probe_field>}, e.g. the LAMA-ckl "
        "invariant facts); retention = the share of those the base answers exactly that it still does.",
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
        require(self.control_per_relation >= 1, "control_per_relation", "must be >= 1")
        for name in ("stream_template", "reworded_template"):
            template = getattr(self, name)
            for key in ("subject", "relation", "object"):
                require("{" + key + "}" in template, name, f"needs {{{key}}}")
            require(
                template.rstrip().removesuffix(".").rstrip().endswith("{object}"),
                name,
                "must end with {object}",
            )
        same = self.reworded_template.rstrip(". ") == self.stream_template.rstrip(". ")
        require(
            not same, "reworded_template", "must differ from stream_template (a wording not in the stream)"
        )


@dataclass
class EvalRecipe:
    run_dir: str = fld("runs/eval", "Output: results.json, metrics.jsonl, one result file per finished run.")
    benchmark: str = fld("lama_ckl", "Which protocol.", choices=("lama_ckl", "temporalwiki"))
    title: str = fld("", "Shown at the top of the report.")
    seed: int = fld(0, "Seed of initialisation (LoRA, K-Adapter) and data order; the same for every method.")
    methods: list[str] = fld(
        list(PAPER_METHODS),
        "Methods: '+'-joined components, e.g. taalm+mix_review (ckl_toolkit/evaluation/methods.py).",
    )
    target: TargetSpec | None = fld(None, "The model every method starts from (a fresh copy per run).")
    weights: WeightSpec = field(default_factory=WeightSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    mix_review: MixReviewSpec = field(default_factory=MixReviewSpec)
    batching: BatchSpec = field(default_factory=BatchSpec)
    data: EvalDataSpec | None = fld(None, "The benchmark's data.")
    protocol: ProtocolSpec = field(default_factory=ProtocolSpec)
    lr_overrides: dict[str, float] = fld(
        {}, "Per-method learning rate for the same-lr view when a method needs its own (e.g. lora: 1e-3)."
    )
    sweep: SweepSpec = field(default_factory=SweepSpec)
    temporalwiki: TemporalWikiSpec = field(default_factory=TemporalWikiSpec)
    device: str = fld("auto", "auto (cuda when available), cpu or cuda.", choices=("auto", "cpu", "cuda"))
    threads: int = fld(0, "torch intra-op threads (0: torch's default).")
    progress: bool = fld(True, "Show progress bars.")

    moved: ClassVar[dict[str, str]] = {
        "model": "target",
        "ta": "weights.ta_path",
        "lora": "target.lora",
        "kadapter": "target.kadapter",
        "recadam": "optim.recadam",
        "rho1_keep_ratio": "weights.keep_ratio",
    }

    def __post_init__(self):
        check_choices(self)
        require(self.target is not None, "target.path", "required: the model every method starts from")
        require(self.data is not None, "data.dir", "required: the benchmark's data")
        require(len(self.methods) >= 1, "methods", "give at least one method")
        require(len(set(self.methods)) == len(self.methods), "methods", "a method is listed twice")
        parsed = [parse_method(m) for m in self.methods]
        self._check_set_by_methods()
        for m in self.sweep.methods:
            require(m in self.methods, "sweep.methods", f"'{m}' is not in methods")
        if self.sweep.lrs and self.benchmark == "lama_ckl":  # the equal-NF view's reference
            require(self.sweep.reference in self.methods, "sweep.reference", "must be one of methods")
        for m, lr in self.lr_overrides.items():
            require(m in self.methods, "lr_overrides", f"'{m}' is not in methods")
            try:
                self.lr_overrides[m] = float(lr)
            except (TypeError, ValueError):
                raise ConfigError(f"lr_overrides.{m}: expected a number, got {lr!r}") from None
        if any(p.weights == "taalm" for p in parsed) and not self.weights.ta_path:
            raise ConfigError(
                "weights.ta_path: required by the taalm methods (a `ckl meta-train` output dir)"
            )
        if any(p.rehearsal for p in parsed):
            require(
                self.mix_review.mix_ratio > 0,
                "mix_review.mix_ratio",
                "must be > 0 for the mix_review methods",
            )
        for p in parsed:
            if p.optimizer != "recadam":
                continue
            lr = max(max(self.lrs_of(p.name)), max((lr for lr, _ in self.sweep_points()), default=0.0))
            require(
                lr * self.optim.recadam.gamma < 2,
                "optim.recadam.gamma",
                f"lr*gamma = {lr * self.optim.recadam.gamma:g} for {p.name} must be < 2 (the pull diverges)",
            )
        require(
            not self.sweep.epochs or self.benchmark == "temporalwiki",
            "sweep.epochs",
            "the lr x epochs trade-off is TemporalWiki's; LAMA-ckl scores every epoch already",
        )
        require(all(e >= 1 for e in self.sweep.epochs), "sweep.epochs", "every value must be >= 1")
        require(
            not self.sweep.points or self.benchmark == "temporalwiki",
            "sweep.points",
            "(lr, epochs) points are TemporalWiki's trade-off; LAMA-ckl sweeps sweep.lrs",
        )
        self.sweep_points()  # parses them, naming the field on a bad one
        want = "temporalwiki" if self.benchmark == "temporalwiki" else ("synthetic", "lama_ckl")
        require(
            self.data.kind in want,
            "data.kind",
            f"benchmark {self.benchmark} reads data.kind {want}, got {self.data.kind!r}",
        )

    def _check_set_by_methods(self) -> None:
        """target.kind, weights.method and optim.name come from each method's name, not the recipe."""
        for name, value, default, example in (
            ("target.kind", self.target.kind, "full", "lora or kadapter"),
            ("weights.method", self.weights.method, "uniform", "taalm, oracle or rho1"),
            ("optim.name", self.optim.name, "adamw", "recadam"),
        ):
            require(
                value == default,
                name,
                f"set by each method's name in an eval recipe (e.g. methods: [{example}]); leave it out",
            )

    def lr_of(self, method: str) -> float:
        """The method's learning rate in the same-lr view."""
        return self.lr_overrides.get(method, self.optim.lr)

    def swept(self, method: str) -> bool:
        return not self.sweep.methods or method in self.sweep.methods

    def lrs_of(self, method: str) -> list[float]:
        """Every learning rate the method runs at: its own, then the sweep's (if it is swept)."""
        lrs = [self.lr_of(method)]
        if self.sweep.lrs and self.swept(method):
            lrs += [lr for lr in self.sweep.lrs if lr not in lrs]
        return lrs

    def sweep_points(self) -> list[tuple[float, int]]:
        """``sweep.points`` as (lr, epochs): '5e-4x3' -> (0.0005, 3)."""
        out = []
        for text in self.sweep.points:
            lr, sep, epochs = str(text).lower().partition("x")
            try:
                point = (float(lr), int(epochs))
            except ValueError:
                point = None
            require(
                bool(sep) and point is not None and point[0] > 0 and point[1] >= 1,
                "sweep.points",
                f"{text!r} is not 'LRxEPOCHS' with lr > 0 and epochs >= 1 (e.g. '5e-4x3')",
            )
            out.append(point)
        return out

    def runs_of(self, method: str) -> list[tuple[float, int]]:
        """Every (lr, epochs per period) the method runs at: the lrs x epochs grid, then sweep.points."""
        runs = [(lr, e) for lr in self.lrs_of(method) for e in self.epochs_of(method)]
        if self.swept(method):
            runs += [p for p in self.sweep_points() if p not in runs]
        return runs

    def epochs_of(self, method: str) -> list[int]:
        """Every number of epochs (per period) the method runs with: the protocol's, then the sweep's."""
        epochs = [self.protocol.epochs]
        if self.sweep.epochs and self.swept(method):
            epochs += [e for e in self.sweep.epochs if e not in epochs]
        return epochs
