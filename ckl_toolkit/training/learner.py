"""A learner: the target, its token weigher and its engine, assembled from the training sections.

Both ``ckl update`` and the ``ckl eval`` protocols build their learner here and train it with
``training.step.weighted_step``, so a benchmark measures exactly the code the nightly job ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckl_toolkit.distributed.process import DistContext
from ckl_toolkit.training.engine import Engine, build_engine
from ckl_toolkit.training.sections import OptimSpec, TargetSpec, WeightSpec
from ckl_toolkit.training.step import Sparsity
from ckl_toolkit.training.targets import Target
from ckl_toolkit.training.weighers import Weigher


@dataclass
class Learner:
    target: Target
    weigher: Weigher
    engine: Engine
    sparsity: Sparsity = field(default_factory=Sparsity)  # weights.sparse (default: dense)
    object_field: str = "object"  # weights.object_field: the documents' field the oracle weights

    @property
    def tokenizer(self):
        return self.target.tokenizer


def make_engine(
    target: Target, optim: OptimSpec, ctx: DistContext | None, planned_steps: int | None = None
) -> Engine:
    """A fresh optimizer over the target's trainable parameters, inside the engine that steps it.

    A new engine per run or period: AdamW's moments restart and RecAdam anchors θ* at the weights
    the target holds now. ``planned_steps`` scales a relative RecAdam schedule.
    """
    trainable = target.trainable()
    optimizer = optim.build(list(trainable.values()), planned_steps)
    return build_engine(target.model, trainable, optimizer, optim.grad_clip, ctx or DistContext())


def build_learner(
    target: TargetSpec,
    weights: WeightSpec,
    optim: OptimSpec,
    version: Path | None,
    seed: int,
    device: torch.device,
    ctx=None,
    weigher: Weigher | None = None,
    planned_steps: int | None = None,
) -> Learner:
    """The learner of a run that starts from ``version`` (None: the model at ``target.path``).

    Seeds fix the new LoRA / K-Adapter weights (``seed``) and, afterwards, dropout (``seed + rank``),
    so a resumed run and a benchmark run rebuild exactly the same starting point. ``weigher``
    replaces the one ``weights`` would build (meta-training validates the φ it is training).
    ``planned_steps`` (the run's steps) scales a relative RecAdam schedule.
    """
    model = target.build(version, seed)
    if not (ctx is not None and ctx.deepspeed) and target.kind != "qlora":  # they place their own
        model.model.to(device)
    weigher = weigher or weights.build(model, version, seed, device)
    engine = make_engine(model, optim, ctx, planned_steps)
    model.model.train()
    torch.manual_seed(seed + (ctx.rank if ctx is not None else 0))  # dropout differs per rank, repeatably
    return Learner(model, weigher, engine, weights.sparse.build(), weights.object_field)
