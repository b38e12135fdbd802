"""TemporalWiki (docs/ARCHITECTURE.md §5-6): sequential period refreshes, scored on changed/unchanged probes.

    data dir -> per period: changed / unchanged probes {subject, relation, object}
             -> per period: the update stream (the user's diff documents, or the documented
                substitute: one sentence rendered from each of the period's changed triples)
    -> for each method: a fresh learner (the nightly job's) -> score every probe set ("base")
       -> for each period in order: a fresh optimizer and engine, ``protocol.epochs`` passes over the
          period's documents (+ mix-review draws) -> score every probe set
    -> runs/<method>@<lr>.json, metrics.jsonl (one record per stage), results.json

Each period is its own refresh (the nightly job): the optimizer is rebuilt per period, so AdamW's
moments restart and RecAdam anchors θ* at the previous period's weights. Mix-review draws as the
update does (``MixReviewSpec.epoch``; with ``per: period`` the ratio decays across periods).

Probes always end with their object, so the object's teacher-forced tokens follow everything else;
the substitute stream renders each triple differently from its probe, so a changed probe is a
paraphrase of a training sentence rather than a verbatim copy.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckl_toolkit.core.config import ConfigError, to_dict, to_yaml
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.io import append_jsonl, read_jsonl, write_json_atomic
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.lama_ckl import train_epoch
from ckl_toolkit.evaluation.methods import Method, method_sections, parse_method
from ckl_toolkit.evaluation.probes import score_probes
from ckl_toolkit.evaluation.runs import fingerprint, machine_description, method_learner, run_key, start_run
from ckl_toolkit.training.learner import make_engine
from ckl_toolkit.training.step import NonFiniteGuard

TRIPLE_PROBE = "{subject} {relation} {object}"  # TemporalWiki's own rendering: the object is last
STREAM_SENTENCE = "The {relation} of {subject} is {object}."  # substitute training sentence
SPLITS = ("changed", "unchanged")
PROBE_MAX_LENGTH = 256  # probes are one short sentence; truncation would cut the object (it is last)


# ---------------------------------------------------------------------------------------------
# Rendering triples.


def load_templates(path: str | Path) -> dict[str, str]:
    """LAMA relation label -> template cut at its object, for templates whose last slot is [Y].

    '[X] was born in [Y] .' -> '[X] was born in [Y]'. Templates with words after [Y] ('[X] is [Y]
    citizen .') are left out: their probe would not end with the object.
    """
    out = {}
    for row in read_jsonl(path, required=("label", "template")):
        body = row["template"].strip().rstrip(".").rstrip()
        if body.endswith("[Y]") and body.count("[Y]") == 1 and body.count("[X]") == 1:
            out[row["label"]] = body
    return out


def render_probe(triple: dict, templates: dict[str, str]) -> str:
    """The probe sentence of a triple; its object is always the last thing in it."""
    template = templates.get(triple["relation"])
    if template is None:
        return TRIPLE_PROBE.format(**triple)
    return template.replace("[X]", triple["subject"]).replace("[Y]", triple["object"])


def render_stream_sentence(triple: dict) -> str:
    """A training sentence for the substitute stream, worded unlike every probe rendering."""
    return STREAM_SENTENCE.format(**triple)


def probe_rendering_label(templates: dict[str, str], source: str) -> str:
    if not templates:
        return f"'{TRIPLE_PROBE}' (TemporalWiki's own rendering; the object ends the probe)"
    return (
        f"LAMA template cut at its object when the relation label has one ending in [Y] ({len(templates)} "
        f"labels from {source}; e.g. '[X] was born in [Y] .' -> 'S was born in O'), else '{TRIPLE_PROBE}'; "
        "the object always ends the probe"
    )


# ---------------------------------------------------------------------------------------------
# Reading the data.


def read_triples(path: str | Path) -> list[dict]:
    """{subject, relation, object} rows from a JSONL or CSV file; errors name file and line."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = [(i, r) for i, r in enumerate(csv.DictReader(f), start=2)]  # line 1 is the header
    else:
        rows = list(enumerate(read_jsonl(path), start=1))
    triples = []
    for line, r in rows:
        for key in ("subject", "relation", "object"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ConfigError(f"{path}:{line}: field '{key}' is missing or empty")
        triples.append({k: r[k].strip() for k in ("subject", "relation", "object")})
    return triples


def _triple_key(t: dict) -> tuple[str, str, str]:
    return t["subject"], t["relation"], t["object"]


@dataclass
class TemporalWikiData:
    """Everything the methods share: the probes, the stream and mix-review's pools, all per period."""

    periods: list[str]
    probe_sets: dict[str, list[dict]]  # "0901-1001/changed" -> [{subject, relation, object, probe}]
    stream: list[list[Document]]  # per period: the training documents (object in meta when known)
    stream_label: str
    probe_rendering: str
    pools: list[list[Document]] = field(default_factory=list)  # per period: older documents
    pool_label: str = ""


def _period_file(recipe: EvalRecipe, period: str, split: str) -> Path:
    path = Path(recipe.data.dir) / f"{period}_{split}.jsonl"
    if not path.exists():
        raise ConfigError(f"data.dir: {recipe.data.dir} has no {path.name} (temporalwiki.periods: {period})")
    return path


def load_probe_sets(recipe: EvalRecipe, templates: dict[str, str]) -> dict[str, list[dict]]:
    """'{period}/{changed,unchanged}' -> the first probe_limit triples, each with its rendered probe."""
    limit = recipe.temporalwiki.probe_limit
    sets = {}
    for period in recipe.temporalwiki.periods:
        for split in SPLITS:
            triples = read_triples(_period_file(recipe, period, split))
            triples = triples[:limit] if limit else triples
            sets[f"{period}/{split}"] = [{**t, "probe": render_probe(t, templates)} for t in triples]
    return sets


def substitute_stream(recipe: EvalRecipe) -> tuple[list[list[Document]], str]:
    """One training sentence per changed triple of each period (the object kept, so oracle works)."""
    limit = recipe.temporalwiki.train_limit
    stream = []
    for period in recipe.temporalwiki.periods:
        triples = read_triples(_period_file(recipe, period, "changed"))
        triples = triples[:limit] if limit else triples
        stream.append([_stream_document(t, f"{period}/{i}", i + 1) for i, t in enumerate(triples)])
    label = (
        f"substitute: sentences rendered from each period's changed triples ('{STREAM_SENTENCE}', one "
        "document per triple"
        + (f", the first {limit} per period" if limit else "")
        + "); the changed probes are the same triples in another wording, so changed-probe scores "
        "measure memorisation of the stream, not learning from real diff text"
    )
    return stream, label


def _stream_document(triple: dict, doc_id: str, line: int) -> Document:
    """A substitute training document; its object is kept so the oracle can weight it."""
    shard = doc_id.rsplit("/", 1)[0]
    return Document(doc_id, render_stream_sentence(triple), shard, line, {"object": triple["object"]})


def user_stream(recipe: EvalRecipe) -> tuple[list[list[Document]], str]:
    """The user's diff documents ({id, text}, optional object), one JSONL per period."""
    limit = recipe.temporalwiki.train_limit
    stream = []
    for path in recipe.temporalwiki.documents:
        if not Path(path).exists():
            raise ConfigError(f"temporalwiki.documents: {path} not found")
        rows = read_jsonl(path, required=("text",))
        rows = rows[:limit] if limit else rows
        stream.append([_user_document(r, path, i) for i, r in enumerate(rows, start=1)])
    label = "user documents: " + ", ".join(recipe.temporalwiki.documents)
    return stream, label + (f" (first {limit} each)" if limit else "")


def _user_document(row: dict, path: str, line: int) -> Document:
    """A user's diff document; its ``object`` (if any) is kept so the oracle can use it."""
    meta = {"object": row["object"]} if isinstance(row.get("object"), str) else {}
    return Document(str(row.get("id", f"{path}:{line}")), row["text"], path, line, meta)


def check_oracle(methods: list[Method], stream: list[list[Document]]) -> None:
    """The oracle weights the object's tokens: every training document must name its object."""
    if any(m.weights == "oracle" for m in methods) and any(
        "object" not in d.meta for docs in stream for d in docs
    ):
        raise ConfigError(
            "methods: 'oracle' needs the object of every training document; the user documents "
            "(temporalwiki.documents) have none: drop oracle or use the substitute stream"
        )


def rehearsal_pools(
    recipe: EvalRecipe, stream: list[list[Document]], probe_sets: dict[str, list[dict]]
) -> tuple[list[list[Document]], str]:
    """Mix-review's older data per period: the earlier triples file, then earlier periods' documents.

    Rehearsal never replays an evaluated unchanged probe's triple (that would train on the retention
    test); earlier periods' documents are older training data and fair to replay.
    """
    older, where = [], "no earlier triples"
    name = recipe.temporalwiki.rehearsal_triples
    if name:
        path = Path(recipe.data.dir) / name
        if not path.exists():
            raise ConfigError(f"temporalwiki.rehearsal_triples: {path} not found (empty: no older data)")
        unchanged = {
            _triple_key(t) for s, rows in probe_sets.items() if s.endswith("/unchanged") for t in rows
        }
        triples = read_triples(path)
        kept = [t for t in triples if _triple_key(t) not in unchanged]
        older = [Document(f"{name}/{i}", render_stream_sentence(t), name, i + 1) for i, t in enumerate(kept)]
        left_out = len(triples) - len(kept)
        where = (
            f"{len(older)} sentences rendered from {name} ({left_out} evaluated unchanged triples left out)"
        )
    pools, earlier = [], list(older)
    for docs in stream:
        pools.append(list(earlier))
        earlier += [Document(d.id, d.text, d.shard, d.line) for d in docs]  # rehearsed without objects
    label = f"period 1: {where}; period p > 1: that plus the documents of periods 1..p-1"
    return pools, label


def load_data(recipe: EvalRecipe, methods: list[Method]) -> TemporalWikiData:
    tw = recipe.temporalwiki
    if tw.templates and not Path(tw.templates).exists():
        raise ConfigError(f"temporalwiki.templates: {tw.templates} not found (empty: no LAMA templates)")
    templates = load_templates(tw.templates) if tw.templates else {}
    probe_sets = load_probe_sets(recipe, templates)
    stream, label = user_stream(recipe) if tw.documents else substitute_stream(recipe)
    check_oracle(methods, stream)
    data = TemporalWikiData(
        list(tw.periods), probe_sets, stream, label, probe_rendering_label(templates, tw.templates)
    )
    if any(m.rehearsal for m in methods):
        data.pools, data.pool_label = rehearsal_pools(recipe, stream, probe_sets)
    return data


# ---------------------------------------------------------------------------------------------
# Scoring.


def score_probe_set(
    model: torch.nn.Module, tokenizer, probes: list[str], objects: list[str], batch_size: int = 64
) -> dict:
    """One cell of the stage matrix: object-token NLL / accuracy / exact match, whole-probe perplexity.

    All from one ``evaluation.score_probes`` pass (the object's last occurrence). A probe whose object
    is missing counts as wrong and is left out of the NLL mean; ``ppl`` covers every target token of
    every probe, i.e. all tokens but the first (the BOS, when the tokenizer adds one).
    """
    scores = score_probes(
        model, tokenizer, probes, objects, batch_size=batch_size, max_length=PROBE_MAX_LENGTH
    )
    found = scores.found_object_nll
    n = len(probes)
    cell = {
        "nll": sum(found) / len(found) if found else math.nan,
        "ppl": scores.ppl,
        "acc": scores.acc,
        "em": scores.em,
        "n": n,
    }
    if len(found) < n:
        cell["missing_object"] = n - len(found)
    return cell


def evaluate_stage(model, tokenizer, probe_sets: dict[str, list[dict]], batch_size: int) -> dict[str, dict]:
    return {
        name: score_probe_set(
            model, tokenizer, [r["probe"] for r in rows], [r["object"] for r in rows], batch_size
        )
        for name, rows in probe_sets.items()
    }


def accuracy_matrix(after: list[dict], probe_sets: list[str]) -> list[list[float]]:
    """Rows = stages (base, then after each period), columns = probe sets: object-token accuracy."""
    return [[row["probes"][p]["acc"] for p in probe_sets] for row in after]


def forgetting(after: list[dict], probe_sets: list[str]) -> dict[str, float]:
    """Per probe set: the best accuracy of any earlier stage minus the final accuracy (signed).

    Negative means the final model knows more than at any earlier stage (e.g. a period's changed
    probes after learning that period).
    """
    matrix = accuracy_matrix(after, probe_sets)
    if len(matrix) < 2:
        return {p: 0.0 for p in probe_sets}
    return {p: max(row[j] for row in matrix[:-1]) - matrix[-1][j] for j, p in enumerate(probe_sets)}


# ---------------------------------------------------------------------------------------------
# One method.


@dataclass
class Context:
    """What every method's run reads: the recipe, the data, the device."""

    recipe: EvalRecipe
    data: TemporalWikiData
    device: torch.device


def run_method(ctx: Context, method: Method, lr: float, log) -> dict:
    """A fresh learner trained period after period; ``after`` holds the scores of every stage.

    Each period is its own refresh, as a nightly run: a fresh optimizer (AdamW's moments restart,
    RecAdam anchors θ* at the period's starting weights) in a fresh engine; mix-review draws the
    period's rehearsal with ``MixReviewSpec.epoch`` (per='period': the ratio decays across periods).
    RHO-1's reference stays the model before all periods (the served model the refreshes start from).
    """
    recipe, data = ctx.recipe, ctx.data
    start = time.perf_counter()
    learner, mix = method_learner(method, lr, recipe.target, recipe.weights, recipe.optim, recipe.mix_review,
                                  recipe.seed, ctx.device)  # fmt: skip
    optim = method_sections(method, recipe.target, recipe.weights, recipe.optim, recipe.mix_review, lr).optim
    model, tokenizer, eval_bs = learner.target.model, learner.tokenizer, recipe.protocol.eval_batch_size

    after = [{"stage": "base", "probes": evaluate_stage(model, tokenizer, data.probe_sets, eval_bs)}]
    log(after[-1], None, time.perf_counter() - start)
    train_loss, guard = [], NonFiniteGuard(max_consecutive=3)
    for p, period in enumerate(data.periods):
        if p > 0:  # a refresh is its own run
            learner.engine = make_engine(learner.target, optim, None)
        pool = data.pools[p] if data.pools else []
        losses = []
        for e in range(recipe.protocol.epochs):
            docs, _ = mix.epoch(data.stream[p], pool, p, e, recipe.batching.shuffle_key(recipe.seed, p, e))
            losses.append(train_epoch(learner, docs, recipe.batching, guard))
        train_loss.append(sum(losses) / len(losses))
        scores = evaluate_stage(model, tokenizer, data.probe_sets, eval_bs)
        after.append({"stage": period, "probes": scores})
        log(after[-1], train_loss[-1], time.perf_counter() - start)

    names = list(data.probe_sets)
    return {
        "after": after,
        "forgetting": forgetting(after, names),
        "acc_matrix": accuracy_matrix(after, names),
        "train_loss": train_loss,
        "seconds": time.perf_counter() - start,
        "lr": lr,
        "method": method.name,
        "components": asdict(method),
        "trainable_params": sum(t.numel() for t in learner.target.trainable().values()),
    }


# ---------------------------------------------------------------------------------------------
# The whole benchmark.


def _stage_logger(run_dir: Path, key: str):
    def log(row: dict, train_loss: float | None, seconds: float) -> None:
        record = {"run": key, "stage": row["stage"], "probes": row["probes"], "train_loss": train_loss}
        append_jsonl(run_dir / "metrics.jsonl", [{**record, "seconds": seconds}])
        changed = [f"{p} acc {c['acc']:.3f} nll {c['nll']:.2f}" for p, c in row["probes"].items()]
        print(f"  {key} after {row['stage']}: " + "; ".join(changed), flush=True)

    return log


def run_temporalwiki(recipe: EvalRecipe) -> dict:
    """Every method of the recipe through the TemporalWiki periods; writes and returns results.json."""
    start = time.perf_counter()
    if recipe.sweep.lrs:
        raise ConfigError("sweep.lrs: the equal-NOT-TO-FORGET sweep is LAMA-ckl only; leave it empty")
    methods = [parse_method(m) for m in recipe.methods]
    setup = start_run(Path(recipe.run_dir), to_yaml(recipe), fingerprint(recipe),
                      [run_key(m.name, recipe.lr_of(m.name)) for m in methods], recipe.threads,
                      recipe.device)  # fmt: skip
    run_dir, done = setup.run_dir, setup.done
    data = load_data(recipe, methods)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.probe_sets.items())
    print(f"TemporalWiki: periods {data.periods}; documents {[len(d) for d in data.stream]}; probes {sizes}")

    ctx = Context(recipe, data, setup.device)
    for i, m in enumerate(methods, 1):
        key = run_key(m.name, recipe.lr_of(m.name))
        if key in done:
            print(f"[{i}/{len(methods)}] {key}: done earlier, kept")
            continue
        summary = run_method(ctx, m, recipe.lr_of(m.name), _stage_logger(run_dir, key))
        summary["fingerprint"] = setup.fingerprint
        write_json_atomic(run_dir / "runs" / f"{key}.json", summary)
        done[key] = summary
        print(f"[{i}/{len(methods)}] {key}: done ({summary['seconds']:.0f} s)", flush=True)

    results = {
        "benchmark": "temporalwiki",
        "title": recipe.title or f"TemporalWiki on {recipe.target.path}",
        "machine": machine_description(),
        "stream": data.stream_label,
        "probe_rendering": data.probe_rendering,
        "periods": data.periods,
        "probe_sets": list(data.probe_sets),
        "data": data_description(recipe, data),
        "protocol": {
            **to_dict(recipe.protocol),
            "epochs_per_period": recipe.protocol.epochs,
            "lr": recipe.optim.lr,
            "batch_size": recipe.batching.batch_size,
        },  # fmt: skip
        "methods": {m.name: done[run_key(m.name, recipe.lr_of(m.name))] for m in methods},
        "seconds": time.perf_counter() - start,
    }
    results["seconds_all_runs"] = sum(s["seconds"] for s in results["methods"].values())
    write_json_atomic(run_dir / "results.json", results, sort_keys=False)
    return results


def data_description(recipe: EvalRecipe, data: TemporalWikiData) -> dict:
    tw = recipe.temporalwiki
    desc = {
        "kind": "temporalwiki",
        "source": recipe.data.dir,
        "probes": {k: len(v) for k, v in data.probe_sets.items()},
        "documents": dict(zip(data.periods, (len(d) for d in data.stream))),
        "probe_limit": tw.probe_limit,
        "train_limit": tw.train_limit,
    }
    if data.pools:
        desc["rehearsal"] = data.pool_label
        desc["rehearsal_pool"] = dict(zip(data.periods, (len(p) for p in data.pools)))
    return desc
