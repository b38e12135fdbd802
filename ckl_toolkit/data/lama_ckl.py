"""Split the paper's LAMA-ckl release into evaluation and meta-training files (``ckl data lama-ckl``).

Why a split: the paper's Train-Attention training pools were never published, so the TA model is
meta-trained here on part of ``variant.jsonl`` and evaluated on the rest. That is only honest if φ
never sees an evaluated fact's answer, so meta facts sharing a subject (and by default an object)
with an evaluated fact are dropped, or (``split="grouped"``) facts linked that way are kept on the
same side. The source files are read from the given path and never copied into the project.

Files written into the output directory (one atomic rename for the whole directory):
  to_learn.jsonl       the evaluated TO-LEARN facts, rows as in ``variant.jsonl``
  meta_train.jsonl,    ``{"text", "task", "object", "subject", "relation", "uuid", "probe"}`` pairs
  meta_val.jsonl       (ARCHITECTURE.md §5) from the variant facts that are not evaluated
  nf_candidates.jsonl  the unique invariant facts of both invariant files (deduplicated by uuid);
                       NOT-TO-FORGET is re-selected from them per model (``evaluation.not_to_forget``)
  rehearsal.jsonl      ``{"id", "text", "uuid"}``: invariant evidence for mix-review; the evaluator
                       removes the rows of the selected NOT-TO-FORGET facts by ``uuid``
  split.json           options, counts, uuids per split, the rule in words, source paths + sha256
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.io import (
    JsonlError,
    atomic_dir,
    parse_json_object,
    write_json_atomic,
    write_jsonl_atomic,
)

VARIANT = "variant.jsonl"
INVARIANT = {"descriptive": "invariant_descriptive.jsonl", "schematic": "invariant_schematic.jsonl"}
CORE_FIELDS = ("uuid", "subject", "relation_code", "relation_label", "object", "evidence")
PROBE_FIELDS = {"descriptive": "task_descriptive", "schematic": "task_schematic"}
META_PROBES = ("descriptive", "schematic", "both")
SPLITS = ("hash", "grouped")
DISJOINT = ("subject-object", "subject")
# Fields on which two invariant files must agree for the same uuid.
IDENTITY_FIELDS = ("subject", "relation_code", "object")


@dataclass
class Fact:
    """One source row and where it came from (for error messages that name file and line)."""

    row: dict
    where: str  # "path:line"

    @property
    def uuid(self) -> str:
        return self.row["uuid"]


@dataclass
class Split:
    """The variant facts on each side of the split, in hash order."""

    evaluated: list[Fact]
    meta_val: list[Fact]
    meta_train: list[Fact]
    dropped: list[Fact] = field(default_factory=list)  # shared a subject/object with an evaluated fact
    unused: list[Fact] = field(default_factory=list)  # beyond --meta-facts


# ---------------------------------------------------------------------------------------------
# Reading and checking


def _check_row(row: dict, where: str, required: Iterable[str]) -> None:
    """Each required field must be a non-empty string; every probe present must contain the object."""
    for name in required:
        if name not in row:
            raise ConfigError(f"{where}: missing field '{name}'")
        if not isinstance(row[name], str) or not row[name].strip():
            raise ConfigError(f"{where}: field '{name}' must be a non-empty string, got {row[name]!r}")
    for name in PROBE_FIELDS.values():
        if name in row and (not isinstance(row[name], str) or row["object"] not in row[name]):
            # The outer loss and the evaluation score the object's last occurrence in the probe.
            raise ConfigError(f"{where}: field '{name}' does not contain the object {row['object']!r}")


def read_facts(path: Path, required: tuple[str, ...]) -> list[Fact]:
    """Read a LAMA-ckl JSONL file; any problem is a ConfigError naming file, line and field."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = parse_json_object(line)
            except JsonlError as e:
                raise ConfigError(f"{where}: {e}") from None
            _check_row(row, where, required)
            if row["uuid"] in seen:
                raise ConfigError(f"{where}: field 'uuid' {row['uuid']!r} repeats {seen[row['uuid']]}")
            seen[row["uuid"]] = where
            facts.append(Fact(row, where))
    if not facts:
        raise ConfigError(f"{path}: no rows")
    return facts


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merge_invariant(by_probe: dict[str, list[Fact]]) -> list[dict]:
    """Unique invariant facts by uuid, in file order; fields missing in one file are taken from the other.

    Each row gets ``nf_sources``: the probe styles whose file listed it (the paper's NOT-TO-FORGET
    set for descriptive probes is the descriptive file, for schematic probes the schematic one).
    """
    merged: dict[str, dict] = {}
    where: dict[str, str] = {}
    for probe, facts in by_probe.items():
        for fact in facts:
            old = merged.get(fact.uuid)
            if old is None:
                merged[fact.uuid] = dict(fact.row) | {"nf_sources": [probe]}
                where[fact.uuid] = fact.where
                continue
            for name in IDENTITY_FIELDS:
                if old[name] != fact.row[name]:
                    raise ConfigError(
                        f"{fact.where}: field '{name}' {fact.row[name]!r} differs from {old[name]!r} "
                        f"at {where[fact.uuid]} for the same uuid"
                    )
            merged[fact.uuid] = fact.row | old | {"nf_sources": old["nf_sources"] + [probe]}
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
# The split


def hash_key(uuid: str, seed: int) -> str:
    """Order key: stable across Python versions, platforms and file order (unlike random.shuffle)."""
    return hashlib.sha256(f"{uuid}:{seed}".encode()).hexdigest()


def _keys(row: dict, disjoint: str) -> list[str]:
    keys = [f"subject:{row['subject']}"]
    return keys + [f"object:{row['object']}"] if disjoint == "subject-object" else keys


def _components(facts: list[Fact], disjoint: str, seed: int) -> list[list[Fact]]:
    """Facts linked through a shared subject (or object), as groups ordered by a hash of their uuids.

    Ordering groups by their first fact would favour big groups (many members, early first fact)
    and fill the evaluated set with the most frequent objects ("jazz"); a hash of the whole group
    is blind to its size.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for fact in facts:
        keys = _keys(fact.row, disjoint)
        for k in keys[1:]:
            parent[find(k)] = find(keys[0])
    groups: dict[str, list[Fact]] = {}
    for fact in facts:  # facts are in hash order, and so are the members of each group
        groups.setdefault(find(_keys(fact.row, disjoint)[0]), []).append(fact)
    return sorted(groups.values(), key=lambda g: hash_key("|".join(sorted(f.uuid for f in g)), seed))


def _fill(groups: list[list[Fact]], n: int) -> tuple[list[Fact], list[list[Fact]]]:
    """Take whole groups, in order, while they fit into ``n`` facts; return them and the groups left."""
    taken: list[Fact] = []
    left: list[list[Fact]] = []
    for g in groups:
        if len(taken) + len(g) <= n:
            taken += g
        else:
            left.append(g)
    return taken, left


def _split_hash(ordered: list[Fact], n_eval: int, n_val: int, disjoint: str, seed: int) -> Split:
    """First ``n_eval`` evaluated; of the rest, drop facts linked to an evaluated one; then val, train."""
    evaluated, rest = ordered[:n_eval], ordered[n_eval:]
    taken = {k for f in evaluated for k in _keys(f.row, disjoint)}
    kept = [f for f in rest if not taken.intersection(_keys(f.row, disjoint))]
    dropped = [f for f in rest if taken.intersection(_keys(f.row, disjoint))]
    return Split(evaluated, kept[:n_val], kept[n_val:], dropped)


def _split_grouped(ordered: list[Fact], n_eval: int, n_val: int, disjoint: str, seed: int) -> Split:
    """Whole linked groups go to one side, so nothing is dropped; counts are at most the asked ones."""
    evaluated, left = _fill(_components(ordered, disjoint, seed), n_eval)
    meta_val, left = _fill(left, n_val)
    meta_train = [f for g in left for f in g]
    rank = {id(f): i for i, f in enumerate(ordered)}
    return Split(*(sorted(part, key=lambda f: rank[id(f)]) for part in (evaluated, meta_val, meta_train)))


def split_variant(
    facts: list[Fact],
    eval_facts: int,
    val_facts: int,
    seed: int,
    split: str = "hash",
    disjoint: str = "subject-object",
    meta_facts: int | None = None,
) -> Split:
    """Deterministic split of the variant facts by sha256(uuid:seed) order (see module doc)."""
    if eval_facts < 1 or val_facts < 0 or eval_facts + val_facts >= len(facts):
        raise ConfigError(
            f"--eval-facts {eval_facts} / --val-facts {val_facts}: need eval >= 1, val >= 0 and "
            f"eval + val < {len(facts)} variant facts"
        )
    ordered = sorted(facts, key=lambda f: hash_key(f.uuid, seed))
    parts = (_split_hash if split == "hash" else _split_grouped)(
        ordered, eval_facts, val_facts, disjoint, seed
    )
    if meta_facts is not None:
        parts.unused, parts.meta_train = parts.meta_train[meta_facts:], parts.meta_train[:meta_facts]
    if not parts.meta_train:
        raise ConfigError(
            f"no meta-train facts left ({len(parts.dropped)} dropped as linked to evaluated facts); "
            "lower --eval-facts / --val-facts or use --split grouped"
        )
    return parts


def meta_pairs(facts: list[Fact], meta_probe: str) -> list[dict]:
    """TA meta-training pairs: the evidence as the document, a probe as the task (ARCHITECTURE.md §5)."""
    probes = ("descriptive", "schematic") if meta_probe == "both" else (meta_probe,)
    pairs = []
    for fact in facts:
        r = fact.row
        for probe in probes:
            pairs.append(
                {
                    "text": r["evidence"],
                    "task": r[PROBE_FIELDS[probe]],
                    "object": r["object"],
                    "subject": r["subject"],
                    "relation": r["relation_label"],
                    "uuid": r["uuid"],
                    "probe": probe,
                }
            )
    return pairs


def rehearsal_rows(nf_rows: list[dict]) -> list[dict]:
    """The invariant evidence as a mix-review pool; ``uuid`` lets the evaluator drop NF facts."""
    return [{"id": f"lama-inv-{r['uuid']}", "text": r["evidence"], "uuid": r["uuid"]} for r in nf_rows]


def _rule(split: str, disjoint: str, seed: int, s: Split, n_eval: int, n_val: int) -> str:
    link = "a subject or an object" if disjoint == "subject-object" else "a subject"
    head = f"variant facts ordered by sha256('<uuid>:{seed}'); "
    if split == "hash":
        return head + (
            f"first {n_eval} evaluated; of the rest, facts sharing {link} with an evaluated fact are "
            f"dropped ({len(s.dropped)}); of those kept, first {n_val} meta-val, the rest meta-train"
        )
    return (
        f"variant facts sharing {link} are grouped (transitively); groups ordered by "
        f"sha256('<sorted uuids joined by |>:{seed}'); whole groups go to the evaluated set while they "
        f"fit in {n_eval}, then to meta-val while they fit in {n_val}; the other groups are meta-train "
        f"(nothing dropped); facts within each split in sha256('<uuid>:{seed}') order"
    )


# ---------------------------------------------------------------------------------------------
# Putting it together


def prepare_lama_ckl(
    path: str | Path,
    out: str | Path,
    eval_facts: int = 250,
    val_facts: int = 25,
    seed: int = 0,
    meta_probe: str = "both",
    split: str = "hash",
    disjoint: str = "subject-object",
    meta_facts: int | None = None,
    force: bool = False,
) -> dict:
    """Read the release at ``path``, write the split into ``out``; return split.json's content.

    Raises:
        ConfigError: a bad option, a non-empty ``out`` without ``force``, or a bad row (naming file,
            line and field); nothing is written then.
    """
    for name, value, allowed in (
        ("--meta-probe", meta_probe, META_PROBES),
        ("--split", split, SPLITS),
        ("--disjoint", disjoint, DISJOINT),
    ):
        if value not in allowed:
            raise ConfigError(f"{name} {value!r}: must be one of {list(allowed)}")
    path, out = Path(path), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it")
    both = CORE_FIELDS + tuple(PROBE_FIELDS.values())
    variant = read_facts(path / VARIANT, both)
    invariant = {p: read_facts(path / f, CORE_FIELDS + (PROBE_FIELDS[p],)) for p, f in INVARIANT.items()}
    parts = split_variant(variant, eval_facts, val_facts, seed, split, disjoint, meta_facts)
    nf = merge_invariant(invariant)
    info = _split_info(path, parts, nf, invariant, eval_facts, val_facts, seed, meta_probe, split, disjoint)
    with atomic_dir(out) as tmp:
        write_jsonl_atomic(tmp / "to_learn.jsonl", [f.row for f in parts.evaluated])
        write_jsonl_atomic(tmp / "meta_train.jsonl", meta_pairs(parts.meta_train, meta_probe))
        write_jsonl_atomic(tmp / "meta_val.jsonl", meta_pairs(parts.meta_val, meta_probe))
        write_jsonl_atomic(tmp / "nf_candidates.jsonl", nf)
        write_jsonl_atomic(tmp / "rehearsal.jsonl", rehearsal_rows(nf))
        write_json_atomic(tmp / "split.json", info)
    return info


def _split_info(path, parts, nf, invariant, n_eval, n_val, seed, meta_probe, split, disjoint) -> dict:
    uuids = {
        name: [f.uuid for f in getattr(parts, name)]
        for name in ("evaluated", "meta_val", "meta_train", "dropped", "unused")
    }
    per_fact = 2 if meta_probe == "both" else 1
    files = [path / VARIANT] + [path / f for f in INVARIANT.values()]
    return {
        "seed": seed,
        "options": {
            "eval_facts": n_eval,
            "val_facts": n_val,
            "meta_probe": meta_probe,
            "split": split,
            "disjoint": disjoint,
        },
        "rule": _rule(split, disjoint, seed, parts, n_eval, n_val),
        "counts": {name: len(v) for name, v in uuids.items()}
        | {
            "meta_train_pairs": per_fact * len(parts.meta_train),
            "meta_val_pairs": per_fact * len(parts.meta_val),
            "nf_candidates": len(nf),
            "nf_in_both_files": sum(len(r["nf_sources"]) == 2 for r in nf),
        }
        | {f"invariant_{p}": len(v) for p, v in invariant.items()},
        "uuids": uuids,
        "sources": {f.name: {"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files},
    }
