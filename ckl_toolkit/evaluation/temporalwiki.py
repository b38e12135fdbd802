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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.io import read_jsonl
from ckl_toolkit.evaluation.config import EvalRecipe
from ckl_toolkit.evaluation.fact_gain import Night, build_night
from ckl_toolkit.evaluation.methods import Method
from ckl_toolkit.evaluation.probes import score_probes

TRIPLE_PROBE = "{subject} {relation} {object}"  # TemporalWiki's own rendering: the object is last
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


STREAM_TEMPLATE = "The {relation} of {subject} is {object}."  # the substitute stream (and the TA pairs)
REWORDED_TEMPLATE = "{subject} {relation} {object}"  # TemporalWiki's own wording: no stream sentence has it


def render_stream_sentence(triple: dict, template: str = STREAM_TEMPLATE) -> str:
    """A training sentence of the substitute stream (``ckl update`` renders triple rows the same way)."""
    return template.format(**triple)


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
    nights: list[Night] = field(default_factory=list)  # per period: its facts and their controls
    retention: list[dict] = field(default_factory=list)  # facts the model should keep (if known before)


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
        template = recipe.temporalwiki.stream_template
        stream.append([_stream_document(t, f"{period}/{i}", i + 1, template) for i, t in enumerate(triples)])
    label = (
        f"substitute: sentences rendered from each period's changed triples "
        f"('{recipe.temporalwiki.stream_template}', one "
        "document per triple"
        + (f", the first {limit} per period" if limit else "")
        + "); the changed probes are the same facts, so their raw NLL drop mixes learning the facts "
        "with learning how the stream reads: the fact gain against a relation-matched control "
        "separates the two"
    )
    return stream, label


def _stream_document(triple: dict, doc_id: str, line: int, template: str) -> Document:
    """A substitute training document; its object is kept so the oracle can weight it."""
    shard = doc_id.rsplit("/", 1)[0]
    text = render_stream_sentence(triple, template)
    return Document(doc_id, text, shard, line, {"object": triple["object"]})


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
        template = recipe.temporalwiki.stream_template
        texts = [render_stream_sentence(t, template) for t in kept]
        older = [Document(f"{name}/{i}", text, name, i + 1) for i, text in enumerate(texts)]
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
    if not tw.documents:  # the substitute stream's facts are known: score each night against a control
        data.nights = load_nights(recipe)
    if tw.retention:
        data.retention = load_retention(tw.retention, recipe.protocol.probe_field)
    return data


def load_nights(recipe: EvalRecipe) -> list[Night]:
    """Per period: the triples its stream teaches and, as controls, unchanged facts of the same relations."""
    tw, nights = recipe.temporalwiki, []
    for period in tw.periods:
        facts = read_triples(_period_file(recipe, period, "changed"))
        facts = facts[: tw.train_limit] if tw.train_limit else facts
        candidates = read_triples(_period_file(recipe, period, "unchanged"))
        nights.append(build_night(period, facts, candidates, tw.control_per_relation,
                                  tw.stream_template, tw.reworded_template))  # fmt: skip
    return nights


def load_retention(path: str, probe_field: str, field: str = "temporalwiki.retention") -> list[dict]:
    """Facts with a probe and an object (e.g. the LAMA-ckl invariant facts); retention scores them exactly."""
    if not Path(path).exists():
        raise ConfigError(f"{field}: {path} not found (empty: no retention set)")
    rows = read_jsonl(path, required=("object", probe_field))
    return [r for r in rows if r["object"] in r[probe_field]]


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
