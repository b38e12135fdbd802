"""Facts the base already knows, kept apart from an evaluation's: the retention term's probes.

``ckl data known-facts`` scores candidate facts (LAMA-ckl-style rows: a probe sentence that ends with
its object) with the base model and keeps the ones it completes exactly — what a nightly update
should not break. Meta-training reads them as ``data.retain`` (``meta.retain_weight``): after each
inner step φ also sees the loss of a few of them, so it learns what a step costs the model's knowledge.

A fact an evaluation measures retention on must not be one φ was trained to protect: every
candidate whose ``uuid`` or ``subject`` occurs in an ``--exclude`` file is dropped before scoring
(for LAMA-ckl: 425 facts of ``invariant_schematic.jsonl`` share no uuid or subject with
``invariant_descriptive.jsonl``, the retention set of the TemporalWiki evaluation).

Written (atomically): ``{task, object, subject, relation, uuid}`` rows, the probe as ``task``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckl_toolkit.evaluation.not_to_forget import select_known

KEYS = ("uuid", "subject")  # what makes a candidate the same fact as an excluded one


def drop_excluded(rows: Sequence[dict], exclude: Sequence[dict]) -> list[dict]:
    """The rows sharing no ``uuid`` and no ``subject`` with ``exclude``."""
    seen = {(k, r[k]) for r in exclude for k in KEYS if r.get(k)}
    return [r for r in rows if not any((k, r[k]) in seen for k in KEYS if r.get(k))]


def candidates(rows: Sequence[dict], exclude: Sequence[dict]) -> list[dict]:
    """The rows outside ``exclude``, each uuid once (file order)."""
    unique, uuids = [], set()
    for r in drop_excluded(rows, exclude):
        uuid = r.get("uuid")
        if not uuid or uuid not in uuids:
            unique.append(r)
            uuids.add(uuid)
    return unique


def known_facts(model, tokenizer, cands: Sequence[dict], probe_field: str) -> list[dict]:
    """The candidates (:func:`candidates`) whose ``probe_field`` probe the model completes with the
    exact object, as retention probes (file order)."""
    known = select_known(model, tokenizer, cands, probe_field)
    return [
        {
            "task": r[probe_field],
            "object": r["object"],
            "subject": r.get("subject", ""),
            "relation": r.get("relation_label", r.get("relation", "")),
            "uuid": r.get("uuid", ""),
        }
        for r in known
    ]
