"""The process group: who this rank is, joining and leaving, the few collectives the jobs use, launchers.

One process without a launcher is a world of one: ``DistContext()`` (plain torch), or, when the
recipe names a DeepSpeed config, a process group of one rank that DeepSpeed initialises like any
other. Every helper here is a no-op for a world of one, so a job's loop reads the same either way.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


@dataclass
class DistContext:
    """This process's place in the run. ``ds_config`` is the effective DeepSpeed config (None: plain)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ds_config: dict | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def deepspeed(self) -> bool:
        return self.ds_config is not None

    @property
    def zero_stage(self) -> int:
        return int((self.ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every rank before the process group exists)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def launched_world_size() -> int:
    """The world size a launcher (deepspeed, torchrun, mpirun) announced; 1 without one."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def accelerator() -> str:
    """'cuda' when torch sees a GPU and DS_ACCELERATOR does not say otherwise, else 'cpu'."""
    forced = os.environ.get("DS_ACCELERATOR")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ds_config: dict | None, backend: str = "auto") -> DistContext:
    """Join (or, for one process without a launcher, create) the process group.

    Args:
        ds_config: the effective DeepSpeed config; None: one plain torch process, no group.
        backend: torch.distributed backend; auto: nccl on CUDA, gloo on CPU.
    """
    if ds_config is None:
        return DistContext()
    if "WORLD_SIZE" not in os.environ:  # a plain `python meta.py` / `ckl meta-train`: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    import deepspeed
    import torch._dynamo  # noqa: F401  (zero.Init touches torch._dynamo; import it before)

    # Without this, init_distributed JIT-builds a shared-memory op (~60 s on a fresh CPU machine)
    # that training does not need (docs/ARCHITECTURE.md §9).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if accelerator() == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator() == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(rank, world, local_rank, ds_config)


# How long the ranks wait for each other before leaving the process group (then they leave anyway).
SHUTDOWN_BARRIER_SECONDS = 60


def shutdown() -> None:
    """Leave the process group (if one was created), all ranks together.

    Why the barrier: a rank that tears its gloo group down while a peer still has traffic in flight (rank 0
    writing the export while rank 1 is already leaving) was seen to abort the peer at exit ("terminate called
    without an active exception", SIGABRT) after a run that had published. Only on gloo, where a monitored
    barrier bounds the wait, so a rank whose peer died still exits; an NCCL barrier has no such bound (a
    dead peer would hold the job until the collective timeout), so NCCL groups leave as before.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() == "gloo":
        try:
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=SHUTDOWN_BARRIER_SECONDS))
        except RuntimeError:
            pass  # a peer is gone (its own failure is reported by its exit code): leave anyway
    torch.distributed.destroy_process_group()


def launch_command(script: str | os.PathLike, launcher: str, nproc: int, args: Sequence[str]) -> list[str]:
    """The command that runs ``script args`` on ``nproc`` local ranks with ``launcher``.

    Args:
        script: a job's entry file (``ckl_toolkit/meta.py``, ``ckl_toolkit/update.py``).
        launcher: torchrun or deepspeed.
        nproc: ranks on this machine.
        args: the script's own arguments, e.g. ``["--recipe", "r.yaml", "steps=3"]``.
    """
    if launcher == "torchrun":
        runner = ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    elif launcher == "deepspeed":
        runner = ["deepspeed.launcher.runner", f"--num_gpus={nproc}", f"--master_port={_free_port()}"]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    return [sys.executable, "-m", *runner, str(Path(script).resolve()), *map(str, args)]


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        torch.distributed.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ctx.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Per-key mean over ranks of scalar metrics (a sync point; NaN stays NaN)."""
    if ctx.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t)}
