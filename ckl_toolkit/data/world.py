"""A synthetic knowledge world: fictional people, facts that change, documents that say so.

The world lets a small model trained from scratch show the paper's effect on a CPU. Every entity has
six facts: three time-invariant (birth city, birth year, native language) and three time-variant
(employer, occupation, residence), with objects drawn from closed pools of made-up, multi-token
names. Every relation has five paraphrase templates with the object last. For each fact one
template is held out of pretraining; probes use it, so a probe tests knowledge, not a memorised
sentence.

TO-LEARN facts are *changed* facts by default (``to_learn_mode="changed"``): pretraining states an
old value, the evidence states a new one. Measured on the quick world (lr 3e-4, 10 epochs, exact
match on the held-out probe), uniform fine-tuning reached 0.44 against the oracle's 0.72 in this
mode, but only 0.16 against 0.24 in ``"new"`` mode (no value pretrained): a fact the model never
stored is learnt from one phrasing as that phrasing and does not transfer to the probe's, so
there every method fails and nothing separates them.

Files written by :func:`write_world` (LAMA-ckl field names where the paper's release has them):
  pretrain.jsonl                 ``{"id", "text"}`` biography paragraphs, several passes
  to_learn.jsonl                 TO-LEARN: new values of time-variant facts, evidence + probes
  not_to_forget_candidates.jsonl invariant facts; NOT-TO-FORGET = those the base gets right
  meta_train.jsonl, meta_val.jsonl ``{"text", "task", "object", "subject", "relation"}`` pairs
                                 about entities disjoint from TO-LEARN's
  pretrain_facts.jsonl           every fact pretraining teaches, probed in a seen and the held-out template
  world.json                     the config and counts
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ckl_toolkit.core.io import write_json_atomic, write_jsonl_atomic

SYLLABLES = (
    "ka ro mi ve lu ta sen dor bri qua fen zol mar eth ti nav gol rin sha plo ud ber "
    "cai von tes li mu dra kel or fa gri hal pem sto yar zu bel cor dun"
).split()


@dataclass(frozen=True)
class Relation:
    """A relation: its LAMA code and label, object pool, and paraphrase templates (object last)."""

    code: str
    label: str
    pool: str
    invariant: bool
    templates: tuple[str, ...]


RELATIONS = (
    Relation("P19", "place of birth", "city", True, (
        "{s} was born in {o}", "The birthplace of {s} is {o}", "{s} is a native of {o}",
        "The city where {s} was born is {o}", "{s} first saw daylight in {o}")),
    Relation("P569", "year of birth", "year", True, (
        "{s} was born in the year {o}", "The birth year of {s} is {o}",
        "{s} came into the world in the year {o}", "The year of birth of {s} is {o}",
        "{s} has been alive since {o}")),
    Relation("P103", "native language", "language", True, (
        "The native language of {s} is {o}", "{s} grew up speaking {o}", "The mother tongue of {s} is {o}",
        "The first language of {s} is {o}", "As a child, {s} learned to speak {o}")),
    Relation("P108", "employer", "company", False, (
        "{s} works for {o}", "The employer of {s} is {o}", "{s} is employed by {o}",
        "{s} is on the staff of {o}", "Every weekday {s} goes to work at {o}")),
    Relation("P106", "occupation", "job", False, (
        "{s} works as a {o}", "The occupation of {s} is {o}", "By trade, {s} is a {o}",
        "{s} makes a living as a {o}", "The job of {s} is that of a {o}")),
    Relation("P551", "residence", "city", False, (
        "{s} lives in {o}", "The home of {s} is in {o}", "{s} resides in {o}",
        "{s} has a house in {o}", "These days {s} is living in {o}")),
)  # fmt: skip

# Neutral filler: no relation template, many random slots (high entropy), other people and cities.
FILLERS = (
    "{n} bought a {food} on {day}.",
    "The {place} in {c} looked {color} in {month}.",
    "{n} painted a {thing} {color}.",
    "It rained in {c} for {num} days.",
    "{n} met {n2} at the {place}.",
    "A {adj} {thing} stood by the {place} of {c}.",
    "In {month}, {n} lost {num} {thing}s.",
    "Nobody in {c} liked the {adj} {food}.",
    "{n} walked to the {place} on {day}.",
    "The {thing}s of {c} are {color}.",
    "{n} told a story about a {adj} {thing}.",
    "On {day}, the {place} in {c} was {adj}.",
)
WORDS = {
    "day": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "month": "January February March April May June July August September October November December".split(),
    "food": "pie soup loaf pear stew cake melon tart broth plum".split(),
    "place": "harbour market bridge station library square chapel orchard tower mill".split(),
    "adj": "strange quiet bright heavy narrow faded gentle crooked hollow restless".split(),
    "thing": "lantern kite barrel wagon umbrella ladder bell basket kettle drum".split(),
    "color": "brown grey crimson pale green violet golden dusty silver".split(),
    "num": [str(i) for i in range(2, 13)],
}
JOB_HEADS = "glass river salt clock lamp cloud stone rope moss copper wind tide".split()
JOB_TAILS = "carver keeper surveyor binder weaver tuner mender warden".split()
COMPANY_TAILS = "Labs Works Systems Foundry Group Mills Press Traders".split()
LANGUAGE_TAILS = "ish ese ic an i".split()


@dataclass
class WorldConfig:
    """Settings of a synthetic world; the same config and seed give byte-identical files."""

    seed: int = 0  # drives every random choice
    n_entities: int = 500  # fictional people, each with one fact per relation
    to_learn: int = 200  # TO-LEARN facts (one changed time-variant fact per entity)
    meta_pairs: int = 800  # meta-training pairs (about entities disjoint from TO-LEARN's)
    meta_val_pairs: int = 100  # meta-validation pairs (entities disjoint from both)
    nf_candidates: int = 600  # invariant facts offered as NOT-TO-FORGET candidates
    filler_sentences: int = 12  # neutral filler sentences per evidence document (~13 tokens each)
    known_restatements: int = 2  # restated known facts per evidence document (half about the subject)
    same_relation: bool = False  # restatements: other people's known facts in the new fact's relation
    distractors: int = 0  # new (changed-looking) facts about other people per evidence document
    pretrain_passes: int = 80  # paragraphs per entity, each freshly drawn (~1 epoch of pretraining)
    to_learn_mode: str = "changed"  # "changed": pretraining holds an old value; "new": it holds none
    n_cities: int = 60  # pool sizes of the made-up objects
    n_companies: int = 60
    n_languages: int = 20
    n_jobs: int = 25
    n_years: int = 60  # birth years 1930 ... 1930 + n_years - 1

    def __post_init__(self) -> None:
        for name in ("n_entities", "to_learn", "meta_pairs", "meta_val_pairs", "pretrain_passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"world.{name}={getattr(self, name)}: must be >= 1")
        for name in ("filler_sentences", "known_restatements", "nf_candidates", "distractors"):
            if getattr(self, name) < 0:
                raise ValueError(f"world.{name}={getattr(self, name)}: must be >= 0")
        for name in ("n_cities", "n_companies", "n_languages", "n_jobs", "n_years"):
            if getattr(self, name) < 2:
                raise ValueError(f"world.{name}={getattr(self, name)}: a pool needs >= 2 objects")
        if self.n_jobs > len(JOB_HEADS) * len(JOB_TAILS):
            raise ValueError(f"world.n_jobs={self.n_jobs}: at most {len(JOB_HEADS) * len(JOB_TAILS)}")
        if self.to_learn_mode not in ("changed", "new"):
            raise ValueError(f"world.to_learn_mode={self.to_learn_mode!r}: must be 'changed' or 'new'")
        need = self.to_learn + _val_entities(self) + 1
        if need > self.n_entities:
            raise ValueError(
                f"world.n_entities={self.n_entities}: needs >= {need} (one per TO-LEARN fact, "
                f"meta_val_pairs/3 for meta-validation, >= 1 for meta-training)"
            )

    @classmethod
    def default(cls, seed: int = 0) -> WorldConfig:
        """The demo world: 500 people, 200 TO-LEARN facts, ~200-token evidence documents."""
        return cls(seed=seed)

    @classmethod
    def hard(cls, seed: int = 0) -> WorldConfig:
        """The quick world with evidence where position and form give the new fact away less: one
        filler sentence, 8 restated known facts in the new fact's own relation (other people's), and
        2 distractor new facts about other people. A TA that cannot tell new from known falls here."""
        return replace(
            cls.quick(seed), filler_sentences=1, known_restatements=8, same_relation=True, distractors=2
        )

    @classmethod
    def quick(cls, seed: int = 0) -> WorldConfig:
        """A small world whose whole demo fits about two minutes on 2 CPU cores."""
        return cls(
            seed=seed, n_entities=100, to_learn=50, meta_pairs=200, meta_val_pairs=30, nf_candidates=200,
            filler_sentences=6, known_restatements=2, pretrain_passes=80,
            n_cities=30, n_companies=30, n_languages=12, n_jobs=15, n_years=30,
        )  # fmt: skip


def _val_entities(cfg: WorldConfig) -> int:
    return math.ceil(cfg.meta_val_pairs / sum(not r.invariant for r in RELATIONS))


@dataclass
class World:
    """Everything :func:`write_world` writes, as Python objects."""

    config: WorldConfig
    pretrain: list[dict]
    to_learn: list[dict]
    nf_candidates: list[dict]
    meta_train: list[dict]
    meta_val: list[dict]
    facts: list[dict]  # every pretraining fact, with a seen-template and the held-out probe

    def info(self) -> dict:
        counts = {k: len(getattr(self, k)) for k in ("pretrain", "to_learn", "nf_candidates")}
        counts.update(meta_train=len(self.meta_train), meta_val=len(self.meta_val), facts=len(self.facts))
        relations = [{"code": r.code, "label": r.label, "invariant": r.invariant} for r in RELATIONS]
        return {"config": asdict(self.config), "counts": counts, "relations": relations}


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


def _unique(rng: random.Random, n: int, make) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out[make()] = None
    return list(out)


def _pools(rng: random.Random, cfg: WorldConfig) -> dict[str, list[str]]:
    jobs = [f"{h} {t}" for h in JOB_HEADS for t in JOB_TAILS]
    rng.shuffle(jobs)
    return {
        "city": _unique(rng, cfg.n_cities, lambda: _word(rng, 2, 3)),
        "company": _unique(rng, cfg.n_companies, lambda: f"{_word(rng, 2, 2)} {rng.choice(COMPANY_TAILS)}"),
        "language": _unique(rng, cfg.n_languages, lambda: _word(rng, 2, 2) + rng.choice(LANGUAGE_TAILS)),
        "job": jobs[: cfg.n_jobs],
        "year": [str(1930 + i) for i in range(cfg.n_years)],
    }


def _names(rng: random.Random, n: int) -> list[str]:
    return _unique(rng, n, lambda: f"{_word(rng, 2, 3)} {_word(rng, 2, 3)}")


def _filler(rng: random.Random, names: list[str], cities: list[str]) -> str:
    slots = {k: rng.choice(v) for k, v in WORDS.items()}
    n, n2 = rng.sample(names, 2)
    c, c2 = rng.sample(cities, 2)
    return rng.choice(FILLERS).format(n=n, n2=n2, c=c, c2=c2, **slots)


class _Builder:
    """The world's fixed state (people, facts, held-out templates, changes) and its sentence makers.

    Structure draws from ``self.rng``; sentence makers take the stream to draw from, so the
    pretraining corpus (its own stream) does not change when evidence settings do.
    """

    def __init__(self, cfg: WorldConfig):
        self.cfg, self.rng = cfg, random.Random(f"{cfg.seed}:world")
        self.pools = _pools(self.rng, cfg)
        self.names = _names(self.rng, cfg.n_entities)
        self.rel = {r.code: r for r in RELATIONS}
        # (entity, code) -> pretraining object and the index of the template held out for probes
        self.facts = {(e, r.code): self.rng.choice(self.pools[r.pool]) for e in self.names for r in RELATIONS}
        self.held = {k: self.rng.randrange(len(self.rel[k[1]].templates)) for k in self.facts}
        self.changed: dict[tuple[str, str], str] = {}  # (entity, code) -> new object

    def change(self, key: tuple[str, str]) -> None:
        pool = self.pools[self.rel[key[1]].pool]
        self.changed[key] = self.rng.choice([o for o in pool if o != self.facts[key]])

    def sentence(self, rng: random.Random, key: tuple[str, str], obj: str) -> str:
        """The fact in a random template other than its held-out (probe) one."""
        templates = self.rel[key[1]].templates
        i = rng.choice([i for i in range(len(templates)) if i != self.held[key]])
        return templates[i].format(s=key[0], o=obj) + "."

    def probe(self, key: tuple[str, str], obj: str) -> str:
        return self.rel[key[1]].templates[self.held[key]].format(s=key[0], o=obj)

    def biography(self, rng: random.Random, entity: str) -> str:
        """The entity's pretrained facts in random order and templates, plus one filler sentence."""
        keys = [(entity, r.code) for r in RELATIONS]
        if self.cfg.to_learn_mode == "new":
            keys = [k for k in keys if k not in self.changed]
        sents = [self.sentence(rng, k, self.facts[k]) for k in keys]
        rng.shuffle(sents)
        sents.insert(rng.randint(0, len(sents)), _filler(rng, self.names, self.pools["city"]))
        return " ".join(sents)

    def restatement(self, rng: random.Random, entity: str, not_code: str) -> str:
        """A known (pretrained, unchanged) fact of ``entity``, other than relation ``not_code``."""
        keys = [(entity, r.code) for r in RELATIONS if r.code != not_code]
        key = rng.choice([k for k in keys if k not in self.changed])
        return self.sentence(rng, key, self.facts[key])

    def same_relation_restatement(self, rng: random.Random, key: tuple[str, str]) -> str:
        """Another person's known (unchanged) fact in relation ``key[1]``: the same form as the new fact."""
        while True:
            other = (rng.choice(self.names), key[1])
            if other[0] != key[0] and other not in self.changed:
                return self.sentence(rng, other, self.facts[other])

    def distractor(self, rng: random.Random, key: tuple[str, str]) -> tuple[str, str, str]:
        """A new fact about another person (an object they were never pretrained with): new, not asked.

        Returns (sentence, its new object, its relation code)."""
        other = (rng.choice([n for n in self.names if n != key[0]]), rng.choice(list(self.rel)))
        pool = self.pools[self.rel[other[1]].pool]
        obj = rng.choice([o for o in pool if o != self.facts[other]])
        return self.sentence(rng, other, obj), obj, other[1]

    def evidence(self, rng: random.Random, key: tuple[str, str], new: str) -> str:
        """The new fact among filler sentences, restatements of known facts and distractors."""
        return self.evidence_and_new_objects(rng, key, new)[0]

    def evidence_and_new_objects(
        self, rng: random.Random, key: tuple[str, str], new: str
    ) -> tuple[str, list[str], list[str]]:
        """The evidence text, every new object in it (the asked fact's first, then the distractors'), and
        the new objects stated in the asked fact's relation (the asked one first): the distractors that
        nothing in the document tells from the asked fact."""
        sents = [_filler(rng, self.names, self.pools["city"]) for _ in range(self.cfg.filler_sentences)]
        for i in range(self.cfg.known_restatements):
            if self.cfg.same_relation:
                sents.append(self.same_relation_restatement(rng, key))
                continue
            other = key[0] if i % 2 == 0 else rng.choice(self.names)  # half about the subject itself
            sents.append(self.restatement(rng, other, key[1]))
        distractors = [self.distractor(rng, key) for _ in range(self.cfg.distractors)]
        sents += [sentence for sentence, _, _ in distractors]
        rng.shuffle(sents)
        sents.insert(rng.randint(0, len(sents)), self.sentence(rng, key, new))
        same_relation = [new] + [obj for _, obj, code in distractors if code == key[1]]
        return " ".join(sents), [new] + [obj for _, obj, _ in distractors], same_relation

    def lama_row(self, rng: random.Random, key: tuple[str, str], obj: str, evidence: str) -> dict:
        rel = self.rel[key[1]]
        schematic = f"Guess the object. \n  subject is {key[0]} , relation is {rel.label} , object is {obj}"
        return {
            "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "subject": key[0],
            "relation_code": rel.code,
            "relation_label": rel.label,
            "object": obj,
            "evidence": evidence,
            "task_descriptive": self.probe(key, obj),
            "task_schematic": schematic,
            "invariant": rel.invariant,
        }

    def pair(self, rng: random.Random, key: tuple[str, str]) -> dict:
        """A meta-training pair: the evidence of a changed fact and its probe."""
        new = self.changed[key]
        row = {"text": self.evidence(rng, key, new), "task": self.probe(key, new), "object": new}
        return row | {"subject": key[0], "relation": key[1]}


def _split(b: _Builder) -> tuple[list, list, list, list[str]]:
    """Pick and change the facts: TO-LEARN, meta-train and meta-val keys over disjoint entities."""
    order = list(b.names)
    b.rng.shuffle(order)
    n_tl, n_val = b.cfg.to_learn, _val_entities(b.cfg)
    variant = [r.code for r in RELATIONS if not r.invariant]
    tl_keys = [(e, b.rng.choice(variant)) for e in order[:n_tl]]
    val_keys = [(e, c) for e in order[n_tl : n_tl + n_val] for c in variant]
    meta_keys = [(e, c) for e in order[n_tl + n_val :] for c in variant]
    b.rng.shuffle(val_keys)
    b.rng.shuffle(meta_keys)
    for k in tl_keys + meta_keys + val_keys:
        b.change(k)
    return tl_keys, meta_keys, val_keys, order[n_tl:]


def _pretrain_docs(b: _Builder, rng: random.Random) -> list[dict]:
    """``pretrain_passes`` biographies per entity; each pass in a new order with new template draws."""
    order, docs = list(b.names), []
    for p in range(b.cfg.pretrain_passes):
        rng.shuffle(order)
        docs += [{"id": f"bio-{p}-{i}", "text": b.biography(rng, e)} for i, e in enumerate(order)]
    return docs


def _fact_rows(b: _Builder, rng: random.Random) -> list[dict]:
    """What pretraining teaches: each fact with a probe in a seen template and in the held-out one."""
    rows = []
    for key, obj in b.facts.items():
        if b.cfg.to_learn_mode == "new" and key in b.changed:
            continue
        seen = b.sentence(rng, key, obj)[:-1]  # drop the final period: the object ends the probe
        rows.append({"subject": key[0], "relation_code": key[1], "object": obj, "probe_seen": seen,
                     "probe_heldout": b.probe(key, obj)})  # fmt: skip
    return rows


def build_world(cfg: WorldConfig) -> World:
    """Draw the whole world from ``cfg.seed``: deterministic, no file I/O.

    Three random streams: the world's structure, the documents (evidence, meta pairs), and the
    pretraining corpus. In "changed" mode the corpus depends only on the entities and pools, so
    changing evidence settings (filler, restatements, counts) keeps a cached base model valid.
    """
    b = _Builder(cfg)
    tl_keys, meta_keys, val_keys, others = _split(b)
    docs = random.Random(f"{cfg.seed}:documents")
    meta_train = [b.pair(docs, meta_keys[i % len(meta_keys)]) for i in range(cfg.meta_pairs)]
    meta_val = [b.pair(docs, val_keys[i % len(val_keys)]) for i in range(cfg.meta_val_pairs)]
    to_learn = []
    for k in tl_keys:
        evidence, new_objects, same_relation = b.evidence_and_new_objects(docs, k, b.changed[k])
        to_learn.append(b.lama_row(docs, k, b.changed[k], evidence))
        if cfg.distractors:  # what weighers that cannot know which new fact is asked could at best mark:
            to_learn[-1]["new_objects"] = new_objects  # knowing new from known
            to_learn[-1]["new_objects_same_relation"] = same_relation  # and reading the relation too
    nf_keys = [(e, r.code) for e in others for r in RELATIONS if r.invariant]
    nf_keys = docs.sample(nf_keys, min(cfg.nf_candidates, len(nf_keys)))
    nf = [b.lama_row(docs, k, b.facts[k], b.sentence(docs, k, b.facts[k])) for k in nf_keys]
    pre = random.Random(f"{cfg.seed}:pretrain")
    pretrain, facts = _pretrain_docs(b, pre), _fact_rows(b, pre)
    return World(cfg, pretrain, to_learn, nf, meta_train, meta_val, facts)


def write_world(world: World, out_dir: str | Path) -> Path:
    """Write the world's files (each atomically) into ``out_dir`` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "pretrain.jsonl", world.pretrain)
    write_jsonl_atomic(out / "to_learn.jsonl", world.to_learn)
    write_jsonl_atomic(out / "not_to_forget_candidates.jsonl", world.nf_candidates)
    write_jsonl_atomic(out / "meta_train.jsonl", world.meta_train)
    write_jsonl_atomic(out / "meta_val.jsonl", world.meta_val)
    write_jsonl_atomic(out / "pretrain_facts.jsonl", world.facts)
    write_json_atomic(out / "world.json", world.info())
    return out
