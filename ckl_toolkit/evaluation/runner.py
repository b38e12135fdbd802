"""``ckl eval``: every method through the LAMA-ckl protocol on the same data, seed and budget.

    data dir -> TO-LEARN, NOT-TO-FORGET re-selected for this model, rehearsal pool
    -> for each method (and each swept lr): fresh model -> run_lama_ckl -> runs/<method>@<lr>.json
    -> results.json: the same-lr view and, with a sweep, the equal-NOT-TO-FORGET view

A finished (method, lr) run is never repeated: a killed eval resumes at the first unfinished run
(the run in progress restarts from its epoch 0; metrics.jsonl drops that run's partial records).
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ckl_toolkit.core.config import ConfigError, recipe_hash, to_dict, to_yaml
from ckl_toolkit.core.io import (
    append_jsonl,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from ckl_toolkit.core.models import DTYPES
from ckl_toolkit.core.text import ensure_pad_token
from ckl_toolkit.data.world import select_known
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.lama_ckl import Rehearsal, run_lama_ckl
from ckl_toolkit.evaluation.methods import (
    Method,
    build_optimizer,
    build_trainable,
    build_weigher,
    parse_method,
)
from ckl_toolkit.training.mix_review import MixReviewConfig


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


def load_base(recipe: EvalRecipe, device: torch.device) -> torch.nn.Module:
    m = recipe.model
    model = AutoModelForCausalLM.from_pretrained(
        m.path, dtype=DTYPES[m.dtype], attn_implementation=m.attn_implementation
    )
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# Data: TO-LEARN, NOT-TO-FORGET (re-selected for this model), the rehearsal pool.


def _data_file(recipe: EvalRecipe, *names: str) -> Path:
    for name in names:
        path = Path(recipe.data.dir) / name
        if path.exists():
            return path
    wanted = " or ".join(names)
    raise ConfigError(f"data.dir: {recipe.data.dir} has no {wanted} (data.kind={recipe.data.kind})")


def load_to_learn(recipe: EvalRecipe) -> list[dict]:
    rows = read_jsonl(_data_file(recipe, "to_learn.jsonl"), required=("evidence", "object"))
    return rows[: recipe.data.to_learn_limit] if recipe.data.to_learn_limit else rows


def select_not_to_forget(recipe: EvalRecipe, model, tokenizer) -> list[dict]:
    """The candidates this model completes exactly before training (cached in run_dir for resumes).

    The cache is keyed by what the selection depends on, so a changed model, data dir, probe or
    limit selects again instead of reusing another setting's facts.
    """
    probe = recipe.protocol.probe_field
    key = recipe_hash({"model": to_dict(recipe.model), "data": to_dict(recipe.data), "probe": probe})
    cache = Path(recipe.run_dir) / f"not_to_forget.{key[:12]}.jsonl"
    if cache.exists():
        return read_jsonl(cache)
    path = _data_file(recipe, "not_to_forget_candidates.jsonl", "nf_candidates.jsonl")
    rows = [r for r in read_jsonl(path, required=("object",)) if r.get(probe)]
    known = select_known(model, tokenizer, rows, probe_field=probe, limit=recipe.data.nf_limit or None)
    write_jsonl_atomic(cache, known)
    return known


def _fact_key(row: dict) -> tuple[str, str]:
    return row["subject"], row.get("relation_code") or row.get("relation_label", "")


def synthetic_rehearsal(recipe: EvalRecipe, evaluated: list[dict]) -> list[dict]:
    """Older data for mix-review: short biographies from pretraining facts that are not evaluated.

    The evaluated facts are left out on both sides: NOT-TO-FORGET facts (rehearsing them would train
    on the test, the released baseline's defect) and the stale pretraining value of every TO-LEARN
    fact (rehearsing it would teach the old object back).
    """
    facts = read_jsonl(_data_file(recipe, "pretrain_facts.jsonl"), required=("subject", "probe_seen"))
    skip = {_fact_key(r) for r in evaluated}
    by_subject: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        if _fact_key(f) not in skip:
            by_subject[f["subject"]].append(f["probe_seen"] + ".")
    subjects = sorted(by_subject)
    rng = random.Random(f"rehearsal:{recipe.seed}")
    docs = []
    for i in range(recipe.data.rehearsal_docs):
        sents = list(by_subject[rng.choice(subjects)])
        rng.shuffle(sents)
        docs.append({"id": f"rehearsal-{i}", "evidence": " ".join(sents)})
    return docs


def real_rehearsal(recipe: EvalRecipe, not_to_forget: list[dict]) -> list[dict]:
    """Invariant-fact evidence minus the selected NOT-TO-FORGET facts (never rehearse the test)."""
    nf = {r["uuid"] for r in not_to_forget if "uuid" in r}
    rows = read_jsonl(_data_file(recipe, "rehearsal.jsonl"), required=("text",))
    return [{"id": r.get("id"), "evidence": r["text"]} for r in rows if r.get("uuid") not in nf]


def rehearsal_pool(recipe: EvalRecipe, to_learn: list[dict], not_to_forget: list[dict]) -> list[dict]:
    if recipe.data.kind == "synthetic":
        return synthetic_rehearsal(recipe, to_learn + not_to_forget)
    return real_rehearsal(recipe, not_to_forget)


# ---------------------------------------------------------------------------------------------
# One (method, lr) run.


def run_key(method: str, lr: float) -> str:
    return f"{method}@{lr:g}"


def build_learner(recipe: EvalRecipe, method: Method, lr: float, device, ta):
    """A fresh model for ``method``, its weigher, and the protocol settings at ``lr`` (both benchmarks)."""
    torch.manual_seed(recipe.seed)  # the same LoRA / adapter init for every method and lr
    base = load_base(recipe, device)
    model = build_trainable(method, base, recipe.lora, recipe.kadapter.build()).to(device)
    # RHO-1's reference: the model before any update, frozen (a second copy in memory)
    reference = load_base(recipe, device) if method.weights == "rho1" else None
    weigher = build_weigher(method, ta=ta, reference=reference, keep_ratio=recipe.rho1_keep_ratio)
    protocol = type(recipe.protocol)(**{**to_dict(recipe.protocol), "lr": lr})
    return model, weigher, protocol


def run_one(recipe, method: Method, lr: float, data: dict, device, ta, log) -> dict:
    """A fresh model for ``method``, trained and scored by the protocol; returns its summary."""
    model, weigher, protocol = build_learner(recipe, method, lr, device, ta)
    optimizer = build_optimizer(method, model, lr, protocol.weight_decay, recipe.recadam.build())
    rehearsal = None
    if method.rehearsal:
        mix = MixReviewConfig(recipe.mix_review.mix_ratio, recipe.mix_review.mix_decay, recipe.seed)
        rehearsal = Rehearsal(data["rehearsal"], mix)
    result = run_lama_ckl(
        model, data["tokenizer"], data["to_learn"], data["not_to_forget"], weigher, protocol,
        optimizer=optimizer, progress=recipe.progress, rehearsal=rehearsal, on_epoch=log, name=method.name,
    )  # fmt: skip
    summary = result.summary()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary.update(method=method.name, lr=lr, trainable_params=trainable, components=asdict(method))
    return summary


# ---------------------------------------------------------------------------------------------
# The equal-NOT-TO-FORGET view.


def equal_nf_view(recipe: EvalRecipe, runs: dict[str, dict]) -> dict | None:
    """Per method, the best TO-LEARN exact match among its lrs whose NF EM meets the reference's.

    Same-lr tables favour methods that forget more (a concentrated gradient learns and forgets
    faster; WORLD_FACTS.md): this view compares methods at (about) the same forgetting.
    """
    sw = recipe.sweep
    if not sw.lrs:
        return None
    target = runs[run_key(sw.reference, recipe.lr_of(sw.reference))]["nf_em"]
    methods = {}
    for m in sw.methods or recipe.methods:
        cands = [runs[run_key(m, lr)] for lr in recipe.lrs_of(m)]
        ok = [s for s in cands if s["nf_em"] >= target - sw.tolerance]
        best = max(ok, key=lambda s: s["top_em"]) if ok else max(cands, key=lambda s: s["nf_em"])
        methods[m] = {**best, "meets_target": bool(ok)}
    return {
        "target": {"metric": "nf_em", "value": target, "reference": sw.reference, "tolerance": sw.tolerance},
        "methods": methods,
    }


# ---------------------------------------------------------------------------------------------
# The whole benchmark.


def _fingerprint(recipe: EvalRecipe) -> str:
    """What a finished run's numbers depend on besides its method and lr (not the method list)."""
    ignore = ("methods", "sweep", "lr_overrides", "progress", "threads", "title", "run_dir")
    keep = {k: v for k, v in to_dict(recipe).items() if k not in ignore}
    return recipe_hash(keep)


def _clean_metrics(run_dir: Path, done: set[str]) -> None:
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


@dataclass
class RunSetup:
    run_dir: Path
    device: torch.device
    fingerprint: str
    done: dict[str, dict]  # run key -> summary of every run already finished with this fingerprint


def start_run(recipe: EvalRecipe, keys: list[str]) -> RunSetup:
    """What both benchmarks do first: run dir + resolved recipe, threads, device, finished runs."""
    run_dir = Path(recipe.run_dir)
    (run_dir / "runs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", to_yaml(recipe))
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.device)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per method and lr is noise here
    fingerprint = _fingerprint(recipe)
    done = {}
    for key in keys:
        saved = _read_json(run_dir / "runs" / f"{key}.json")
        if saved.get("fingerprint") == fingerprint:
            done[key] = saved
    _clean_metrics(run_dir, set(done))
    return RunSetup(run_dir, device, fingerprint, done)


def load_ta(recipe: EvalRecipe, methods: list[Method], device: torch.device):
    """The frozen TA model when a method needs one, else None."""
    if not any(m.uses_ta for m in methods):
        return None
    from ckl_toolkit.core.ta_model import load_ta_model

    return load_ta_model(recipe.ta).to(device)


def run_lama_benchmark(recipe: EvalRecipe) -> dict:
    start = time.perf_counter()
    methods = [parse_method(m) for m in recipe.methods]
    plan = [(m, lr) for m in methods for lr in recipe.lrs_of(m.name)]
    setup = start_run(recipe, [run_key(m.name, lr) for m, lr in plan])
    run_dir, device, done = setup.run_dir, setup.device, setup.done

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    ensure_pad_token(tokenizer)
    to_learn = load_to_learn(recipe)
    base = load_base(recipe, device)
    not_to_forget = select_not_to_forget(recipe, base, tokenizer)
    del base
    data = {"tokenizer": tokenizer, "to_learn": to_learn, "not_to_forget": not_to_forget}
    if any(m.rehearsal for m in methods):
        data["rehearsal"] = rehearsal_pool(recipe, to_learn, not_to_forget)
    pool = f", rehearsal pool {len(data['rehearsal'])} documents" if "rehearsal" in data else ""
    print(f"TO-LEARN {len(to_learn)} facts, NOT-TO-FORGET {len(not_to_forget)} (re-selected){pool}")

    ta = load_ta(recipe, methods, device)
    for i, (m, lr) in enumerate(plan, 1):
        key = run_key(m.name, lr)
        if key in done:
            print(f"[{i}/{len(plan)}] {key}: done earlier, kept")
            continue

        def log(epoch: int, res, key=key) -> None:
            append_jsonl(run_dir / "metrics.jsonl", [{
                "run": key, "epoch": epoch, "to_learn": res.to_learn[-1], "to_learn_em": res.to_learn_em[-1],
                "not_to_forget": res.not_to_forget[-1], "not_to_forget_em": res.not_to_forget_em[-1],
                "train_loss": res.train_loss[-1] if res.train_loss else None,
            }])  # fmt: skip

        summary = run_one(recipe, m, lr, data, device, ta, log)
        summary["fingerprint"] = setup.fingerprint
        write_json_atomic(run_dir / "runs" / f"{key}.json", summary)
        done[key] = summary
        print(f"[{i}/{len(plan)}] {key}: top EM {summary['top_em']:.3f}  NF EM {summary['nf_em']:.3f}  "
              f"top acc {summary['top_acc']:.3f}  ({summary['seconds']:.0f} s)")  # fmt: skip

    results = {
        "benchmark": "lama_ckl",
        "title": recipe.title or f"LAMA-ckl ({recipe.data.kind}) on {recipe.model.path}",
        "machine": machine_description(),
        "data": data_description(recipe, to_learn, not_to_forget, data.get("rehearsal")),
        "protocol": to_dict(recipe.protocol),
        "methods": {m.name: done[run_key(m.name, recipe.lr_of(m.name))] for m in methods},
        "seconds": time.perf_counter() - start,
    }
    view = equal_nf_view(recipe, done)
    if view is not None:
        results["equal_nf"] = view
    results["seconds_all_runs"] = sum(s["seconds"] for s in done.values())
    write_json_atomic(run_dir / "results.json", results, sort_keys=False)
    return results


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged result is recomputed


def data_description(recipe: EvalRecipe, to_learn, not_to_forget, rehearsal) -> dict:
    desc = {
        "kind": recipe.data.kind,
        "source": recipe.data.dir,
        "to_learn": len(to_learn),
        "not_to_forget": len(not_to_forget),
        "probe_field": recipe.protocol.probe_field,
        "not_to_forget_rule": f"candidates the model completes exactly on {recipe.protocol.probe_field} "
        "before training" + (f" (first {recipe.data.nf_limit})" if recipe.data.nf_limit else ""),
    }
    if rehearsal is not None:
        desc["rehearsal"] = len(rehearsal)
    split = Path(recipe.data.dir) / "split.json"
    if split.exists():
        info = _read_json(split)
        desc["split"] = info.get("rule", "")
    elif recipe.data.kind == "synthetic":
        desc["split"] = (
            "synthetic world: the TA was meta-trained on pairs about other entities than TO-LEARN's"
        )
    return desc


def run_eval(recipe: EvalRecipe) -> dict:
    if recipe.benchmark == "temporalwiki":
        from ckl_toolkit.evaluation.temporalwiki import run_temporalwiki

        return run_temporalwiki(recipe)
    return run_lama_benchmark(recipe)
