"""The one weighted step both jobs run: weights, loss, the non-finite guard, rows per rank."""

from __future__ import annotations

import json

import pytest
import torch

from ckl_toolkit.core.documents import Document
from ckl_toolkit.nightly.contract import ExitCode, exit_code_for
from ckl_toolkit.training.batching import batches
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.sections import OptimSpec, TargetSpec, WeightSpec
from ckl_toolkit.training.step import DivergenceError, NonFiniteGuard, rank_rows, weighted_step


def test_guard_skips_non_finite_steps_then_aborts_after_k_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(2.5)) is True
    assert guard.check(float("nan")) is False
    assert guard.check(torch.tensor(float("inf"))) is False
    assert guard.check(1.0) is True  # a finite loss resets the run
    assert guard.check(float("nan"), step=7) is False
    assert guard.check(float("-inf"), step=8) is False
    state = json.loads(json.dumps(guard.state_dict()))  # checkpointed mid-run...
    resumed = NonFiniteGuard(max_consecutive=3)
    resumed.load_state_dict(state)  # ...and resumed: the count carries over
    with pytest.raises(DivergenceError, match="3 non-finite losses in a row") as err:
        resumed.check(float("nan"), step=9)
    assert exit_code_for(err.value) == ExitCode.DIVERGED
    assert resumed.skipped == 5
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)


def _batch(tokenizer, n: int = 3):
    meta = {"object": "Babbage Engines"}
    docs = [
        Document(f"d{i}", f"Ada Lovelace works for Babbage Engines . {i}", "s", i + 1, meta) for i in range(n)
    ]
    return next(batches(docs, tokenizer, 32, n))


def test_a_step_moves_the_trained_weights_and_reports_its_loss(tiny_lm_dir):
    target, weights = TargetSpec(path=str(tiny_lm_dir)), WeightSpec(method="oracle")
    learner = build_learner(target, weights, OptimSpec(lr=1e-2), None, 0, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in learner.target.trainable().items()}
    result = weighted_step(
        learner.engine, _batch(learner.tokenizer), learner.weigher, learner.tokenizer, NonFiniteGuard()
    )
    assert result.applied and result.loss > 0 and result.grad_norm > 0
    w = result.weights[result.mask]
    assert set(w.unique().tolist()) == {0.0, 1.0}  # the oracle: 1 on the object's tokens only
    after = learner.target.trainable()
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights(tiny_lm_dir):
    learner = build_learner(
        TargetSpec(path=str(tiny_lm_dir)), WeightSpec(), OptimSpec(lr=1e-2), None, 0, torch.device("cpu")
    )
    with torch.no_grad():
        next(iter(learner.target.trainable().values())).fill_(float("nan"))  # the embedding: NaN logits
    before = {n: p.detach().clone() for n, p in learner.target.trainable().items()}
    guard = NonFiniteGuard(max_consecutive=2)
    result = weighted_step(
        learner.engine, _batch(learner.tokenizer), learner.weigher, learner.tokenizer, guard
    )
    assert not result.applied and result.grad_norm is None and guard.skipped == 1
    after = learner.target.trainable()
    assert all(torch.equal(before[n], after[n]) or torch.isnan(before[n]).all() for n in before)
    with pytest.raises(DivergenceError):
        weighted_step(learner.engine, _batch(learner.tokenizer), learner.weigher, learner.tokenizer, guard)


def test_each_rank_takes_every_world_th_row_and_an_empty_rank_a_masked_row(tiny_lm_dir):
    from transformers import AutoTokenizer

    batch = _batch(AutoTokenizer.from_pretrained(tiny_lm_dir), n=3)
    rows, index = rank_rows(batch, 1, 2)
    assert index == [1] and torch.equal(rows.input_ids, batch.input_ids[[1]])
    rows, index = rank_rows(batch, 3, 4)
    assert index == [] and rows.input_ids.shape[0] == 1
    assert rows.attention_mask.sum() == 0  # takes part in collectives at weight 0


def test_a_list_valued_object_field_marks_every_listed_object(tiny_lm_dir):
    """weights.object_field may name a list (e.g. a hard world's new_objects): each one is weighted."""
    from transformers import AutoTokenizer

    from ckl_toolkit.training.step import text_batch
    from ckl_toolkit.training.weighers import oracle_weights

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    text = "Ada lives in Paris. Bob works for Acme. Cy was born in Rome."
    one = Document("a", text, "s", 1, {"object": "Paris", "new_objects": ["Paris", "Rome"]})
    (batch,) = batches([one], tok, 64, 1, False)
    marked = {}
    for field in ("object", "new_objects"):
        tb = text_batch(batch, 0, 1, tok, True, field)
        w = oracle_weights(tb)[0]  # (T-1,)
        marked[field] = tok.decode(batch.input_ids[0, 1:][w > 0]).replace(" ", "")
    assert marked["object"] == "Paris" and marked["new_objects"] == "ParisRome"


def test_the_benchmark_protocol_trains_on_the_recipes_object_field(tiny_lm_dir):
    """ckl eval's train_epoch honours weights.object_field (it once always read "object")."""
    from ckl_toolkit.evaluation.lama_ckl import train_epoch
    from ckl_toolkit.training.sections import BatchSpec

    text = "Ada lives in Paris. Bob works for Acme. Cy was born in Rome."
    doc = Document("a", text, "s", 1, {"object": "Paris", "new_objects": ["Paris", "Rome"]})
    losses = {}
    for field in ("object", "new_objects"):
        weights = WeightSpec(method="oracle", object_field=field)
        learner = build_learner(TargetSpec(path=str(tiny_lm_dir)), weights, OptimSpec(lr=1e-3), None, 0,
                                torch.device("cpu"))  # fmt: skip
        assert learner.object_field == field
        losses[field] = train_epoch(learner, [doc], BatchSpec(batch_size=1, shuffle=False), NonFiniteGuard())
    assert losses["object"] != pytest.approx(losses["new_objects"])  # another set of tokens was learned


def test_a_weight_floor_lifts_every_real_token_and_keeps_padding_at_zero(tiny_lm_dir):
    """weights.floor: w' = floor + (1 - floor)·w on real tokens (0.25 -> 0.25 off the object, 1 on it)."""
    from ckl_toolkit.core.config import ConfigError

    seen = {}
    for floor in (0.0, 0.25):
        weights = WeightSpec(method="oracle", floor=floor)
        learner = build_learner(TargetSpec(path=str(tiny_lm_dir)), weights, OptimSpec(lr=1e-2), None, 0,
                                torch.device("cpu"))  # fmt: skip
        batch = _batch(learner.tokenizer, n=2)
        batch.attention_mask[1, -3:] = 0  # padding at the end of the second row
        result = weighted_step(learner.engine, batch, learner.weigher, learner.tokenizer, NonFiniteGuard())
        seen[floor] = result
    w0, w1 = seen[0.0].weights, seen[0.25].weights
    real = seen[0.25].mask
    assert set(w1[real].unique().tolist()) == {0.25, 1.0}
    assert torch.equal(w1[real] == 1.0, w0[real] == 1.0)  # the object's tokens are the same ones
    assert (w1[~real] == 0).all()  # padding never weighs
    with pytest.raises(ConfigError, match="floor"):
        WeightSpec(method="taalm", ta_path="x", floor=1.5)
