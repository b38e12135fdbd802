"""CKL methods as points of the training sections' grid (docs/ARCHITECTURE.md §7).

A method name is ``+``-joined components, e.g. ``taalm+mix_review`` or ``rho1+lora``:

    weights    uniform (default) | oracle | taalm | rho1   -> weights.method
    target     full (default)    | lora   | kadapter       -> target.kind
               attn_only | mlp_only | mlp_gate_up | topK_layers | freeze_bottomK
                                                         -> target.kind=subset, target.subset
                                                            (attention, mlp, mlp_gate_up,
                                                            top_k_layers:K, freeze_bottom_k:K)
    optimizer  adamw (default)   | recadam                 -> optim.name
    rehearsal  off (default)     | mix_review              -> mix_review.mix_ratio (the recipe's, else 0)

``finetune`` names the all-default method (full fine-tuning, uniform weights, AdamW). A method only
maps its name onto the recipe's sections; the paper's baselines and combinations then run through
the same learner and step as ``ckl update`` and differ only where the method says.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.training.sections import MixReviewSpec, OptimSpec, TargetSpec, WeightSpec

WEIGHTS = ("uniform", "oracle", "taalm", "rho1")
TARGETS = ("full", "lora", "kadapter")
# Parameter-subset targets (training.subset): method component -> target.subset
SUBSETS = {"attn_only": "attention", "mlp_only": "mlp", "mlp_gate_up": "mlp_gate_up"}
SUBSET_PATTERNS = (
    (re.compile(r"top(\d+)_layers"), "top_k_layers:{}"),
    (re.compile(r"freeze_bottom(\d+)"), "freeze_bottom_k:{}"),
)

# The paper's Table 2 rows (LAMA-ckl), in its order, plus the Oracle.
PAPER_METHODS = (
    "finetune", "lora", "kadapter", "mix_review", "recadam", "rho1", "oracle", "taalm",
    "taalm+mix_review", "taalm+recadam", "taalm+kadapter",
)  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    weights: str = "uniform"
    target: str = "full"
    optimizer: str = "adamw"
    rehearsal: bool = False
    subset: str | None = None  # target.subset when target == "subset"

    @property
    def uses_ta(self) -> bool:
        return self.weights == "taalm"

    @property
    def uses_floor(self) -> bool:
        """Its weights read ``weights.floor`` (uniform and RHO-1 weights ignore it)."""
        return self.weights in ("taalm", "oracle")


@dataclass
class MethodSections:
    """The training sections of one (method, lr) run."""

    target: TargetSpec
    weights: WeightSpec
    optim: OptimSpec
    mix_review: MixReviewSpec


def parse_method(name: str, field_name: str = "methods") -> Method:
    """``"taalm+mix_review"`` -> Method(weights="taalm", rehearsal=True); errors name the field."""
    choice = {"weights": None, "target": None, "optimizer": None, "rehearsal": None}
    subset = None
    parts = [p.strip() for p in name.split("+")]
    for part in parts:
        if part in WEIGHTS:
            key, value = "weights", part
        elif part in TARGETS:
            key, value = "target", part
        elif subset_of(part) is not None:
            key, value = "target", "subset"
            subset = subset_of(part)
        elif part == "recadam":
            key, value = "optimizer", part
        elif part == "mix_review":
            key, value = "rehearsal", True
        elif part == "finetune" and len(parts) == 1:
            continue
        else:
            subsets = tuple(SUBSETS) + ("topK_layers", "freeze_bottomK")
            known = ", ".join(("finetune",) + WEIGHTS + TARGETS[1:] + subsets + ("recadam", "mix_review"))
            raise ConfigError(f"{field_name}: '{name}': unknown component '{part}' (known: {known})")
        if choice[key] is not None:
            raise ConfigError(f"{field_name}: '{name}' sets the {key} twice ({choice[key]} and {value})")
        choice[key] = value
    if choice["weights"] == "oracle" and choice["rehearsal"]:
        raise ConfigError(
            f"{field_name}: '{name}': the oracle needs an object per document; rehearsal has none"
        )
    return Method(name, **{k: v for k, v in choice.items() if v is not None}, subset=subset)


def subset_of(part: str) -> str | None:
    """The ``target.subset`` a method component names (``attn_only`` -> ``attention``), else None."""
    if part in SUBSETS:
        return SUBSETS[part]
    for pattern, spelling in SUBSET_PATTERNS:
        m = pattern.fullmatch(part)
        if m and int(m.group(1)) >= 1:
            return spelling.format(int(m.group(1)))
    return None


def method_sections(
    method: Method, target: TargetSpec, weights: WeightSpec, optim: OptimSpec, mix: MixReviewSpec, lr: float
) -> MethodSections:
    """The recipe's sections with the method's four choices (and the run's lr) filled in."""
    return MethodSections(
        target=dataclasses.replace(target, kind=method.target, subset=method.subset or target.subset),
        weights=dataclasses.replace(weights, method=method.weights),
        optim=dataclasses.replace(optim, name=method.optimizer, lr=lr),
        mix_review=dataclasses.replace(mix, mix_ratio=mix.mix_ratio if method.rehearsal else 0.0),
    )
