"""Did a night learn its facts, or only their format? Fact gain against a control, and retention.

On real text an update lowers the loss of facts it never saw nearly as much as of the ones it
trained on: it learns how the stream's sentences read and which objects a relation tends to take.
So a night is scored against a control:

    Δ(probe)       = NLL before − NLL after, in nats on the object's tokens (> 0: the model improved)
    control Δ_r    = mean Δ over probes of facts NOT in the stream with the same relation r
    fact gain      = mean over the night's facts i with a control of  Δ_i − Δ_{r(i)}
    fact gain (EM) = the same with exact match (after − before) instead of Δ

measured on a phrasing the stream does not contain ("reworded"), and beside it on the stream's own
phrasing ("verbatim"); both are templates of the recipe (``temporalwiki.stream_template``,
``temporalwiki.reworded_template``). Retention counts only facts the model answered exactly before the night:
the share it still answers exactly after it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from ckl_toolkit.evaluation.probes import score_probes


def render(triple: dict, template: str) -> str:
    """A probe of ``triple`` in ``template``; the object is its last word, so teacher forcing scores it."""
    return template.format(**triple)


def probe_template(template: str) -> str:
    """A sentence template as a probe: its trailing full stop dropped, so the object ends the probe."""
    probe = template.rstrip().removesuffix(".").rstrip()
    if not probe.endswith("{object}"):
        raise ValueError(f"template {template!r}: the object must end it, so teacher forcing scores it")
    return probe


@dataclass
class ProbeResults:
    """Per-probe scores of one model on one probe set, aligned with its triples."""

    nll: list[float]  # mean object-token NLL in nats (NaN: object not found)
    exact: list[bool]


@dataclass
class FactGain:
    """A night's fact gain on one phrasing (nats and exact match), and what it was computed from."""

    nats: float  # mean of Δ_i − Δ_r(i) over the facts with a control
    em: float  # the same with exact-match changes (a fraction)
    raw_nats: float  # mean Δ over the night's facts with a control (what raw tables show)
    control_nats: float  # mean Δ_r(i) over those facts (the part format and priors explain)
    matched: int  # facts with a control
    facts: int  # facts scored

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _deltas(before: ProbeResults, after: ProbeResults) -> tuple[list[float], list[float]]:
    nll = [b - a for b, a in zip(before.nll, after.nll)]
    em = [float(a) - float(b) for b, a in zip(before.exact, after.exact)]
    return nll, em


def fact_gain(
    facts: Sequence[dict],
    before: ProbeResults,
    after: ProbeResults,
    controls: Sequence[dict],
    control_before: ProbeResults,
    control_after: ProbeResults,
) -> FactGain:
    """The night's fact gain: each fact's improvement minus its relation's control improvement.

    Args:
        facts: the night's triples ({subject, relation, object}), aligned with ``before``/``after``.
        before, after: the model's scores on them before and after the night.
        controls: triples of facts not in the night's stream, aligned with ``control_*``.
        control_before, control_after: the model's scores on the controls.

    Returns:
        FactGain over the facts whose relation has at least one scorable control (a probe whose
        object was not found, NaN, counts for neither side).
    """
    ctl_nll, ctl_em = _deltas(control_before, control_after)
    by_relation: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, dn, de in zip(controls, ctl_nll, ctl_em):
        if not math.isnan(dn):
            by_relation[t["relation"]].append((dn, de))
    control = {r: (_mean([d for d, _ in v]), _mean([e for _, e in v])) for r, v in by_relation.items()}
    nll, em = _deltas(before, after)
    rows = [
        (dn, de, *control[t["relation"]])
        for t, dn, de in zip(facts, nll, em)
        if t["relation"] in control and not math.isnan(dn)
    ]
    return FactGain(
        nats=_mean([dn - cn for dn, _, cn, _ in rows]),
        em=_mean([de - ce for _, de, _, ce in rows]),
        raw_nats=_mean([dn for dn, _, _, _ in rows]),
        control_nats=_mean([cn for _, _, cn, _ in rows]),
        matched=len(rows),
        facts=len(facts),
    )


@dataclass
class Retention:
    """Of the facts the model answered exactly before, how many it still answers exactly."""

    known: int
    kept: int

    @property
    def share(self) -> float:
        return self.kept / self.known if self.known else math.nan

    def to_dict(self) -> dict:
        return {"known": self.known, "kept": self.kept, "share": self.share}


def retention(before_exact: Sequence[bool], after_exact: Sequence[bool]) -> Retention:
    """Only facts answered exactly before count; a fact learned during the night is not 'kept'."""
    known = [i for i, ok in enumerate(before_exact) if ok]
    return Retention(len(known), sum(bool(after_exact[i]) for i in known))


def control_set(facts: Sequence[dict], candidates: Sequence[dict], per_relation: int) -> list[dict]:
    """Up to ``per_relation`` candidates of each relation the night's facts have, none of them a night fact.

    A control fact must not be in the stream: candidates equal to a night fact (same subject and
    relation) are left out. Order is the candidates' file order, so the set is reproducible.
    """
    wanted = {t["relation"] for t in facts}
    night = {(t["subject"], t["relation"]) for t in facts}
    taken: dict[str, int] = defaultdict(int)
    out = []
    for t in candidates:
        r = t["relation"]
        if r in wanted and (t["subject"], r) not in night and taken[r] < per_relation:
            taken[r] += 1
            out.append(t)
    return out


def pareto_front(points: Sequence[dict], x: str, y: str) -> list[dict]:
    """The points not dominated on (x, y), both higher-is-better, sorted by x."""
    front = []
    for p in points:
        dominated = any(
            q[x] >= p[x] and q[y] >= p[y] and (q[x] > p[x] or q[y] > p[y]) for q in points if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p[x])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# Scoring a model on a night's facts and controls, and on the facts it should keep.


@dataclass
class Night:
    """A night's facts (what its stream teaches), their controls (same relations, not taught), and the
    phrasings they are probed in (name -> probe template: "verbatim" the stream's, "reworded" another)."""

    name: str
    facts: list[dict]
    controls: list[dict]
    phrasings: dict[str, str]


def build_night(
    name: str,
    facts: list[dict],
    candidates: Sequence[dict],
    per_relation: int,
    stream_template: str,
    reworded_template: str,
) -> Night:
    """A night from the triples it teaches: controls drawn from ``candidates`` (``control_set``), and
    the stream's wording ("verbatim") and another ("reworded") as probe templates.

    Raises ValueError when a template does not end with its object."""
    phrasings = {"verbatim": probe_template(stream_template), "reworded": probe_template(reworded_template)}
    return Night(name, facts, control_set(facts, candidates, per_relation), phrasings)


NightScores = dict[str, tuple[ProbeResults, ProbeResults]]  # phrasing -> (facts, controls)


def score_triples(model, tokenizer, triples: Sequence[dict], template: str, batch_size: int) -> ProbeResults:
    """Per-probe object NLL and exact match of ``triples`` rendered with ``template``."""
    probes = [render(t, template) for t in triples]
    s = score_probes(model, tokenizer, probes, [t["object"] for t in triples], batch_size, max_length=256)
    return ProbeResults(s.object_nll, s.exact)


def score_night(model, tokenizer, night: Night, batch_size: int) -> NightScores:
    """The model's scores on the night's facts and controls, in every phrasing."""
    return {
        name: (
            score_triples(model, tokenizer, night.facts, template, batch_size),
            score_triples(model, tokenizer, night.controls, template, batch_size),
        )
        for name, template in night.phrasings.items()
    }


def night_gains(night: Night, before: NightScores, after: NightScores) -> dict[str, dict]:
    """Per phrasing, the night's FactGain (as a dict) from the scores before and after it."""
    out = {}
    for name in night.phrasings:
        (facts_before, controls_before), (facts_after, controls_after) = before[name], after[name]
        gain = fact_gain(
            night.facts, facts_before, facts_after, night.controls, controls_before, controls_after
        )
        out[name] = gain.to_dict()
    return out


def score_known(model, tokenizer, rows: Sequence[dict], probe_field: str, batch_size: int) -> list[bool]:
    """Exact match of each fact's ``probe_field`` probe (the retention set is scored this way)."""
    s = score_probes(
        model, tokenizer, [r[probe_field] for r in rows], [r["object"] for r in rows], batch_size
    )
    return s.exact
