"""What both benchmarks do around their runs: the run directory, finished runs, one learner per run.

A benchmark is a list of (method, lr) runs on the same data, seed and budget. Each finished run is a
file ``runs/<method>@<lr>.json`` stamped with a fingerprint of everything its numbers depend on, so
a killed eval resumes at the first unfinished run and a changed recipe recomputes only what changed.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from ckl_toolkit.core.config import ConfigError, recipe_hash, to_dict
from ckl_toolkit.core.io import write_jsonl_atomic, write_text_atomic
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.methods import Method, method_sections
from ckl_toolkit.training.learner import Learner, build_learner
from ckl_toolkit.training.sections import MixReviewSpec, OptimSpec, TargetSpec, WeightSpec


def machine_description() -> str:
    """Where the figures were measured (they go into results.json and the report)."""
    desc = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no GPU is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# Fields added after results were stored, each with the value that reproduces the behaviour before it
# existed: at that value the field stays out of the fingerprint, so adding a field to the recipe does not
# recompute every finished run (a new default value would otherwise change every fingerprint).
NEUTRAL_NEW_FIELDS: dict[tuple[str, str], object] = {("weights", "floor"): 0.0}


def fingerprint_fields(recipe: EvalRecipe, uses_ta: bool = True, uses_floor: bool = True) -> dict:
    """The recipe fields a finished run's numbers depend on besides its method and lr."""
    ignore = ("methods", "sweep", "lr_overrides", "progress", "threads", "title", "run_dir")
    fields = {k: v for k, v in to_dict(recipe).items() if k not in ignore}
    for (section, name), neutral in NEUTRAL_NEW_FIELDS.items():
        if fields[section].get(name) == neutral:
            fields[section] = {k: v for k, v in fields[section].items() if k != name}
    unread = ({"ta_path"} if not uses_ta else set()) | ({"floor"} if not uses_floor else set())
    fields["weights"] = {k: v for k, v in fields["weights"].items() if k not in unread}
    return fields


def fingerprint(recipe: EvalRecipe, uses_ta: bool = True, uses_floor: bool = True) -> str:
    """What a finished run's numbers depend on besides its method and lr (not the method list).

    A method without Train-Attention does not depend on ``weights.ta_path``, nor one with uniform or
    RHO-1 weights on ``weights.floor``: comparing two TA seeds (or floors) in two run dirs can copy the
    baselines' ``runs/<key>.json`` across instead of re-running them.
    """
    return recipe_hash(fingerprint_fields(recipe, uses_ta, uses_floor))


def run_key(method: str, lr: float, epochs: int | None = None) -> str:
    """``method@lr`` for a run at the protocol's epochs, ``method@lr,Nep`` for a swept number of epochs."""
    return f"{method}@{lr:g}" + (f",{epochs}ep" if epochs is not None else "")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged result is recomputed


@dataclass
class RunSetup:
    run_dir: Path
    device: torch.device
    fingerprints: dict[str, str]  # run key -> what its numbers depend on (see ``fingerprint``)
    done: dict[str, dict]  # run key -> summary of every run already finished with its fingerprint


def start_run(run_dir: Path, recipe_yaml: str, fingerprints: dict[str, str], threads: int, device: str):
    """Run dir + resolved recipe, threads, device, and the runs already finished with their fingerprint."""
    (run_dir / "runs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", recipe_yaml)
    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per method and lr is noise here
    done = {}
    for key, fp in fingerprints.items():
        saved = read_json(run_dir / "runs" / f"{key}.json")
        if saved.get("fingerprint") == fp:
            done[key] = saved
    clean_metrics(run_dir, set(done))
    return RunSetup(run_dir, resolve_device(device), fingerprints, done)


def clean_metrics(run_dir: Path, done: set[str]) -> None:
    """Drop the records of runs that did not finish (and a line torn by a kill); finished runs keep theirs."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # only a kill mid-append writes a partial line
        if isinstance(record, dict) and record.get("run") in done:
            kept.append(record)
    write_jsonl_atomic(path, kept)


def method_learner(
    method: Method,
    lr: float,
    target: TargetSpec,
    weights: WeightSpec,
    optim: OptimSpec,
    mix: MixReviewSpec,
    seed: int,
    device: torch.device,
) -> tuple[Learner, MixReviewSpec]:
    """A fresh learner for ``method`` at ``lr``, built exactly as ``ckl update`` builds its own."""
    s = method_sections(method, target, weights, optim, mix, lr)
    return build_learner(s.target, s.weights, s.optim, None, seed, device), s.mix_review
