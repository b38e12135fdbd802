"""NOT-TO-FORGET: the facts a model knows before an update, re-selected for every model.

A benchmark's NOT-TO-FORGET set is not a fixed list: it is the candidate facts this model completes
exactly before training (the paper's models knew their invariant facts; SmolLM2 knows ~1 in 5).
The selection is cached in the run directory, keyed by what it depends on, so a resumed eval does
not score the candidates again and a changed model or probe selects afresh.
"""

from __future__ import annotations

from pathlib import Path

from ckl_toolkit.core.io import read_jsonl, write_jsonl_atomic
from ckl_toolkit.evaluation.probes import score_probes


def select_known(
    model, tokenizer, rows: list[dict], probe_field: str = "task_descriptive", limit: int | None = None
) -> list[dict]:
    """The rows whose probe the model completes with the exact object.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        rows: LAMA-ckl rows with ``probe_field`` and ``object``.
        probe_field: which probe to score, ``task_descriptive`` or ``task_schematic``.
        limit: keep at most this many (the first ones, in file order).

    Returns:
        The known rows, in their original order.
    """
    scores = score_probes(model, tokenizer, [r[probe_field] for r in rows], [r["object"] for r in rows])
    known = [r for r, ok in zip(rows, scores.exact) if ok]
    return known if limit is None else known[:limit]


def cached_selection(
    cache: Path, model, tokenizer, rows: list[dict], probe_field: str, limit: int | None
) -> list[dict]:
    """``select_known``, read from ``cache`` when an earlier run of the same setting wrote it."""
    if cache.exists():
        return read_jsonl(cache)
    known = select_known(model, tokenizer, [r for r in rows if r.get(probe_field)], probe_field, limit)
    write_jsonl_atomic(cache, known)
    return known
