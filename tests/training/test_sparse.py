"""TA-gated sparse updates: rows without weight never run, tokens under a weight leave the loss, the LM
head runs only where a weight is; the defaults change nothing."""

from __future__ import annotations

import pytest
import torch

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.losses import target_mask, token_nll
from ckl_toolkit.nightly.contract import current_version
from ckl_toolkit.nightly.idstore import open_ledger
from ckl_toolkit.training.batching import batches
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.sections import OptimSpec, SparseSpec, TargetSpec, WeightSpec
from ckl_toolkit.training.step import NonFiniteGuard, Sparsity, sparse_rows, weighted_step
from ckl_toolkit.update import update
from tests.nightly.test_update import make_recipe, write_jsonl

FACT = "Ada Lovelace works for Babbage Engines ."
FILLER = "The weather in Paris is mild . The river Seine flows through Paris ."


def docs(texts: list[str]) -> list[Document]:
    # the oracle's object is set only where the text states it: the other rows carry no weight
    return [Document(f"d{i}", t, "s", i + 1, {"object": "Babbage Engines"} if "Babbage" in t else {})
            for i, t in enumerate(texts)]  # fmt: skip


def learner(tiny_lm_dir, method="oracle", **sparse):
    weights = WeightSpec(method=method, sparse=SparseSpec(**sparse))
    return build_learner(
        TargetSpec(path=str(tiny_lm_dir)), weights, OptimSpec(lr=1e-2), None, 0, torch.device("cpu")
    )


def params(lrn) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lrn.target.trainable().items()}


def step(lrn, texts: list[str]):
    batch = next(batches(docs(texts), lrn.tokenizer, 32, len(texts)))
    return weighted_step(
        lrn.engine, batch, lrn.weigher, lrn.tokenizer, NonFiniteGuard(), sparsity=lrn.sparsity
    )


def test_the_defaults_are_the_dense_step_and_rho1_is_refused(tiny_lm_dir):
    assert not SparseSpec().build().active and learner(tiny_lm_dir).sparsity == Sparsity()
    with pytest.raises(ConfigError, match="sparse: RHO-1"):
        WeightSpec(method="rho1", sparse=SparseSpec(doc_min_mass=1))


@pytest.mark.parametrize("method", ["oracle", "uniform"])
def test_the_weighted_head_gives_the_dense_loss_and_update(tiny_lm_dir, method):
    texts = [FACT, "Alan Turing . " + FACT]  # every row carries weight (and fits in one row)
    dense, sparse = learner(tiny_lm_dir, method), learner(tiny_lm_dir, method, weighted_head=True)
    a, b = step(dense, texts), step(sparse, texts)
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.rows_dropped == 0
    weighted = int(((a.weights > 0) & a.mask).sum())
    assert b.head_targets == weighted and (weighted < int(a.mask.sum())) == (method == "oracle")
    pa, pb = params(dense), params(sparse)
    assert all(torch.allclose(pa[n], pb[n], atol=1e-6) for n in pa)


def test_rows_without_weight_mass_are_never_run(tiny_lm_dir):
    """Two filler rows and one fact row: the sparse step equals a dense step on the fact row alone."""
    sparse = learner(tiny_lm_dir, doc_min_mass=1.0)
    result = step(sparse, [FILLER, FACT, FILLER + " ."])
    assert result.rows_dropped == 2 and result.stepped and result.weights.shape[0] == 1
    alone = step(learner(tiny_lm_dir), [FACT])  # (padding aside, the same row: Adam's sign-like first
    assert result.loss == pytest.approx(alone.loss, rel=1e-5)  # step would magnify rounding, so compare
    assert result.grad_norm == pytest.approx(alone.grad_norm, rel=1e-4)  # the loss and the gradient)


def test_a_batch_without_weight_takes_no_forward_and_no_step(tiny_lm_dir):
    lrn = learner(tiny_lm_dir, doc_min_mass=1.0)
    before = params(lrn)
    calls = []
    hook = lrn.target.model.register_forward_hook(lambda *a: calls.append(1))
    result = step(lrn, [FILLER, FILLER + " ."])
    hook.remove()
    assert not result.stepped and result.applied and result.rows_dropped == 2 and calls == []
    assert all(torch.equal(before[n], p) for n, p in lrn.target.trainable().items())
    assert lrn.engine.optimizer.state == {}  # not even AdamW's moments moved


def test_tokens_under_the_minimum_weight_leave_the_loss(tiny_lm_dir):
    lrn = learner(tiny_lm_dir, "uniform", token_min_weight=0.5)
    w = torch.tensor([[0.2, 0.6, 0.9, 0.0], [0.1, 0.3, 0.0, 0.0]])
    real = torch.tensor([[True, True, True, False], [True, True, False, False]])
    kept, rows = sparse_rows(w, real, lrn.sparsity)
    assert kept.flatten().tolist() == pytest.approx([0.0, 0.6, 0.9, 0.0] + [0.0] * 4)
    assert rows.tolist() == [True, False]
    # through the step: the loss is Σwℓ/Σw over the kept tokens (uniform weights are 1: all are kept)
    batch = next(batches(docs([FACT]), lrn.tokenizer, 32, 1))
    with torch.no_grad():
        nll = token_nll(lrn.target.model, batch.input_ids, batch.attention_mask)
    want = float(nll.sum() / (target_mask(batch.attention_mask).sum() + 1e-6))
    assert step(lrn, [FACT]).loss == pytest.approx(want, rel=1e-5)


def test_an_update_whose_every_document_is_below_the_mass_publishes_the_ledger(tmp_path, tiny_lm_dir):
    obj = "Babbage Engines"  # the oracle finds it only in the fact's text
    rows = [{"id": f"f{i}", "text": FILLER, "object": obj} for i in range(4)]
    rows.append({"id": "x", "text": FACT, "object": obj})
    write_jsonl(tmp_path / "data/a.jsonl", rows)
    sparse = ["weights.method=oracle", "weights.sparse.doc_min_mass=1", "weights.sparse.weighted_head=true"]
    summary = update(make_recipe(tmp_path, tiny_lm_dir, *sparse, "batching.batch_size=2"))
    assert summary.exit_code == 0 and summary.rows_dropped >= 4 and summary.documents_learned == 5
    assert summary.empty_steps == summary.steps - 1  # only the batch that holds the fact runs
    write_jsonl(tmp_path / "data/b.jsonl", [{"id": f"g{i}", "text": FILLER, "object": obj} for i in range(3)])
    night2 = update(make_recipe(tmp_path, tiny_lm_dir, *sparse, "batching.batch_size=2"))
    assert night2.exit_code == 0 and night2.empty_steps == night2.steps > 0 and night2.warnings
    version = current_version(tmp_path / "out")
    ids = open_ledger(version.parents[1], version / "ledger.json", readonly=True).ids()
    assert {"g0", "g1", "g2"} <= set(ids)  # processed: not learned again tomorrow


def test_the_mass_can_count_only_heavy_tokens_and_leave_the_loss_alone(tiny_lm_dir):
    w = torch.tensor([[0.1, 0.1, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2]])  # a fact among floor weights; all floor
    real = torch.ones_like(w, dtype=torch.bool)
    kept, rows = sparse_rows(w, real, Sparsity(doc_min_mass=0.5, doc_token_weight=0.5))
    assert torch.equal(kept, w) and rows.tolist() == [True, False]  # the floor never adds up to a fact
    _, rows = sparse_rows(w, real, Sparsity(doc_min_mass=0.5))
    assert rows.tolist() == [True, True]  # counted over every token, the floor of row 2 passes
