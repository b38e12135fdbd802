"""One engine interface for every trained module: the update's target and meta-training's φ.

An engine owns a module, the parameters its optimizer steps and that optimizer, on one plain
process (:class:`PlainEngine`) or as a DeepSpeed ZeRO engine over ranks (:class:`DeepSpeedEngine`).
Both have the surface of :class:`Engine`, so a job's loop reads the same either way; build one with
:func:`build_engine`. Step checkpoints around ``engine.save`` / ``engine.load`` are
``core.checkpoint.save_step`` / ``load_step``.

A checkpoint directory holds, from the engine::

    engine.json                       {world_size, zero_stage, ...}: a checkpoint resumes only on
                                      the same number of ranks and ZeRO stage (0: no DeepSpeed)
    trainable.safetensors             the trainable parameters by name (plain, and ZeRO-1/2 rank 0)
    optimizer.json/.safetensors       the optimizer state (plain; RecAdam anchors included)
    optimizer_rank{r}.json/...        rank r's ZeRO optimizer partition, fp32 master copy included
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ckl_toolkit.core.checkpoint import load_params, load_state, save_params, save_state
from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.distributed.ds_config import DsFields, resolve_ds_config
from ckl_toolkit.distributed.process import DistContext, barrier, mean_over_ranks
from ckl_toolkit.distributed.zero_state import load_optimizer_state, optimizer_state

ENGINE_FILE = "engine.json"
TRAINABLE_FILE = "trainable.safetensors"


class Engine(Protocol):
    """What a job's loop may ask of an engine."""

    module: nn.Module  # call it for the forward (under DeepSpeed: the engine, which gathers shards)
    rank: int
    world: int

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, optimizer step; returns the gradient norm before clipping."""

    def save(self, out: Path) -> None:
        """Write this rank's share of a checkpoint into ``out`` (every rank calls it)."""

    def load(self, ckpt: Path) -> None:
        """Restore what :meth:`save` wrote; ConfigError if the ranks or ZeRO stage differ."""

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The module's full state dict on rank 0, None on the others. Collective."""

    def gathered(self) -> AbstractContextManager[None]:
        """Full parameters on every rank while inside (e.g. to export). Collective."""

    def drift(self) -> float | None:
        """RecAdam's ‖θ − θ*‖ over all ranks (None for other optimizers)."""

    def all_mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (a sync point)."""

    def barrier(self) -> None: ...


def build_engine(
    module: nn.Module,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    ctx: DistContext,
) -> Engine:
    """A DeepSpeed engine when ``ctx`` carries a DeepSpeed config, else one plain process.

    Args:
        module: the trained model (a ZeRO-3 engine partitions its parameters in place).
        trainable: name -> parameter, what ``optimizer`` steps and a checkpoint saves.
        optimizer: a client torch optimizer over ``trainable``.
        grad_clip: the gradient-norm clip of the plain engine (0: off); DeepSpeed takes its
            ``gradient_clipping`` from the config, which ``distributed.ds_config`` filled from it.
        ctx: this process's place in the run.
    """
    if ctx.deepspeed:
        return DeepSpeedEngine(module, trainable, optimizer, ctx)
    return PlainEngine(module, trainable, optimizer, grad_clip)


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


def _how(stage: int) -> str:
    return "without DeepSpeed" if stage == 0 else f"with ZeRO stage {stage}"


def check_layout(ckpt: Path, world: int, stage: int) -> dict:
    """The checkpoint's ``engine.json``, if an engine of ``world`` ranks at ``stage`` can resume it.

    Raises:
        ConfigError: it was written with another ZeRO stage (or plain), or by another number of ranks.
    """
    saved = json.loads((ckpt / ENGINE_FILE).read_text(encoding="utf-8"))
    if saved["zero_stage"] != stage:
        raise ConfigError(
            f"resume: {ckpt} was written {_how(saved['zero_stage'])}, this run trains {_how(stage)}; "
            "resume it with the same DeepSpeed config, or start a new run"
        )
    if saved["world_size"] != world:
        raise ConfigError(
            f"resume: {ckpt} was written by {saved['world_size']} ranks and this run has {world}; "
            f"ZeRO keeps the optimizer state partitioned by rank, so resume with {saved['world_size']} "
            "ranks (or start a new run)"
        )
    return saved


class PlainEngine:
    """One process: autograd, clip, optimizer step; checkpoints are safetensors + JSON."""

    rank, world = 0, 1

    def __init__(
        self,
        module: nn.Module,
        trainable: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
    ):
        self.module, self.trainable, self.optimizer, self.grad_clip = module, trainable, optimizer, grad_clip
        self.params = list(trainable.values())

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Without a clip the norm is only measured: a clip coefficient of exactly 1.0 leaves the
        # gradients bit-identical.
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or math.inf)
        self.optimizer.step()
        return float(norm)

    def save(self, out: Path) -> None:
        save_params(self.trainable, out / TRAINABLE_FILE)
        save_state(out / "optimizer", self.optimizer.state_dict())  # RecAdam anchors included
        write_json_atomic(out / ENGINE_FILE, {"world_size": 1, "zero_stage": 0})

    def load(self, ckpt: Path) -> None:
        check_layout(ckpt, 1, 0)
        load_params(self.trainable, ckpt / TRAINABLE_FILE)
        self.optimizer.load_state_dict(load_state(ckpt / "optimizer"))

    def full_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield

    def drift(self) -> float | None:
        return anchor_drift(self.optimizer)

    def all_mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass


class DeepSpeedEngine:
    """The module as a DeepSpeed ZeRO engine; other models (φ in the update, the base) stay beside it.

    Checkpoints without pickles: each rank saves its ZeRO optimizer partition (moments, RecAdam
    anchors, fp32 master copy) with ``save_state``; under ZeRO-1/2 rank 0 also saves the trainable
    weights, which those stages check the master copy against on load.
    """

    def __init__(
        self,
        module: nn.Module,
        trainable: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        ctx: DistContext,
    ):
        import deepspeed

        self.trainable, self.ctx = trainable, ctx
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=list(trainable.values()), config=ctx.ds_config
        )
        self.module = self.engine  # calling the engine runs the (partitioned) module
        self.rank, self.world, self.stage = ctx.rank, ctx.world, ctx.zero_stage

    def step(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)  # averages the gradients over ranks (a sync point)
        self.engine.step()  # clips to the config's gradient_clipping, then steps
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def save(self, out: Path) -> None:
        save_state(out / f"optimizer_rank{self.rank:05d}", optimizer_state(self.engine))
        if self.rank == 0:
            if self.stage < 3:  # replicated weights: one copy
                save_params(self.trainable, out / TRAINABLE_FILE)
            e = self.engine  # its step counters: DeepSpeed's schedules and logs read them
            layout = {"world_size": self.world, "zero_stage": self.stage}
            write_json_atomic(out / ENGINE_FILE, {**layout, "global_steps": e.global_steps,
                                                  "global_samples": e.global_samples})  # fmt: skip

    def load(self, ckpt: Path) -> None:
        saved = check_layout(ckpt, self.world, self.stage)
        if self.stage < 3:
            load_params(self.trainable, ckpt / TRAINABLE_FILE)
        saved_optimizer = load_state(ckpt / f"optimizer_rank{self.rank:05d}")
        load_optimizer_state(self.engine, saved_optimizer, self.rank, self.world)
        self.engine.global_steps, self.engine.global_samples = saved["global_steps"], saved["global_samples"]

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3 gathered one layer at a time to rank 0, in the module's own dtype."""
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:  # ZeRO-1/2: every rank holds the full weights
            state = self.engine.module.state_dict()
        return state if self.rank == 0 else None

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full parameters on every rank (ZeRO-3 keeps only shards outside forward)."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
            yield

    def drift(self) -> float | None:
        """RecAdam's ‖θ − θ*‖ over all ranks: each rank's optimizer holds its own partition."""
        local = anchor_drift(getattr(self.optimizer, "optimizer", self.optimizer))
        if local is None:
            return None
        return math.sqrt(mean_over_ranks(self.ctx, {"d2": local**2})["d2"] * self.world)  # the sum

    def all_mean(self, value: float) -> float:
        return mean_over_ranks(self.ctx, {"v": value})["v"]  # NaN on any rank: NaN everywhere

    def barrier(self) -> None:
        barrier(self.ctx)


# ---------------------------------------------------------------------------------------------
# The update's DeepSpeed config

UPDATE_DS_FIELDS = DsFields(
    ds_config="engine.ds_config",
    batch="batching.batch_size",
    clip="optim.grad_clip",
    precision="target.dtype",
    optimizer="optim.name",
)


def update_ds_config(
    ds_config: str,
    world: int,
    batch_size: int,
    grad_clip: float,
    dtype: str,
    optimizer: str,
    hidden_size: int,
) -> dict:
    """The update target's effective DeepSpeed config; its messages name the update recipe's fields.

    Args:
        ds_config: a ``ds_configs/`` preset or a JSON path (engine.ds_config).
        world: ranks of the run.
        batch_size: rows per optimizer step over all ranks (batching.batch_size).
        grad_clip: optim.grad_clip.
        dtype: target.dtype; bfloat16 trains as DeepSpeed bf16 (fp32 master weights), else fp32.
        optimizer: optim.name (RecAdam is ZeRO-aware: its anchors live per partition).
        hidden_size: the target's hidden size (sizes the "auto" ZeRO buckets).
    """
    return resolve_ds_config(
        ds_config,
        world=world,
        batch_size=batch_size,
        grad_clip=grad_clip,
        precision="bf16" if dtype == "bfloat16" else "fp32",
        optimizer=optimizer,
        jvp=False,  # no forward-mode AD runs through the target
        partition_base=False,
        hidden_size=hidden_size,
        fields=UPDATE_DS_FIELDS,
    )
