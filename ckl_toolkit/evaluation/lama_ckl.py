"""The LAMA-ckl protocol (docs/ARCHITECTURE.md §6): learn TO-LEARN evidence for E epochs, keep NOT-TO-FORGET.

Evaluate both sets before training (epoch 0) and after every epoch. Headline numbers:
Top Acc = max over epochs of TO-LEARN token accuracy; Epoch = its first argmax; NF Acc = the
NOT-TO-FORGET accuracy at that epoch; Total Knowledge = Top Acc + NF Acc. The same is reported on
exact match (the whole object right), the clearer signal on small models.

Training is the nightly job's: each epoch is ``training.batching.batches`` over the epoch's documents
(``MixReviewSpec.epoch``: arrival order or a seeded shuffle, plus rehearsal) and one
``training.step.weighted_step`` per batch, so a benchmark figure measures the code ``ckl update`` runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.documents import Document
from ckl_toolkit.evaluation.probes import score_probes
from ckl_toolkit.training.batching import batches
from ckl_toolkit.training.learner import Learner
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec
from ckl_toolkit.training.step import NonFiniteGuard, weighted_step


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


def check_rows(rows: list[dict], name: str, fields: tuple[str, ...], why: str = "") -> None:
    """Every row has ``fields``; errors name the row (and ``why``: the setting that asks for them)."""
    for i, r in enumerate(rows):
        for f in fields:
            if f not in r:
                raise ConfigError(f"{name} row {i}: missing field '{f}'" + (f" ({why})" if why else ""))


def evidence_documents(rows: list[dict], source: str, object_field: str = "object") -> list[Document]:
    """LAMA-ckl rows as training documents: the evidence text, the object kept for the oracle (and
    the field ``weights.object_field`` names, e.g. ``new_objects`` in a world with distractors: every
    new fact's object)."""
    return [
        Document(
            str(r.get("uuid") or r.get("id") or f"{source}/{i}"),
            r["evidence"],
            source,
            i,
            {k: r[k] for k in dict.fromkeys(("object", object_field)) if r.get(k)},
        )  # fmt: skip
        for i, r in enumerate(rows, start=1)
    ]


def train_epoch(learner: Learner, docs: list[Document], batching: BatchSpec, guard: NonFiniteGuard) -> float:
    """One pass over ``docs`` in the given order; returns the mean loss of the applied steps."""
    learner.target.model.train()
    b, losses = batching, []
    for batch in batches(docs, learner.tokenizer, b.max_length, b.batch_size, b.pack):
        result = weighted_step(
            learner.engine, batch, learner.weigher, learner.tokenizer, guard, learner.object_field,
            sparsity=learner.sparsity,
        )  # fmt: skip
        if result.applied and result.stepped:  # a sparse batch with no row left has no loss
            losses.append(result.loss)
    return sum(losses) / len(losses) if losses else math.nan


def run_lama_ckl(
    learner: Learner,
    to_learn: list[dict],
    not_to_forget: list[dict],
    epochs: int,
    batching: BatchSpec,
    mix_review: MixReviewSpec,
    seed: int = 0,
    pool: list[Document] = (),
    probe_field: str = "task_descriptive",
    eval_batch_size: int = 64,
    progress: bool = True,
    on_epoch: Callable[[int, ProtocolResult], None] | None = None,
    name: str = "method",
) -> ProtocolResult:
    """Train the learner's target in place on the TO-LEARN evidence; score both sets every epoch.

    Args:
        learner: the target, its weigher and its engine (a fresh one per method).
        to_learn: LAMA-ckl rows with ``evidence``, ``object`` and the probe field.
        not_to_forget: rows the model already knows (probe field and ``object``).
        epochs: passes over the evidence.
        batching: rows, windows, shuffling (one policy with ``ckl update``).
        mix_review: rehearsal of ``pool`` (ratio 0: off), drawn per epoch as the update does.
        seed: the run's seed (the shuffle of each epoch).
        on_epoch: called after every evaluation (epoch 0 = before training) with the result so far.
    """
    check_rows(to_learn, "TO-LEARN", ("evidence", "object", probe_field))  # trained on and probed
    check_rows(not_to_forget, "NOT-TO-FORGET", ("object", probe_field))
    if getattr(learner.weigher, "name", None) == "oracle":  # a row without its field would train on nothing
        check_rows(to_learn, "TO-LEARN", (learner.object_field,), why="weights.object_field")
    start = time.perf_counter()
    docs, model = evidence_documents(to_learn, "to_learn", learner.object_field), learner.target.model
    guard = NonFiniteGuard(max_consecutive=3)
    result = ProtocolResult()

    def record() -> None:
        tl = score_probes(model, learner.tokenizer, [r[probe_field] for r in to_learn],
                          [r["object"] for r in to_learn], batch_size=eval_batch_size)  # fmt: skip
        nf = None
        if not_to_forget:
            nf = score_probes(model, learner.tokenizer, [r[probe_field] for r in not_to_forget],
                              [r["object"] for r in not_to_forget], batch_size=eval_batch_size)  # fmt: skip
        result.to_learn.append(tl.acc)
        result.to_learn_em.append(tl.em)
        result.not_to_forget.append(nf.acc if nf else 0.0)
        result.not_to_forget_em.append(nf.em if nf else 0.0)
        if on_epoch is not None:
            on_epoch(len(result.to_learn) - 1, result)

    record()  # epoch 0: before training
    bar = tqdm(range(epochs), desc=f"lama-ckl[{name}]", disable=not progress, leave=False)
    for epoch in bar:  # the update's epoch index: 0-based, period 0
        order, _ = mix_review.epoch(docs, list(pool), 0, epoch, batching.shuffle_key(seed, 0, epoch))
        result.train_loss.append(train_epoch(learner, order, batching, guard))
        record()
        bar.set_postfix(tl_em=f"{result.to_learn_em[-1]:.3f}", nf_em=f"{result.not_to_forget_em[-1]:.3f}")
    result.seconds = time.perf_counter() - start
    return result
