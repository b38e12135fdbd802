"""Step checkpoints without pickles: safetensors for tensors, JSON for everything else.

Layout of a run directory::

    run_dir/
      recipe.yaml                 the resolved recipe
      metrics.jsonl               one JSON object per logged step
      checkpoints/
        step_00000040/            complete or absent (written via a temp dir + rename)
        latest                    text file naming the newest complete step directory

Nested state (optimizer state dicts, RNG states, data positions) is split by :func:`save_state`
into a ``.safetensors`` file of tensors and a ``.json`` file whose leaves point at them.

A training job checkpoints with :func:`save_step` / :func:`load_step`: every rank of its engine
(``training.engine``) writes its share into one staging directory, which becomes ``step_N``::

    step_00000040/
      state.json, state.safetensors     the job's own state (step, data position, ...), from rank 0
      rng_rank{r}.json/.safetensors      each rank's Python and torch RNG states
      ...                                what ``engine.save`` writes (parameters, optimizer state)
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ckl_toolkit.core.io import atomic_dir, write_json_atomic, write_text_atomic

STEP_DIR = re.compile(r"^step_(\d{8})$")
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_split(k, tensors, f"{path}.k{i}"), _split(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path!r}: cannot store {type(obj).__name__} without pickle")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_join(v, tensors) for v in obj[_TUPLE])
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(stem: str | os.PathLike, state: Any) -> None:
    """Write ``stem.safetensors`` + ``stem.json`` for a nested structure of tensors and plain values."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, tensors, "s")
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    write_json_atomic(stem.with_suffix(".json"), plain)


def load_state(stem: str | os.PathLike) -> Any:
    import json

    stem = Path(stem)
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _join(json.loads(stem.with_suffix(".json").read_text()), tensors)


def rng_state() -> dict:
    """Python and torch RNG states (numpy is not used by the library)."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    ckpt_root: str | os.PathLike, step: int, write: Callable[[Path], None], keep: int = 2
) -> Path:
    """Create ``ckpt_root/step_N`` atomically with ``write(tmp_dir)``; point ``latest`` at it; prune."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        write(tmp)
    write_text_atomic(ckpt_root / "latest", final.name + "\n")
    if keep > 0:
        steps = sorted(p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The directory ``latest`` names, or the newest complete step dir if the pointer is missing."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / "latest"
    if pointer.exists():
        cand = ckpt_root / pointer.read_text().strip()
        if cand.is_dir():
            return cand
    steps = sorted(p for p in ckpt_root.glob("step_*") if STEP_DIR.match(p.name) and p.is_dir())
    return steps[-1] if steps else None


def checkpoint_step(path: Path) -> int:
    m = STEP_DIR.match(path.name)
    if not m:
        raise ValueError(f"{path}: not a step checkpoint directory")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Parameters by name, and the step checkpoints of an engine on one or several ranks


def save_params(params: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Tensors by name as one safetensors file (CPU copies; e.g. an engine's trainable parameters)."""
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(path))


def load_params(params: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy tensors saved by :func:`save_params` into ``params`` in place; the names must match.

    Raises:
        ValueError: a name is missing on either side.
    """
    tensors = load_file(str(path))
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise ValueError(f"{path}: saved tensors differ (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))


class Checkpointable(Protocol):
    """What :func:`save_step` needs of an engine (``training.engine.Engine`` has it all)."""

    rank: int

    def save(self, out: Path) -> None: ...
    def load(self, ckpt: Path) -> None: ...
    def barrier(self) -> None: ...


def save_step(
    root: str | os.PathLike,
    step: int,
    engine: Checkpointable,
    state: dict,
    keep: int,
    write_main: Callable[[Path], None] | None = None,
) -> Path:
    """Write the resumable checkpoint ``root/step_N`` from every rank; complete or absent.

    Rank 0 creates a staging directory; every rank writes ``engine.save`` and its RNG state into
    it; rank 0 adds ``state`` and what ``write_main(staging)`` writes. After a barrier rank 0
    renames it into place, moves ``latest`` and prunes to ``keep`` steps, so ``latest`` never
    names a step that some rank has not finished. ``root`` must be on a filesystem every node shares.
    Collective: every rank calls it.
    """
    root = Path(root)
    staging = root / f".staging_{step:08d}"
    if engine.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing this step
        staging.mkdir(parents=True)
    engine.barrier()
    engine.save(staging)
    save_state(staging / f"rng_rank{engine.rank}", rng_state())
    if engine.rank == 0:
        save_state(staging / "state", state)
        if write_main is not None:
            write_main(staging)
    engine.barrier()  # every rank's files are in staging before it becomes step_N
    if engine.rank == 0:

        def move(tmp: Path) -> None:
            for item in staging.iterdir():
                item.rename(tmp / item.name)

        save_checkpoint(root, step, move, keep=keep)
        shutil.rmtree(staging, ignore_errors=True)
    engine.barrier()  # nobody runs ahead while rank 0 renames and prunes
    return root / step_dir_name(step)


def load_step(ckpt: str | os.PathLike, engine: Checkpointable) -> dict:
    """Load a :func:`save_step` checkpoint into the engine and this rank's RNG; return its ``state``."""
    ckpt = Path(ckpt)
    engine.load(ckpt)
    set_rng_state(load_state(ckpt / f"rng_rank{engine.rank}"))
    return load_state(ckpt / "state")
