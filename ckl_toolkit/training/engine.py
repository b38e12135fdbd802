"""How the update steps its target: one process, or a DeepSpeed ZeRO engine (ARCHITECTURE.md §3, §9).

Both engines have the same small surface, so the loop in ``update.py`` reads the same either way:
``forward`` module, ``step(loss)``, ``save(dir)`` / ``load(dir)``, ``all_mean``, ``barrier``,
``gathered()`` (full parameters for export) and ``rank`` / ``world``.

The process group, the config presets and the pickle-free ZeRO optimizer checkpoints come from
``ckl_toolkit.distributed`` (shared with meta-training).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from ckl_toolkit.core.checkpoint import load_state, save_state
from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.training.targets import Target, load_trainable, save_trainable

logger = logging.getLogger(__name__)


def anchor_drift(optimizer: torch.optim.Optimizer) -> float | None:
    """‖θ − θ*‖ over the tensors RecAdam has anchored (None for AdamW or before the first step).

    Reads the optimizer's state, not its param groups: ZeRO-3 puts its flat fp32 partitions into
    the param groups only while it steps, but keys their state by them for good.
    """
    total, seen = 0.0, False
    for p, state in optimizer.state.items():
        anchor = state.get("anchor") if isinstance(state, dict) else None
        if anchor is not None and torch.is_tensor(p) and anchor.shape == p.shape:
            total += float((p.detach().float() - anchor.float()).pow(2).sum())
            seen = True
    return math.sqrt(total) if seen else None


class PlainEngine:
    """A single process: autograd, clip, optimizer step; checkpoints are safetensors + JSON."""

    rank, world = 0, 1

    def __init__(self, target: Target, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.target, self.optimizer, self.grad_clip = target, optimizer, grad_clip
        self.module = target.model
        self.params = list(target.trainable().values())

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def save(self, out: Path) -> None:
        save_trainable(self.target, out / "trainable.safetensors")
        save_state(out / "optimizer", self.optimizer.state_dict())  # RecAdam anchors included

    def load(self, ckpt: Path) -> None:
        load_trainable(self.target, ckpt / "trainable.safetensors")
        self.optimizer.load_state_dict(load_state(ckpt / "optimizer"))

    def drift(self) -> float | None:
        return anchor_drift(self.optimizer)

    def all_mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield


def resolve_update_ds_config(recipe, world: int) -> dict:
    """The target's effective DeepSpeed config, filled by ``distributed.resolve_ds_config``.

    That function reads a meta-training recipe, so it gets a view of this one: the global batch is
    data.batch_size rows, the precision follows target.dtype (bf16 -> DeepSpeed bf16 with fp32
    master weights). RecAdam is our own ZeRO-aware optimizer (anchors per partition), so it is
    allowed explicitly rather than by editing a preset.
    """
    from transformers import AutoConfig

    from ckl_toolkit.distributed import DistributedSpec, resolve_ds_config

    view = SimpleNamespace(
        distributed=DistributedSpec(ds_config=recipe.engine.ds_config,
                                    precision="bf16" if recipe.target.dtype == "bfloat16" else "fp32"),
        batch_size=recipe.data.batch_size,
        optim=SimpleNamespace(grad_clip=recipe.optim.grad_clip, name="adamw"),  # checked below instead
        meta=SimpleNamespace(method="central"),  # no JVP runs through the target
    )  # fmt: skip
    hidden = getattr(AutoConfig.from_pretrained(recipe.target.path), "hidden_size", 1024)
    try:
        cfg = resolve_ds_config(view, world, hidden)
    except ConfigError as e:  # name the update recipe's fields, not the meta recipe's
        raise ConfigError(str(e).replace("distributed.ds_config", "engine.ds_config").replace(
            "batch_size", "data.batch_size", 1)) from None  # fmt: skip
    if recipe.optim.name == "recadam":
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


class DeepSpeedEngine:
    """The target as a DeepSpeed engine; φ and the RHO-1 reference stay plain modules beside it.

    Checkpoints without pickles, through ``distributed``: each rank saves its ZeRO optimizer
    partition (Adam moments, RecAdam anchors, fp32 master) with ``save_state``; under ZeRO-1/2 rank 0
    also saves the trainable weights, which those stages check the master copy against on load.
    """

    def __init__(self, target: Target, optimizer: torch.optim.Optimizer, ctx):
        import deepspeed

        self.target, self.ctx = target, ctx
        params = list(target.trainable().values())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=target.model, optimizer=optimizer, model_parameters=params, config=ctx.ds_config
        )
        self.module = self.engine  # calling the engine runs the (partitioned) module
        self.rank, self.world, self.stage = ctx.rank, ctx.world, ctx.zero_stage

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # averages gradients over ranks; clipping is in the ds_config
        self.engine.step()

    def save(self, out: Path) -> None:
        from ckl_toolkit.distributed import optimizer_state

        save_state(out / f"optimizer_rank{self.rank:05d}", optimizer_state(self.engine))
        if self.stage < 3 and self.rank == 0:  # replicated weights: one copy
            save_trainable(self.target, out / "trainable.safetensors")

    def load(self, ckpt: Path) -> None:
        from ckl_toolkit.distributed import load_optimizer_state

        if self.stage < 3:
            load_trainable(self.target, ckpt / "trainable.safetensors")
        load_optimizer_state(self.engine, load_state(ckpt / f"optimizer_rank{self.rank:05d}"), self.ctx)

    def drift(self) -> float | None:
        """RecAdam's ‖θ − θ*‖ over all ranks: each rank's optimizer holds its own partition."""
        from ckl_toolkit.distributed import mean_over_ranks

        local = anchor_drift(getattr(self.optimizer, "optimizer", self.optimizer))
        if local is None:
            return None
        return math.sqrt(mean_over_ranks(self.ctx, {"d2": local**2})["d2"] * self.world)  # the sum

    def all_mean(self, value: float) -> float:
        from ckl_toolkit.distributed import mean_over_ranks

        return mean_over_ranks(self.ctx, {"v": value})["v"]  # NaN on any rank: NaN everywhere

    def barrier(self) -> None:
        from ckl_toolkit.distributed import barrier

        barrier(self.ctx)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full parameters on every rank for the export (ZeRO-3 keeps only shards outside forward)."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.target.model.parameters()), modifier_rank=None):
            yield
