"""CKL methods as compositions of four independent choices (DESIGN §7).

A method name is ``+``-joined components, e.g. ``taalm+mix_review`` or ``rho1+lora``:

    weights    uniform (default) | oracle | taalm | rho1   which tokens the update learns from
    target     full (default)    | lora   | kadapter       which parameters move
    optimizer  adamw (default)   | recadam                 whether the step is pulled back to θ*
    rehearsal  off (default)     | mix_review              whether older data is replayed

``finetune`` names the all-default method (full fine-tuning, uniform weights, AdamW). The paper's
baselines and combinations are all points of this grid, so they share one training loop and
differ only where the method says they do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.losses import token_nll, weighted_loss
from ckl_toolkit.core.models import LoraSpec, add_lora
from ckl_toolkit.training.kadapter import KAdapterConfig, KAdapterModel
from ckl_toolkit.training.recadam import RecAdam
from ckl_toolkit.training.rho1 import rho1_loss, rho1_weights
from ckl_toolkit.training.weighting import (
    OracleWeights,
    TextBatch,
    TrainAttentionWeights,
    UniformWeights,
    WeightSource,
)

WEIGHTS = ("uniform", "oracle", "taalm", "rho1")
TARGETS = ("full", "lora", "kadapter")

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

    @property
    def uses_ta(self) -> bool:
        return self.weights == "taalm"


def parse_method(name: str, field_name: str = "methods") -> Method:
    """``"taalm+mix_review"`` -> Method(weights="taalm", rehearsal=True); errors name the field."""
    choice = {"weights": None, "target": None, "optimizer": None, "rehearsal": None}
    parts = [p.strip() for p in name.split("+")]
    for part in parts:
        if part in WEIGHTS:
            key, value = "weights", part
        elif part in TARGETS:
            key, value = "target", part
        elif part == "recadam":
            key, value = "optimizer", part
        elif part == "mix_review":
            key, value = "rehearsal", True
        elif part == "finetune" and len(parts) == 1:
            continue
        else:
            known = ", ".join(("finetune",) + WEIGHTS + TARGETS[1:] + ("recadam", "mix_review"))
            raise ConfigError(f"{field_name}: '{name}': unknown component '{part}' (known: {known})")
        if choice[key] is not None:
            raise ConfigError(f"{field_name}: '{name}' sets the {key} twice ({choice[key]} and {value})")
        choice[key] = value
    if choice["weights"] == "oracle" and choice["rehearsal"]:
        raise ConfigError(
            f"{field_name}: '{name}': the oracle needs an object per document; rehearsal has none"
        )
    return Method(name, **{k: v for k, v in choice.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Token weighting: each method's weights and the loss they go into, given the batch's per-token NLL.


class SourceWeigher:
    """Uniform, oracle or Train-Attention weights into the token-weighted loss Σwℓ/Σw per sequence."""

    def __init__(self, source: WeightSource):
        self.source = source

    def weights(self, batch: TextBatch, nll: torch.Tensor) -> torch.Tensor:
        return self.source.weights(batch)  # (B, T-1)

    def loss(self, nll: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
        return weighted_loss(nll, w, mask, normalize=normalize)


class Rho1Weigher:
    """RHO-1: keep the batch's top ``keep_ratio`` tokens by excess loss ℓ_θ − ℓ_ref; mean loss of the kept.

    The reference is the frozen model before the update (a second copy in memory).
    """

    def __init__(self, reference: nn.Module, keep_ratio: float):
        self.reference = reference.eval().requires_grad_(False)
        self.keep_ratio = keep_ratio

    def weights(self, batch: TextBatch, nll: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_nll = token_nll(self.reference, batch.enc.input_ids, batch.enc.attention_mask)  # (B, T-1)
        mask = batch.enc.attention_mask[:, 1:].bool() & batch.enc.attention_mask[:, :-1].bool()
        return rho1_weights(nll, ref_nll, mask, self.keep_ratio)  # (B, T-1) in {0, 1}

    def loss(self, nll: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
        return rho1_loss(nll, w)


Weigher = SourceWeigher | Rho1Weigher


def build_weigher(
    method: Method, ta=None, reference: nn.Module | None = None, keep_ratio: float = 0.6
) -> Weigher:
    """The method's weights. ``ta``: a loaded TA model (taalm); ``reference``: the pre-update model (rho1)."""
    if method.weights == "taalm":
        if ta is None:
            raise ConfigError(f"methods: '{method.name}' needs a Train-Attention model (set ta.path)")
        return SourceWeigher(TrainAttentionWeights(ta))
    if method.weights == "rho1":
        if reference is None:
            raise ValueError("rho1 needs the reference model (the model before the update)")
        return Rho1Weigher(reference, keep_ratio)
    return SourceWeigher(OracleWeights() if method.weights == "oracle" else UniformWeights())


# ---------------------------------------------------------------------------------------------
# What trains and how it steps.


@dataclass
class RecAdamSettings:
    gamma: float = 5000.0
    k: float = 0.5
    t0: float = 250.0


def build_trainable(method: Method, base: nn.Module, lora: LoraSpec, kadapter: KAdapterConfig) -> nn.Module:
    """Wrap a freshly loaded base for the method: as is (full), with LoRA, or frozen under K-Adapter."""
    if method.target == "lora":
        return add_lora(base, lora)
    if method.target == "kadapter":
        return KAdapterModel(base, kadapter)
    return base


def build_optimizer(
    method: Method, model: nn.Module, lr: float, weight_decay: float, recadam: RecAdamSettings
) -> torch.optim.Optimizer:
    """AdamW, or RecAdam anchored at the starting weights, on the parameters the method trains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if method.optimizer == "recadam":
        return RecAdam(params, lr=lr, weight_decay=weight_decay, gamma=recadam.gamma,
                       anneal_k=recadam.k, anneal_t0=recadam.t0)  # fmt: skip
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
