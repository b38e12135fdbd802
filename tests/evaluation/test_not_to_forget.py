"""NOT-TO-FORGET re-selection: exactly the facts the model completes, in order, cached per setting."""

from __future__ import annotations

from ckl_toolkit.data.world import WorldConfig, build_world
from ckl_toolkit.evaluation.not_to_forget import cached_selection, select_known
from tests.conftest import PerfectPredictor


def _world():
    cfg = WorldConfig.quick(3)
    return build_world(cfg)


def test_select_known_keeps_exact_matches_in_order():
    world = _world()
    from ckl_toolkit.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([r["text"] for r in world.pretrain], 300)
    rows = world.nf_candidates
    assert select_known(PerfectPredictor(len(tok)), tok, rows) == rows
    assert select_known(PerfectPredictor(len(tok)), tok, rows, limit=3) == rows[:3]
    assert select_known(PerfectPredictor(len(tok), wrong=True), tok, rows) == []


def test_the_selection_is_cached_and_read_back(tmp_path):
    from ckl_toolkit.data.tokenizer import train_bpe_tokenizer

    world = _world()
    tok = train_bpe_tokenizer([r["text"] for r in world.pretrain], 300)
    rows = world.nf_candidates[:5]
    cache = tmp_path / "nf.jsonl"
    assert cached_selection(cache, PerfectPredictor(len(tok)), tok, rows, "task_descriptive", None) == rows
    # a second call reads the file: even a model that knows nothing gets the cached selection
    assert (
        cached_selection(cache, PerfectPredictor(len(tok), wrong=True), tok, rows, "task_descriptive", None)
        == rows
    )
