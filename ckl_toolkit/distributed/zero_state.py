"""A ZeRO optimizer's per-rank state without pickles, for the checkpoints of every DeepSpeed engine.

DeepSpeed's own ``save_checkpoint`` pickles; these two functions instead hand the rank's partition
(Adam moments, RecAdam anchors, the fp32 master copy) to ``core.checkpoint.save_state``, which
writes safetensors + JSON.
"""

from __future__ import annotations

from typing import Any

import torch


def _storable(obj: Any) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_storable(v) for v in obj)
    if isinstance(obj, dict):
        return all(_storable(k) and _storable(v) for k, v in obj.items())
    return False


def optimizer_state(engine) -> dict:
    """This rank's ZeRO optimizer state of a ``deepspeed`` engine, without pickles.

    DeepSpeed's state dict holds a few objects (the loss scaler, stage 2's parameter slice map):
    they are left out here and rebuilt from the running engine on load, which is exact for the
    static loss scale of fp32/bf16 training.
    """
    return {k: v for k, v in engine.optimizer.state_dict().items() if _storable(v)}


def load_optimizer_state(engine, saved: dict, rank: int, world: int) -> None:
    """Restore this rank's ZeRO optimizer state: the moments and the fp32 master partition.

    ZeRO-3 also rewrites the module's parameter partition from that master copy; stages 1/2 need
    the module's weights loaded first (their master copy is checked against them).

    Args:
        engine: the ``deepspeed`` engine.
        saved: what :func:`optimizer_state` returned on this rank.
        rank, world: this rank and the number of ranks (the same as when saved).
    """
    merged = {**engine.optimizer.state_dict(), **saved}
    per_rank: list[dict | None] = [None] * world
    per_rank[rank] = merged
    engine.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
