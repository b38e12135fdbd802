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
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
