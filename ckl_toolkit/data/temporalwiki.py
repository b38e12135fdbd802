"""Meta-training pairs for a TemporalWiki TA model (``ckl data temporalwiki``).

The paper meta-trains φ on the Aug→Sep 2021 diff and evaluates on later periods. The diff text is
hub-only, so each changed triple of ``0801-0901_changed.csv`` becomes one pair, as the documented
substitute stream renders it:

    text    "The {relation} of {subject} is {object}."     the document (what a nightly run learns)
    task    the LAMA template of the relation cut at its object, else "{subject} {relation} {object}"
            (``evaluation.temporalwiki.render_probe``): another wording, the object last

Disjoint from every evaluated period: a triple whose subject occurs in any ``{period}_changed`` or
``{period}_unchanged`` probe file of the directory is left out, so φ never sees an evaluated
subject. Pairs are split into meta-train and meta-val by a hash of the subject (a subject's triples
stay on one side). Files written into ``out`` (one atomic rename):

    meta_train.jsonl, meta_val.jsonl   {text, task, object, subject, relation, probe: "temporalwiki"}
    split.json                         source, sha256, counts, the rule in words, evaluated files
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.io import atomic_dir, write_json_atomic, write_jsonl_atomic
from ckl_toolkit.evaluation.temporalwiki import (
    load_templates,
    read_triples,
    render_probe,
    render_stream_sentence,
)

META_SOURCE = "0801-0901_changed.csv"


def _hash(text: str, seed: int) -> str:
    return hashlib.sha256(f"{text}:{seed}".encode()).hexdigest()


def evaluated_files(path: Path) -> list[Path]:
    """The probe files of the evaluated periods: every ``*_changed.jsonl`` and ``*_unchanged.jsonl``."""
    return sorted(path.glob("*_changed.jsonl")) + sorted(path.glob("*_unchanged.jsonl"))


def meta_pair(triple: dict, templates: dict[str, str]) -> dict:
    """One pair: the stream's sentence of the triple as document, the probe wording as task."""
    task = render_probe(triple, templates)
    return {
        "text": render_stream_sentence(triple),
        "task": task,
        "object": triple["object"],
        "subject": triple["subject"],
        "relation": triple["relation"],
        "probe": "temporalwiki",
    }


def prepare_temporalwiki(
    path: str | Path,
    out: str | Path,
    templates: str | Path | None,
    val_pairs: int = 64,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Write meta-train / meta-val pairs from the 0801-0901 changed triples; return split.json.

    Raises:
        ConfigError: a missing source or templates file, a bad row (file:line:field), or a non-empty
            ``out`` without ``force``; nothing is written then.
    """
    path, out = Path(path), Path(out)
    source = path / META_SOURCE
    if not source.is_file():
        raise ConfigError(
            f"--path: {path} has no {META_SOURCE} (the TemporalWiki Aug->Sep 2021 changed triples)"
        )
    if templates is not None and not Path(templates).is_file():
        raise ConfigError(f"--templates: {templates} not found (LAMA's relations.jsonl; omit for none)")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it")
    evaluated = evaluated_files(path)
    subjects = {t["subject"] for f in evaluated for t in read_triples(f)}
    triples, seen = [], set()
    for t in read_triples(source):
        key = (t["subject"], t["relation"], t["object"])
        if key not in seen:
            seen.add(key)
            triples.append(t)
    kept = [t for t in triples if t["subject"] not in subjects]
    rendering = load_templates(templates) if templates is not None else {}
    pairs = [meta_pair(t, rendering) for t in kept]
    pairs.sort(key=lambda p: (_hash(p["subject"], seed), p["relation"], p["object"]))
    val, train = _split_by_subject(pairs, val_pairs)
    info = {
        "source": str(source),
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "templates": str(templates) if templates is not None else None,
        "seed": seed,
        "counts": {
            "triples": len(triples),
            "dropped_evaluated_subject": len(triples) - len(kept),
            "meta_train": len(train),
            "meta_val": len(val),
        },
        "evaluated_files": [str(f) for f in evaluated],
        "rule": (
            f"one pair per distinct changed triple of {META_SOURCE}: document 'The {{relation}} of "
            "{subject} is {object}.', task = the relation's LAMA template cut at its object (else "
            "'subject relation object'); triples whose subject occurs in any evaluated probe file "
            f"({len(evaluated)} files) are left out; subjects ordered by sha256(subject:seed), the first "
            f"ones fill {val_pairs} meta-val pairs"
        ),
    }
    with atomic_dir(out) as tmp:
        write_jsonl_atomic(tmp / "meta_train.jsonl", train)
        write_jsonl_atomic(tmp / "meta_val.jsonl", val)
        write_json_atomic(tmp / "split.json", info)
    return info


def _split_by_subject(pairs: list[dict], val_pairs: int) -> tuple[list[dict], list[dict]]:
    """Whole subjects (consecutive: pairs are in subject-hash order) fill meta-val; the rest is meta-train."""
    val, train = [], []
    for p in pairs:
        if len(val) < val_pairs or (val and not train and p["subject"] == val[-1]["subject"]):
            val.append(p)
        else:
            train.append(p)
    return val, train
