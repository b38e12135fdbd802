"""Episodes of meta-training: (document D, task T) pairs, which of them a step uses, as tensors.

The position in the data is a pure function of the step (:func:`episode_indices`), so a resumed
run sees exactly the episodes an uninterrupted one would; on several ranks every rank builds the
step's whole meta-batch the same way and keeps its own contiguous slice (:func:`episode_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.io import read_jsonl
from ckl_toolkit.core.text import encode, object_target_mask

PAIR_FIELDS = ("text", "task", "object")
PROBE_FIELDS = ("task", "object")  # a retention probe: a fact the base knows, no document


@dataclass
class EpisodeBatch:
    doc_ids: torch.Tensor  # (B, T) documents D
    doc_mask: torch.Tensor  # (B, T)
    doc_obj: torch.Tensor  # (B, T-1) bool: object tokens in D (diagnostics only)
    task_ids: torch.Tensor  # (B, Tt) tasks T (probes)
    task_mask: torch.Tensor  # (B, Tt)
    task_obj: torch.Tensor  # (B, Tt-1) bool: the object's last occurrence in the task

    def rows(self, sl: slice) -> EpisodeBatch:
        """Episodes ``sl`` (one rank's share), padded like the whole batch, so a rank computes
        on exactly the tensors a single process would."""
        return EpisodeBatch(*(getattr(self, f.name)[sl] for f in fields(self)))


def load_pairs(path: str, field_name: str, required: tuple[str, ...] = PAIR_FIELDS) -> list[dict]:
    """The pairs (or, with ``required=PROBE_FIELDS``, probes) of a JSONL file; ConfigError names
    ``field_name``, file and line."""
    if not path:
        raise ConfigError(f"{field_name}: a JSONL file of meta-training pairs is required")
    if not Path(path).exists():
        raise ConfigError(f"{field_name}: {path} does not exist")
    try:
        rows = read_jsonl(path, required=required)
    except ValueError as e:
        raise ConfigError(f"{field_name}: {e}") from None
    if not rows:
        raise ConfigError(f"{field_name}: {path} holds no rows")
    for i, r in enumerate(rows, start=1):
        if r["object"] not in r["task"]:
            raise ConfigError(f"{path}:{i}: field 'object' {r['object']!r} does not occur in 'task'")
    return rows


def episode_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The pairs of TA step ``step``: a seeded permutation per epoch, read in order."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def episode_slice(batch_size: int, rank: int, world: int) -> slice:
    """The rows of the global meta-batch that ``rank`` runs: contiguous, equal, deterministic."""
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def make_episode_batch(tokenizer, rows: list[dict], max_length: int, task_max_length: int) -> EpisodeBatch:
    """Documents truncated to ``max_length`` tokens, tasks to ``task_max_length``, with object masks."""
    docs, tasks, objects = [r["text"] for r in rows], [r["task"] for r in rows], [r["object"] for r in rows]
    d = encode(tokenizer, docs, max_length)
    t = encode(tokenizer, tasks, task_max_length)
    return EpisodeBatch(
        d.input_ids,
        d.attention_mask,
        object_target_mask(d, docs, objects, "all"),
        t.input_ids,
        t.attention_mask,
        object_target_mask(t, tasks, objects, "last"),
    )


def make_probe_batch(tokenizer, rows: list[dict], max_length: int) -> tuple[torch.Tensor, ...]:
    """Probes (``task`` ending in ``object``) as (ids, mask (R, Tr), object mask (R, Tr-1)): the
    retention term's known facts, shaped like an episode's tasks."""
    tasks = [r["task"] for r in rows]
    t = encode(tokenizer, tasks, max_length)
    return t.input_ids, t.attention_mask, object_target_mask(t, tasks, [r["object"] for r in rows], "last")


def require_task_objects(batch: EpisodeBatch, rows: list[dict], task_max_length: int) -> None:
    """Every task must keep an object token after truncation (checked on the global batch: ranks agree).

    An episode without one has no outer gradient, and the meta-gradient then skips its
    directional derivative: with a partitioned base that rank would skip two forward passes whose
    shard gathers the other ranks still make.

    Raises:
        ConfigError: naming data.task_max_length.
    """
    for row, has_object in zip(rows, batch.task_obj.any(dim=1).tolist()):
        if not has_object:
            raise ConfigError(
                f"data.task_max_length: the object {row['object']!r} falls outside the first "
                f"{task_max_length} tokens of its task {row['task'][:60]!r}; with "
                "distributed.partition_base every episode needs an outer loss: raise "
                "data.task_max_length or drop the pair"
            )


def weight_stats(w: torch.Tensor, batch: EpisodeBatch) -> dict[str, float]:
    """Mean weight on the documents' object tokens vs every other real token: what φ has learned."""
    real = batch.doc_mask[:, 1:].bool()
    obj, other = batch.doc_obj & real, ~batch.doc_obj & real
    return {
        "w_object": float(w[obj].mean()) if obj.any() else float("nan"),
        "w_other": float(w[other].mean()) if other.any() else float("nan"),
    }
