"""Mix-review (He et al., 2021): rehearse older data alongside new knowledge, less each epoch.

Epoch e trains on the new items plus ``round(mix_ratio · mix_decay**e · |new|)`` items drawn from a
rehearsal pool (the CKL reference code: mix_ratio 4, mix_decay 0.7). The pool must be data the model
saw before and that is NOT evaluated: the released LAMA-ckl baseline rehearsed the NOT-TO-FORGET
evidence itself, which trains on the test and flatters NF accuracy (ARCHITECTURE.md §7).
``check_pool_disjoint`` guards against that.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class MixReviewConfig:
    """How much older data each epoch rehearses."""

    mix_ratio: float = 4.0
    """Rehearsal items per new item in epoch 0 (>= 0; 0 turns mix-review off)."""
    mix_decay: float = 0.7
    """Factor applied to mix_ratio after each epoch, in [0, 1]."""
    seed: int = 0
    """Seed of the draw; with the epoch it fixes which pool items are rehearsed and the order."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mix_ratio) and self.mix_ratio >= 0):
            raise ValueError(f"mix_review.mix_ratio={self.mix_ratio}: must be a finite number >= 0")
        if not 0.0 <= self.mix_decay <= 1.0:
            raise ValueError(
                f"mix_review.mix_decay={self.mix_decay}: must be in [0, 1] (a decay, not growth)"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"mix_review.seed={self.seed!r}: must be an int")


def mix_review_ratio(cfg: MixReviewConfig, epoch: int) -> float:
    """ratio_e = mix_ratio · mix_decay**epoch (epochs count from 0)."""
    if epoch < 0:
        raise ValueError(f"epoch={epoch}: must be >= 0")
    return cfg.mix_ratio * cfg.mix_decay**epoch


def mix_review_count(cfg: MixReviewConfig, n_new: int, epoch: int) -> int:
    """Number of rehearsal items in epoch ``epoch``: ratio_e · n_new to the nearest int, halves up.

    Args:
        cfg: the schedule.
        n_new: number of new items trained on this epoch.
        epoch: 0-based epoch (or period) index.

    Returns:
        floor(ratio_e · n_new + 0.5).
    """
    if n_new < 0:
        raise ValueError(f"n_new={n_new}: must be >= 0")
    return math.floor(mix_review_ratio(cfg, epoch) * n_new + 0.5)


def _draw(pool: Sequence[T], k: int, rng: random.Random) -> list[T]:
    """k pool items; without replacement while the pool is large enough.

    When k > |pool| every item is used floor(k/|pool|) times and the remainder is drawn without
    replacement, so no item is rehearsed more than once above any other.
    """
    full_copies, rest = divmod(k, len(pool))
    picked = [i for _ in range(full_copies) for i in range(len(pool))] + rng.sample(range(len(pool)), rest)
    return [pool[i] for i in picked]


def mix_epoch(new_items: Sequence[T], pool: Sequence[T], cfg: MixReviewConfig, epoch: int) -> list[T]:
    """The shuffled training items of one epoch: all new items plus the rehearsal draw.

    Rehearsal items are drawn from ``pool`` only, without replacement when the pool holds at least
    ``mix_review_count`` items; otherwise each pool item is repeated as evenly as possible (sampling
    with replacement only because the pool is too small). The result depends only on the inputs,
    ``cfg.seed`` and ``epoch``, so a resumed run rebuilds the same epoch.

    Args:
        new_items: this period's new knowledge; each appears exactly once.
        pool: the rehearsal pool: older data, never the evaluation (NOT-TO-FORGET) evidence.
        cfg: the schedule.
        epoch: 0-based epoch index.

    Returns:
        A new list of len(new_items) + mix_review_count(cfg, len(new_items), epoch) items (the same
        objects, not copies), shuffled.

    Raises:
        ValueError: when rehearsal items are needed and the pool is empty.
    """
    k = mix_review_count(cfg, len(new_items), epoch)
    if k > 0 and len(pool) == 0:
        raise ValueError(
            f"mix-review needs {k} rehearsal items in epoch {epoch} but the pool is empty: give a "
            f"rehearsal pool or set mix_review.mix_ratio=0"
        )
    # A string seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
    rng = random.Random(f"mix-review:{cfg.seed}:{epoch}")
    items = list(new_items) + (_draw(pool, k, rng) if k > 0 else [])
    rng.shuffle(items)
    return items


def _default_key(item: Any) -> Hashable:
    return json.dumps(item, sort_keys=True, ensure_ascii=False) if isinstance(item, dict | list) else item


def check_pool_disjoint(
    pool: Sequence[Any], evaluated: Sequence[Any], key: Callable[[Any], Hashable] = _default_key
) -> None:
    """Refuse a rehearsal pool that contains evaluated items (the released baseline's leak).

    Args:
        pool: the rehearsal pool.
        evaluated: the items evaluation probes, e.g. the NOT-TO-FORGET evidence.
        key: maps an item to a hashable identity; by default dicts and lists compare as canonical
            JSON, so ``key=lambda r: r["text"]`` compares only a field.

    Raises:
        ValueError: naming how many pool items are evaluated, and the first of them.
    """
    held_out = {key(x) for x in evaluated}
    leaked = [x for x in pool if key(x) in held_out]
    if leaked:
        raise ValueError(
            f"{len(leaked)} of {len(pool)} rehearsal pool items are also evaluated (first: {leaked[0]!r}); "
            f"rehearse separate older data, not the NOT-TO-FORGET evidence"
        )


def reservoir_sample(items: Iterable[T], k: int, rng: random.Random) -> list[tuple[int, T]]:
    """``k`` items drawn uniformly from an iterable of unknown length in O(k) memory (Algorithm R).

    Returns (index, item) pairs in arrival order; every item (in order) when there are at most ``k``.
    The draw depends only on the items' count, ``k`` and ``rng``'s state.
    """
    kept: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < k:
            kept.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                kept[j] = (i, item)
    return sorted(kept, key=lambda pair: pair[0])
