"""The LAMA-ckl protocol (DESIGN §6): learn TO-LEARN evidence for E epochs, keep NOT-TO-FORGET.

Evaluate both sets before training (epoch 0) and after every epoch. Headline numbers:
Top Acc = max over epochs of TO-LEARN token accuracy; Epoch = its first argmax; NF Acc = the
NOT-TO-FORGET accuracy at that epoch; Total Knowledge = Top Acc + NF Acc. The same is reported on
exact match (the whole object right), the clearer signal on small models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ckl_toolkit.core.config import ConfigError, check_choices, fld, require
from ckl_toolkit.core.losses import target_mask, token_nll
from ckl_toolkit.core.text import encode
from ckl_toolkit.evaluation.methods import SourceWeigher, Weigher
from ckl_toolkit.evaluation.probes import score_probes
from ckl_toolkit.training.mix_review import MixReviewConfig, mix_epoch
from ckl_toolkit.training.weighting import TextBatch, WeightSource


@dataclass
class ProtocolConfig:
    epochs: int = fld(6, "Passes over the TO-LEARN evidence.")
    lr: float = fld(3e-4, "AdamW learning rate of the target model.")
    batch_size: int = fld(8, "Evidence documents per update.")
    weight_decay: float = fld(0.0, "AdamW weight decay.")
    max_length: int = fld(256, "Evidence documents are truncated to this many tokens.")
    eval_batch_size: int = fld(64, "Probes per evaluation forward pass.")
    probe_field: str = fld(
        "task_descriptive", "Which probe of a fact to score.", choices=("task_descriptive", "task_schematic")
    )
    normalize: bool = fld(
        True, "Token-weighted loss divides by the weight sum (TAALM) or token count (CaMeLS)."
    )
    seed: int = fld(0, "Seed of the evidence order.")

    def __post_init__(self):
        check_choices(self)
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class ProtocolResult:
    """Per-epoch curves (index 0 = before training) and the headline numbers derived from them."""

    to_learn: list[float] = field(default_factory=list)
    to_learn_em: list[float] = field(default_factory=list)
    not_to_forget: list[float] = field(default_factory=list)
    not_to_forget_em: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def epoch(self) -> int:
        return max(range(len(self.to_learn)), key=lambda e: (self.to_learn[e], -e))

    @property
    def em_epoch(self) -> int:
        return max(range(len(self.to_learn_em)), key=lambda e: (self.to_learn_em[e], -e))

    def summary(self) -> dict:
        e, k = self.epoch, self.em_epoch
        return {
            "top_acc": self.to_learn[e],
            "epoch": e,
            "nf_acc": self.not_to_forget[e],
            "total": self.to_learn[e] + self.not_to_forget[e],
            "top_em": self.to_learn_em[k],
            "em_epoch": k,
            "nf_em": self.not_to_forget_em[k],
            "curve": {
                "to_learn": self.to_learn,
                "to_learn_em": self.to_learn_em,
                "not_to_forget": self.not_to_forget,
                "not_to_forget_em": self.not_to_forget_em,
                "train_loss": self.train_loss,
            },
            "seconds": self.seconds,
        }


def _evaluate(model, tokenizer, rows: list[dict], cfg: ProtocolConfig):
    probes = [r[cfg.probe_field] for r in rows]
    objects = [r["object"] for r in rows]
    return score_probes(model, tokenizer, probes, objects, batch_size=cfg.eval_batch_size)


def _check_rows(rows: list[dict], name: str, probe_field: str) -> None:
    for i, r in enumerate(rows):
        for f in ("evidence", "object", probe_field) if name == "TO-LEARN" else ("object", probe_field):
            if f not in r:
                raise ConfigError(f"{name} row {i}: missing field '{f}'")


def train_epoch(
    model, tokenizer, rows, weigher: Weigher, optimizer, cfg: ProtocolConfig, epoch: int
) -> float:
    """One pass over ``rows`` (``evidence`` + ``object``, None for rehearsal) with the method's loss."""
    model.train()
    device = next(model.parameters()).device
    order = torch.randperm(
        len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    ).tolist()
    losses = []
    for i in range(0, len(order), cfg.batch_size):
        batch_rows = [rows[j] for j in order[i : i + cfg.batch_size]]
        texts = [r["evidence"] for r in batch_rows]
        enc = encode(tokenizer, texts, cfg.max_length).to(device)
        nll = token_nll(model, enc.input_ids, enc.attention_mask)  # (B, T-1)
        batch = TextBatch(enc, texts, [r.get("object") for r in batch_rows])
        w = weigher.weights(batch, nll.detach()).to(device)  # (B, T-1)
        loss = weigher.loss(nll, w, target_mask(enc.attention_mask), cfg.normalize)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


@dataclass
class Rehearsal:
    """Mix-review: the pool of older documents (``evidence`` rows) and how much of it each epoch replays."""

    pool: list[dict]
    config: MixReviewConfig


def run_lama_ckl(
    model: torch.nn.Module,
    tokenizer,
    to_learn: list[dict],
    not_to_forget: list[dict],
    source: WeightSource | Weigher,
    cfg: ProtocolConfig,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    rehearsal: Rehearsal | None = None,
    on_epoch: Callable[[int, ProtocolResult], None] | None = None,
    name: str | None = None,
) -> ProtocolResult:
    """Train ``model`` in place on the TO-LEARN evidence, weighting tokens by ``source``.

    Args:
        model: the target causal LM (a fresh copy per method).
        to_learn: LAMA-ckl rows with ``evidence``, ``object`` and the probe field.
        not_to_forget: rows the model already knows (probe field and ``object``).
        source: the token-weight source (uniform, oracle, Train-Attention, ...) or a method's
            ``Weigher`` (which also chooses the loss, e.g. RHO-1's).
        optimizer: defaults to AdamW(cfg.lr, cfg.weight_decay) on the trainable parameters.
        rehearsal: mix-review; epoch e trains on TO-LEARN plus the pool draw of ``mix_epoch``.
        on_epoch: called after every evaluation (epoch 0 = before training) with the result so far.
    """
    weigher = source if hasattr(source, "loss") else SourceWeigher(source)
    name = name or getattr(source, "name", "method")
    _check_rows(to_learn, "TO-LEARN", cfg.probe_field)
    _check_rows(not_to_forget, "NOT-TO-FORGET", cfg.probe_field)
    start = time.perf_counter()
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = ProtocolResult()

    def record() -> None:
        tl = _evaluate(model, tokenizer, to_learn, cfg)
        nf = _evaluate(model, tokenizer, not_to_forget, cfg) if not_to_forget else None
        result.to_learn.append(tl.acc)
        result.to_learn_em.append(tl.em)
        result.not_to_forget.append(nf.acc if nf else 0.0)
        result.not_to_forget_em.append(nf.em if nf else 0.0)
        if on_epoch is not None:
            on_epoch(len(result.to_learn) - 1, result)

    record()  # epoch 0: before training
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"lama-ckl[{name}]", disable=not progress, leave=False)
    for epoch in bar:
        rows = to_learn
        if rehearsal is not None:  # new + replayed rows; train_epoch shuffles them together
            rows = mix_epoch(to_learn, rehearsal.pool, rehearsal.config, epoch - 1)
        result.train_loss.append(train_epoch(model, tokenizer, rows, weigher, optimizer, cfg, epoch))
        record()
        bar.set_postfix(tl_em=f"{result.to_learn_em[-1]:.3f}", nf_em=f"{result.not_to_forget_em[-1]:.3f}")
    result.seconds = time.perf_counter() - start
    return result
