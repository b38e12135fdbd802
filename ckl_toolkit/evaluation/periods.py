"""The TemporalWiki protocol for one run: a fresh learner refreshed period after period.

    base:        score every probe set; the first night's facts and controls; the retention set
    per period:  a fresh optimizer and engine (a refresh is its own nightly run), ``epochs`` passes
                 over the period's documents (+ mix-review draws) -> score every probe set, then
                 the night: its facts and controls again (fact gain against the scores before the
                 night, per phrasing) and the retention set (the share of facts the base knew)

The base is the same model for every method (a fresh LoRA or K-Adapter changes no output at step 0),
so its scores are computed once per eval (``Context.base``) and reused by every run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.fact_gain import NightScores, night_gains, retention, score_known, score_night
from ckl_toolkit.evaluation.lama_ckl import train_epoch
from ckl_toolkit.evaluation.methods import Method, method_sections
from ckl_toolkit.evaluation.runs import method_learner
from ckl_toolkit.evaluation.temporalwiki import TemporalWikiData, accuracy_matrix, evaluate_stage, forgetting
from ckl_toolkit.training.learner import make_engine
from ckl_toolkit.training.step import NonFiniteGuard


@dataclass
class BaseScores:
    """The model every run starts from, scored once."""

    probes: dict  # probe set -> cell
    first_night: NightScores | None  # the first period's facts and controls
    known: list[bool]  # exact match on the retention set


@dataclass
class Context:
    """What every run reads: the recipe, the data, the device, and the base scores once computed."""

    recipe: EvalRecipe
    data: TemporalWikiData
    device: torch.device
    base: BaseScores | None = None


def score_base(ctx: Context, model, tokenizer) -> BaseScores:
    data, bs = ctx.data, ctx.recipe.protocol.eval_batch_size
    if ctx.base is None:
        first = score_night(model, tokenizer, data.nights[0], bs) if data.nights else None
        probe = ctx.recipe.protocol.probe_field
        known = score_known(model, tokenizer, data.retention, probe, bs) if data.retention else []
        ctx.base = BaseScores(evaluate_stage(model, tokenizer, data.probe_sets, bs), first, known)
    return ctx.base


def night_row(ctx: Context, model, tokenizer, p: int, before: NightScores) -> tuple[dict, NightScores | None]:
    """The night of period ``p``: fact gains from ``before`` (its scores before the night) and retention.

    Returns the row and the next period's night scored now (its "before"), if there is a next period.
    """
    data, bs = ctx.data, ctx.recipe.protocol.eval_batch_size
    night = data.nights[p]
    row = {
        "period": night.name,
        "fact_gain": night_gains(night, before, score_night(model, tokenizer, night, bs)),
    }
    if data.retention:
        probe = ctx.recipe.protocol.probe_field
        after = score_known(model, tokenizer, data.retention, probe, bs)
        row["retention"] = retention(ctx.base.known, after).to_dict()
    following = score_night(model, tokenizer, data.nights[p + 1], bs) if p + 1 < len(data.nights) else None
    return row, following


def run_periods(ctx: Context, method: Method, lr: float, epochs: int, log) -> dict:
    """A fresh learner for ``method`` trained period after period; ``after`` holds every stage's scores.

    Each period is its own refresh, as a nightly run: a fresh optimizer (AdamW's moments restart,
    RecAdam anchors θ* at the period's starting weights) in a fresh engine; mix-review draws the
    period's rehearsal with ``MixReviewSpec.epoch`` (per='period': the ratio decays across periods).
    RHO-1's reference stays the model before all periods (the served model the refreshes start from).
    """
    recipe, data = ctx.recipe, ctx.data
    start = time.perf_counter()
    s = method_sections(method, recipe.target, recipe.weights, recipe.optim, recipe.mix_review, lr)
    learner, mix = method_learner(
        method, lr, recipe.target, recipe.weights, recipe.optim, recipe.mix_review, recipe.seed, ctx.device
    )
    model, tokenizer, bs = learner.target.model, learner.tokenizer, recipe.protocol.eval_batch_size

    base = score_base(ctx, model, tokenizer)
    after = [{"stage": "base", "probes": base.probes}]
    log(after[-1], None, time.perf_counter() - start)
    before, train_loss, guard = base.first_night, [], NonFiniteGuard(max_consecutive=3)
    for p, period in enumerate(data.periods):
        if p > 0:  # a refresh is its own run
            learner.engine = make_engine(learner.target, s.optim, None)
        pool = data.pools[p] if data.pools else []
        losses = []
        for e in range(epochs):
            docs, _ = mix.epoch(data.stream[p], pool, p, e, recipe.batching.shuffle_key(recipe.seed, p, e))
            losses.append(train_epoch(learner, docs, recipe.batching, guard))
        train_loss.append(sum(losses) / len(losses))
        row = {"stage": period, "probes": evaluate_stage(model, tokenizer, data.probe_sets, bs)}
        if data.nights:
            row["night"], before = night_row(ctx, model, tokenizer, p, before)
        after.append(row)
        log(after[-1], train_loss[-1], time.perf_counter() - start)

    names = list(data.probe_sets)
    return {
        "after": after,
        "forgetting": forgetting(after, names),
        "acc_matrix": accuracy_matrix(after, names),
        "train_loss": train_loss,
        "seconds": time.perf_counter() - start,
        "lr": lr,
        "epochs": epochs,
        "method": method.name,
        "components": asdict(method),
        "trainable_params": sum(t.numel() for t in learner.target.trainable().values()),
    }
