"""Mix-review: the decaying rehearsal schedule, a separate pool, determinism."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from ckl_toolkit.training.mix_review import (
    MixReviewConfig,
    check_pool_disjoint,
    mix_epoch,
    mix_review_count,
    mix_review_ratio,
)

NEW = [f"new-{i}" for i in range(10)]
POOL = [f"old-{i}" for i in range(100)]


def test_ratio_and_count_follow_the_schedule():
    cfg = MixReviewConfig(mix_ratio=4.0, mix_decay=0.7)
    expected = [40, 28, 20, 14, 10, 7, 5, 3]  # round(4 · 0.7**e · 10), halves up: 19.6 -> 20, 9.604 -> 10
    assert [mix_review_count(cfg, 10, e) for e in range(8)] == expected
    for e in range(8):
        assert mix_review_ratio(cfg, e) == pytest.approx(4.0 * 0.7**e, rel=1e-15)
        assert len(mix_epoch(NEW, POOL, cfg, e)) == 10 + expected[e]
    assert mix_review_count(MixReviewConfig(mix_ratio=0.25), 2, 0) == 1  # 0.5 rounds up


def test_every_new_item_once_and_rehearsal_only_from_pool():
    cfg = MixReviewConfig(seed=3)
    for epoch in range(3):
        items = mix_epoch(NEW, POOL, cfg, epoch)
        counts = Counter(items)
        assert all(counts[x] == 1 for x in NEW)
        rehearsed = [x for x in items if x not in NEW]
        assert set(rehearsed) <= set(POOL)
        assert len(set(rehearsed)) == len(rehearsed)  # the pool is big enough: no repeats


def test_shuffled_and_deterministic_by_seed_and_epoch():
    cfg = MixReviewConfig(seed=7)
    a = mix_epoch(NEW, POOL, cfg, 1)
    assert a == mix_epoch(NEW, POOL, cfg, 1)
    assert a != mix_epoch(NEW, POOL, MixReviewConfig(seed=8), 1)
    assert mix_epoch(NEW, POOL, cfg, 0)[: len(a)] != a  # another epoch draws and orders anew
    assert a[: len(NEW)] != NEW  # new items are not simply first


def test_small_pool_repeats_evenly():
    pool = ["old-a", "old-b", "old-c"]
    items = mix_epoch(NEW, pool, MixReviewConfig(mix_ratio=1.0), 0)  # 10 needed from 3
    counts = Counter(x for x in items if x in pool)
    assert sum(counts.values()) == 10 and set(counts) == set(pool)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_empty_pool_is_an_error_only_when_rehearsal_is_needed():
    with pytest.raises(ValueError, match="pool is empty"):
        mix_epoch(NEW, [], MixReviewConfig(), 0)
    assert sorted(mix_epoch(NEW, [], MixReviewConfig(mix_ratio=0.0), 0)) == sorted(NEW)
    late = MixReviewConfig(mix_ratio=4.0, mix_decay=0.1)
    assert mix_review_count(late, 10, 3) == 0 and len(mix_epoch(NEW, [], late, 3)) == 10


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mix_ratio": -1.0}, "mix_ratio"), ({"mix_ratio": math.inf}, "mix_ratio"),
     ({"mix_decay": 1.5}, "mix_decay"), ({"mix_decay": -0.1}, "mix_decay"), ({"seed": 1.5}, "seed")],
)  # fmt: skip
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MixReviewConfig(**kwargs)


def test_pool_that_leaks_evaluation_evidence_is_refused():
    evidence = [{"text": "Paris is the capital of France.", "id": 1}]
    check_pool_disjoint([{"text": "Rome is in Italy.", "id": 2}], evidence)
    with pytest.raises(ValueError, match="1 of 2"):
        check_pool_disjoint([{"id": 1, "text": "Paris is the capital of France."}, {"x": 0}], evidence)
    with pytest.raises(ValueError, match="also evaluated"):
        check_pool_disjoint(
            [{"text": "Paris is the capital of France.", "id": 9}], evidence, key=lambda r: r["text"]
        )
