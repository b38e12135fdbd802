"""``ckl eval``: every method of a recipe through a benchmark, on the same data, seed and budget.

    LAMA-ckl      data dir -> TO-LEARN, NOT-TO-FORGET re-selected for this model, rehearsal pool
                  -> for each method (and swept lr): fresh learner -> run_lama_ckl -> runs/<method>@<lr>.json
                  -> results.json: the same-lr view and, with a sweep, the equal-NOT-TO-FORGET view
    TemporalWiki  periods in order, scored before training and after each (evaluation.temporalwiki)

Each method's learner is built by the nightly job's own code (``training.learner.build_learner``
after ``evaluation.methods`` maps the name onto the recipe's sections). A finished (method, lr) run
is never repeated: a killed eval resumes at the first unfinished run (the run in progress restarts
from its epoch 0; metrics.jsonl drops that run's partial records).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from transformers import AutoTokenizer

from ckl_toolkit.core.config import ConfigError, recipe_hash, to_dict, to_yaml
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.io import append_jsonl, read_jsonl, write_json_atomic
from ckl_toolkit.core.models import ModelSpec, load_causal_lm
from ckl_toolkit.core.text import ensure_pad_token
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.fact_gain import pareto_front
from ckl_toolkit.evaluation.lama_ckl import run_lama_ckl
from ckl_toolkit.evaluation.methods import Method, parse_method
from ckl_toolkit.evaluation.not_to_forget import cached_selection
from ckl_toolkit.evaluation.periods import Context, run_periods
from ckl_toolkit.evaluation.runs import (
    fingerprint,
    machine_description,
    method_learner,
    read_json,
    run_key,
    start_run,
)
from ckl_toolkit.evaluation.temporalwiki import data_description as temporalwiki_data
from ckl_toolkit.evaluation.temporalwiki import load_data


def run_eval(recipe: EvalRecipe) -> dict:
    """Run the recipe's benchmark; writes and returns results.json."""
    if recipe.benchmark == "temporalwiki":
        return run_temporalwiki(recipe)
    return run_lama_benchmark(recipe)


def load_base(recipe: EvalRecipe, device):
    """The starting model, for selecting NOT-TO-FORGET."""
    t = recipe.target
    return load_causal_lm(ModelSpec(t.path, t.dtype, t.attn_implementation), "target.path").to(device)


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
    required, why = ("evidence", "object"), {}
    if any(parse_method(m).weights == "oracle" for m in recipe.methods):  # checked before any training
        field = recipe.weights.object_field
        required, why = (*required, field), {field: "weights.object_field, which the oracle weights"}
    rows = read_jsonl(_data_file(recipe, "to_learn.jsonl"), required=required, why=why)
    return rows[: recipe.data.to_learn_limit] if recipe.data.to_learn_limit else rows


def select_not_to_forget(recipe: EvalRecipe, model, tokenizer) -> list[dict]:
    """The candidates this model completes exactly before training (cached in run_dir for resumes)."""
    probe = recipe.protocol.probe_field
    key = recipe_hash({"model": to_dict(recipe.target), "data": to_dict(recipe.data), "probe": probe})
    cache = Path(recipe.run_dir) / f"not_to_forget.{key[:12]}.jsonl"
    path = _data_file(recipe, "not_to_forget_candidates.jsonl", "nf_candidates.jsonl")
    rows = read_jsonl(path, required=("object",)) if not cache.exists() else []
    return cached_selection(cache, model, tokenizer, rows, probe, recipe.data.nf_limit or None)


def _fact_key(row: dict) -> tuple[str, str]:
    return row["subject"], row.get("relation_code") or row.get("relation_label", "")


def synthetic_rehearsal(recipe: EvalRecipe, evaluated: list[dict]) -> list[Document]:
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
        docs.append(Document(f"rehearsal-{i}", " ".join(sents), "rehearsal", i + 1))
    return docs


def real_rehearsal(recipe: EvalRecipe, not_to_forget: list[dict]) -> list[Document]:
    """Invariant-fact evidence minus the selected NOT-TO-FORGET facts (never rehearse the test)."""
    nf = {r["uuid"] for r in not_to_forget if "uuid" in r}
    path = _data_file(recipe, "rehearsal.jsonl")
    rows = read_jsonl(path, required=("text",))
    return [
        Document(str(r.get("id") or f"rehearsal/{i}"), r["text"], str(path), i)
        for i, r in enumerate(rows, start=1)
        if r.get("uuid") not in nf
    ]


def rehearsal_pool(recipe: EvalRecipe, to_learn: list[dict], not_to_forget: list[dict]) -> list[Document]:
    if recipe.data.kind == "synthetic":
        return synthetic_rehearsal(recipe, to_learn + not_to_forget)
    return real_rehearsal(recipe, not_to_forget)


# ---------------------------------------------------------------------------------------------
# The equal-NOT-TO-FORGET view.


def equal_nf_view(recipe: EvalRecipe, runs: dict[str, dict]) -> dict | None:
    """Per method, the best TO-LEARN exact match among its lrs whose NF EM meets the reference's.

    Same-lr tables favour methods that forget more (a concentrated gradient learns and forgets
    faster): this view compares methods at (about) the same forgetting. Every method is in it: an
    unswept one with its single lr (meeting the target or not), so one run of, say, the Oracle at a
    lower lr places it beside the swept methods.
    """
    sw = recipe.sweep
    if not sw.lrs:
        return None
    target = runs[run_key(sw.reference, recipe.lr_of(sw.reference))]["nf_em"]
    methods = {}
    for m in recipe.methods:
        cands = [runs[run_key(m, lr)] for lr in recipe.lrs_of(m)]
        ok = [s for s in cands if s["nf_em"] >= target - sw.tolerance]
        best = max(ok, key=lambda s: s["top_em"]) if ok else max(cands, key=lambda s: s["nf_em"])
        methods[m] = {**best, "meets_target": bool(ok)}
    return {
        "target": {"metric": "nf_em", "value": target, "reference": sw.reference, "tolerance": sw.tolerance},
        "methods": methods,
    }


# ---------------------------------------------------------------------------------------------
# LAMA-ckl.


def run_lama_method(recipe: EvalRecipe, method: Method, lr: float, data: dict, device, log) -> dict:
    """A fresh learner for ``method`` at ``lr``, trained and scored by the protocol; its summary."""
    learner, mix = method_learner(method, lr, recipe.target, recipe.weights, recipe.optim, recipe.mix_review,
                                  recipe.seed, device)  # fmt: skip
    p = recipe.protocol
    result = run_lama_ckl(
        learner, data["to_learn"], data["not_to_forget"], p.epochs, recipe.batching, mix, recipe.seed,
        data.get("rehearsal", ()), p.probe_field, p.eval_batch_size, recipe.progress, log, method.name,
    )  # fmt: skip
    summary = result.summary()
    trainable = sum(t.numel() for t in learner.target.trainable().values())
    summary.update(method=method.name, lr=lr, trainable_params=trainable, components=asdict(method))
    return summary


def run_lama_benchmark(recipe: EvalRecipe) -> dict:
    start = time.perf_counter()
    methods = [parse_method(m) for m in recipe.methods]
    plan = [(m, lr) for m in methods for lr in recipe.lrs_of(m.name)]
    prints = {run_key(m.name, lr): fingerprint(recipe, m.uses_ta, m.uses_floor) for m, lr in plan}
    setup = start_run(Path(recipe.run_dir), to_yaml(recipe), prints, recipe.threads, recipe.device)
    run_dir, device, done = setup.run_dir, setup.device, setup.done

    tokenizer = AutoTokenizer.from_pretrained(recipe.target.path)
    ensure_pad_token(tokenizer)
    to_learn = load_to_learn(recipe)
    not_to_forget = select_not_to_forget(recipe, load_base(recipe, device), tokenizer)
    data = {"to_learn": to_learn, "not_to_forget": not_to_forget}
    if any(m.rehearsal for m in methods):
        data["rehearsal"] = rehearsal_pool(recipe, to_learn, not_to_forget)
    pool = f", rehearsal pool {len(data['rehearsal'])} documents" if "rehearsal" in data else ""
    print(f"TO-LEARN {len(to_learn)} facts, NOT-TO-FORGET {len(not_to_forget)} (re-selected){pool}")

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

        summary = run_lama_method(recipe, m, lr, data, device, log)
        summary["fingerprint"] = setup.fingerprints[key]
        write_json_atomic(run_dir / "runs" / f"{key}.json", summary)
        done[key] = summary
        print(f"[{i}/{len(plan)}] {key}: top EM {summary['top_em']:.3f}  NF EM {summary['nf_em']:.3f}  "
              f"top acc {summary['top_acc']:.3f}  ({summary['seconds']:.0f} s)")  # fmt: skip

    results = {
        "benchmark": "lama_ckl",
        "title": recipe.title or f"LAMA-ckl ({recipe.data.kind}) on {recipe.target.path}",
        "machine": machine_description(),
        "data": data_description(recipe, to_learn, not_to_forget, data.get("rehearsal")),
        "protocol": protocol_description(recipe),
        "methods": {m.name: done[run_key(m.name, recipe.lr_of(m.name))] for m in methods},
        "seconds": time.perf_counter() - start,
    }
    view = equal_nf_view(recipe, done)
    if view is not None:
        results["equal_nf"] = view
    results["seconds_all_runs"] = sum(s["seconds"] for s in done.values())
    write_json_atomic(run_dir / "results.json", results, sort_keys=False)
    return results


def protocol_description(recipe: EvalRecipe) -> dict:
    """The budget every method shares, for results.json and the report."""
    return {
        **to_dict(recipe.protocol),
        "lr": recipe.optim.lr,
        "weight_decay": recipe.optim.weight_decay,
        "grad_clip": recipe.optim.grad_clip,
        "batch_size": recipe.batching.batch_size,
        "max_length": recipe.batching.max_length,
        "shuffle": recipe.batching.shuffle,
        "normalize": recipe.weights.normalize,
        "seed": recipe.seed,
    }


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
        desc["split"] = read_json(split).get("rule", "")
    elif recipe.data.kind == "synthetic":
        desc["split"] = (
            "synthetic world: the TA was meta-trained on pairs about other entities than TO-LEARN's"
        )
    return desc


# ---------------------------------------------------------------------------------------------
# TemporalWiki.


def _stage_logger(run_dir: Path, key: str):
    def log(row: dict, train_loss: float | None, seconds: float) -> None:
        record = {"run": key, **row, "train_loss": train_loss, "seconds": seconds}
        append_jsonl(run_dir / "metrics.jsonl", [record])
        cells = [f"{p} acc {c['acc']:.3f} nll {c['nll']:.2f}" for p, c in row["probes"].items()]
        night = row.get("night")
        if night:
            gain = night["fact_gain"]["reworded"]
            kept = night.get("retention", {}).get("share")
            cells.append(
                f"fact gain (reworded) {gain['nats']:+.3f} nats" + (f", kept {kept:.1%}" if kept else "")
            )
        print(f"  {key} after {row['stage']}: " + "; ".join(cells), flush=True)

    return log


def temporalwiki_plan(
    recipe: EvalRecipe, methods: list[Method]
) -> list[tuple[Method, float, int | None, str]]:
    """(method, lr, epochs, run key) of every run: each at its lr, the swept lrs x epochs, sweep.points.

    ``epochs`` is None for the protocol's own number (its key has no suffix).
    """
    plan = []
    for m in methods:
        for lr, e in recipe.runs_of(m.name):
            epochs = None if e == recipe.protocol.epochs else e
            plan.append((m, lr, epochs, run_key(m.name, lr, epochs)))
    return plan


def tradeoff(recipe: EvalRecipe, runs: dict[str, dict], plan) -> dict:
    """Per method: the last night's fact gain (reworded, nats) and retention of every run, and the front."""
    out = {}
    for m in dict.fromkeys(m.name for m, *_ in plan):
        points = []
        for name, lr, epochs, key in plan:
            night = runs[key]["after"][-1].get("night") if name.name == m else None
            if not night or "retention" not in night:
                continue
            gain = night["fact_gain"]["reworded"]
            if math.isnan(gain["nats"]) or math.isnan(night["retention"]["share"]):
                continue  # no fact with a control, or the base knows none of the retention facts
            point = {"run": key, "lr": lr, "epochs": epochs or recipe.protocol.epochs}
            point.update(fact_gain=gain["nats"], fact_gain_em=gain["em"], raw_nats=gain["raw_nats"])
            points.append({**point, "retention": night["retention"]["share"]})
        if points:
            out[m] = {"points": points, "front": pareto_front(points, "retention", "fact_gain")}
    return out


def run_temporalwiki(recipe: EvalRecipe) -> dict:
    """Every run of the recipe through the TemporalWiki periods; writes and returns results.json."""
    start = time.perf_counter()
    methods = [parse_method(m) for m in recipe.methods]
    plan = temporalwiki_plan(recipe, methods)
    prints = {key: fingerprint(recipe, m.uses_ta, m.uses_floor) for m, _, _, key in plan}
    setup = start_run(Path(recipe.run_dir), to_yaml(recipe), prints, recipe.threads, recipe.device)
    run_dir, done = setup.run_dir, setup.done
    data = load_data(recipe, methods)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.probe_sets.items())
    print(f"TemporalWiki: periods {data.periods}; documents {[len(d) for d in data.stream]}; probes {sizes}")

    ctx = Context(recipe, data, setup.device)
    for i, (m, lr, epochs, key) in enumerate(plan, 1):
        if key in done:
            print(f"[{i}/{len(plan)}] {key}: done earlier, kept")
            continue
        summary = run_periods(ctx, m, lr, epochs or recipe.protocol.epochs, _stage_logger(run_dir, key))
        summary["fingerprint"] = setup.fingerprints[key]
        write_json_atomic(run_dir / "runs" / f"{key}.json", summary)
        done[key] = summary
        print(f"[{i}/{len(plan)}] {key}: done ({summary['seconds']:.0f} s)", flush=True)

    results = {
        "benchmark": "temporalwiki",
        "title": recipe.title or f"TemporalWiki on {recipe.target.path}",
        "machine": machine_description(),
        "stream": data.stream_label,
        "probe_rendering": data.probe_rendering,
        "periods": data.periods,
        "probe_sets": list(data.probe_sets),
        "data": temporalwiki_data(recipe, data),
        "protocol": {
            **to_dict(recipe.protocol),
            "epochs_per_period": recipe.protocol.epochs,
            "lr": recipe.optim.lr,
            "batch_size": recipe.batching.batch_size,
        },  # fmt: skip
        "methods": {m.name: done[run_key(m.name, recipe.lr_of(m.name))] for m in methods},
        "seconds": time.perf_counter() - start,
    }
    nights = {key: [s["night"] for s in done[key]["after"] if s.get("night")] for *_, key in plan}
    if any(nights.values()):
        results["nights"] = nights  # every run's nights (the methods above are the same-lr runs only)
    view = tradeoff(recipe, done, plan)
    if view:
        results["tradeoff"] = view
    results["seconds_all_runs"] = sum(s["seconds"] for s in done.values())
    write_json_atomic(run_dir / "results.json", results, sort_keys=False)
    return results
