"""Score served models on TemporalWiki-style probe sets: ``ckl score --model M --probes F ...``.

A probe file holds ``{subject, relation, object}`` rows (JSONL or CSV); each is rendered as in the
TemporalWiki protocol (``evaluation.temporalwiki.render_probe``: the relation's LAMA template cut at
its object, else "subject relation object", so the object ends the probe) and scored by
``score_probe_set``: mean object-token NLL in nats (lower: the model puts more probability on the
object), object-token accuracy, exact match, whole-probe perplexity. Several models are scored on the
same probes, so a published version can be compared with its base.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.evaluation.temporalwiki import load_templates, read_triples, render_probe, score_probe_set


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
