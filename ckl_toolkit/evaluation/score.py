"""Score served models on TemporalWiki-style probe sets: ``ckl score --model M --probes F ...``.

A probe file holds ``{subject, relation, object}`` rows (JSONL or CSV); each is rendered as in the
TemporalWiki protocol (``evaluation.temporalwiki.render_probe``: the relation's LAMA template cut at
its object, else "subject relation object", so the object ends the probe) and scored by
``score_probe_set``: mean object-token NLL in nats (lower: the model puts more probability on the
object), object-token accuracy, exact match, whole-probe perplexity. Several models are scored on the
same probes, so a published version can be compared with its base.

``ckl fact-gain`` asks the question a raw NLL drop cannot answer: did the night learn its facts, or
only how they read? It scores the night's facts against controls of the same relations and the facts
the base answered exactly (``evaluation.fact_gain``), for a published version against its base.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.evaluation.fact_gain import (
    Night,
    build_night,
    night_gains,
    retention,
    score_known,
    score_night,
)
from ckl_toolkit.evaluation.temporalwiki import (
    REWORDED_TEMPLATE,
    STREAM_TEMPLATE,
    load_templates,
    read_triples,
    render_probe,
    score_probe_set,
)


def load_probe_file(path: str | Path, templates: dict[str, str], limit: int = 0) -> list[dict]:
    """The first ``limit`` triples of a probe file (0: all), each with its rendered ``probe``."""
    if not Path(path).is_file():
        raise ConfigError(f"--probes: {path} not found")
    triples = read_triples(path)
    triples = triples[:limit] if limit else triples
    return [{**t, "probe": render_probe(t, templates)} for t in triples]


def score_model(
    model: torch.nn.Module, tokenizer, probe_sets: dict[str, list[dict]], batch_size: int = 64
) -> dict:
    """probe set name -> {nll, acc, em, ppl, n} of one model (``temporalwiki.score_probe_set``)."""
    return {
        name: score_probe_set(
            model, tokenizer, [r["probe"] for r in rows], [r["object"] for r in rows], batch_size
        )
        for name, rows in probe_sets.items()
    }


def load_probe_sets(probes: list[str], templates: str | None = None, limit: int = 0) -> dict[str, list[dict]]:
    """File stem -> rendered probes of each probe file (the first ``limit`` rows; 0: all).

    Args:
        probes: probe files ({subject, relation, object} rows, JSONL or CSV).
        templates: LAMA relations.jsonl for the probe wording (None: "subject relation object").
        limit: rows per file.
    """
    if templates is not None and not Path(templates).is_file():
        raise ConfigError(f"--templates: {templates} not found")
    rendering = load_templates(templates) if templates else {}
    return {
        Path(p).name.removesuffix(".jsonl").removesuffix(".csv"): load_probe_file(p, rendering, limit)
        for p in probes
    }


def score_result(probe_sets: dict[str, list[dict]], templates: str | None, limit: int) -> dict:
    """The JSON ``ckl score`` writes, before any model: the probe sets and the units."""
    return {
        "probes": {name: len(rows) for name, rows in probe_sets.items()},
        "templates": templates,
        "limit": limit,
        "unit": "nll: mean object-token NLL in nats (lower is better); acc: object-token accuracy; "
        "em: exact match",
        "models": {},
    }


def score_table(result: dict) -> str:
    """A markdown table: a row per model, NLL / accuracy per probe set, NLL change from the first model."""
    names = list(result["probes"])
    header = "| model | " + " | ".join(f"{n} NLL (n={result['probes'][n]}) | {n} acc" for n in names) + " |"
    rows = [header, "|" + "---|" * (1 + 2 * len(names))]
    first = None
    for path, entry in result["models"].items():
        cells = []
        for n in names:
            c = entry["scores"][n]
            delta = ""
            if first is not None and not math.isnan(c["nll"]):
                delta = f" ({c['nll'] - first[n]['nll']:+.3f})"
            cells += [f"{c['nll']:.3f}{delta}", f"{100 * c['acc']:.1f}%"]
        first = first or entry["scores"]
        rows.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n(NLL in nats, lower is better; in brackets the change from the first model)\n"


# ---------------------------------------------------------------------------------------------
# ``ckl fact-gain``: did a published night learn its facts? (evaluation.fact_gain)


def load_night(
    facts_path: str,
    controls_path: str,
    limit: int = 0,
    per_relation: int = 3,
    stream_template: str = STREAM_TEMPLATE,
    reworded_template: str = REWORDED_TEMPLATE,
) -> Night:
    """The night's facts (the first ``limit`` triples of the stream's source; 0: all) and their controls.

    Controls: up to ``per_relation`` triples of ``controls_path`` per relation of the facts, none of
    them a night fact (``fact_gain.control_set``), e.g. the period's unchanged facts.
    """
    for flag, path in (("--facts", facts_path), ("--controls", controls_path)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag}: {path} not found")
    facts = read_triples(facts_path)
    facts = facts[:limit] if limit else facts
    try:
        return build_night(Path(facts_path).name, facts, read_triples(controls_path), per_relation,
                           stream_template, reworded_template)  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"--stream-template / --reworded-template: {e}") from None


def fact_gain_result(
    night: Night,
    models: list[tuple[str, torch.nn.Module, object]],
    retention_rows: list[dict] | None = None,
    probe_field: str = "task_descriptive",
    batch_size: int = 64,
) -> dict:
    """Fact gain (per phrasing) and retention of every model after the first, against the first.

    Args:
        night: the facts the later models were trained on, their controls and phrasings.
        models: (name, model, tokenizer); the first is the model before the night.
        retention_rows: facts with a ``probe_field`` probe and an object; only those the first model
            answers exactly count (``fact_gain.retention``). None: no retention.

    Models are scored one at a time, so the caller may load them lazily (an iterator works).
    """
    result = {
        "night": night.name,
        "facts": len(night.facts),
        "controls": len(night.controls),
        "phrasings": night.phrasings,
        "retention_facts": len(retention_rows) if retention_rows is not None else None,
        "models": {},
    }
    before = known = None
    for name, model, tokenizer in models:
        scores = score_night(model, tokenizer, night, batch_size)
        exact = (
            score_known(model, tokenizer, retention_rows, probe_field, batch_size) if retention_rows else None
        )
        if before is None:
            before, known = scores, exact
            result["before"] = name
            continue
        entry = {"fact_gain": night_gains(night, before, scores)}
        if exact is not None:
            entry["retention"] = retention(known, exact).to_dict()
        result["models"][name] = entry
    return result


def fact_gain_table(result: dict) -> str:
    """A markdown row per model after the night: fact gain reworded / verbatim, raw / control, retention."""
    rows = [
        "| model | fact gain, reworded (nats) | EM | raw / control drop (nats) | fact gain, verbatim "
        "| retention |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in result["models"].items():
        r, v = e["fact_gain"]["reworded"], e["fact_gain"]["verbatim"]
        kept = e.get("retention")
        keep = f"{100 * kept['share']:.1f}% ({kept['kept']}/{kept['known']})" if kept else "-"
        rows.append(
            f"| {name} | {r['nats']:+.2f} | {100 * r['em']:+.1f} | {r['raw_nats']:+.2f} / "
            f"{r['control_nats']:+.2f} | {v['nats']:+.2f} | {keep} |"
        )
    return "\n".join(rows)
