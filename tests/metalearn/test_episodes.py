"""Episodes: which pairs a step uses, how ranks split them, the check a partitioned base needs."""

import pytest
from transformers import AutoTokenizer

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.metalearn.episodes import (
    episode_indices,
    episode_slice,
    make_episode_batch,
    require_task_objects,
)
from tests.conftest import meta_pairs as pairs


def test_episode_indices_cover_each_epoch_once():
    seen = [i for step in range(3) for i in episode_indices(6, 2, step, seed=0)]
    assert sorted(seen) == list(range(6))
    assert episode_indices(6, 2, 1, seed=0) == episode_indices(6, 2, 1, seed=0)


def test_episode_slices_split_the_meta_batch():
    rows = [list(range(8))[episode_slice(8, rank=r, world=4)] for r in range(4)]
    assert rows == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_partitioned_base_refuses_an_episode_without_outer_loss(tiny_lm_dir):
    tok, rows = AutoTokenizer.from_pretrained(tiny_lm_dir), pairs(2)
    short = make_episode_batch(tok, rows, 256, 3)  # the object falls outside the truncated task
    with pytest.raises(ConfigError, match="^data.task_max_length"):
        require_task_objects(short, rows, 3)
    require_task_objects(make_episode_batch(tok, rows, 256, 64), rows, 3)  # long enough: fine
