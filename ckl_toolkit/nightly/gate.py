"""The nightly quality gate: score a candidate version against the served one before ``current`` moves.

    canaries   NOT-TO-FORGET probes: facts the served model completes exactly must stay completed
    to_learn   TO-LEARN probes of the night's documents (optional): enough of them must be learned
    heldout    general held-out text (optional): its perplexity must not rise too much

Each check compares the candidate with the *served* model (or ``target.path`` on the first night),
both loaded from disk exactly as a server would load them (``nightly.export.load_model``). The
verdict and every failing probe go into the candidate's ``gate.json`` and ``gate.md``; a failed gate
leaves the candidate marked rejected and ``current`` where it was (exit 8, docs/ARCHITECTURE.md §8).

A probe file is JSONL, one fact per line: ``{"probe": "...", "object": "..."}`` (the object must
occur in the probe; its last occurrence is scored; ``gate.probe_field`` names another field, e.g.
LAMA-ckl's ``task_descriptive``) or ``{"subject", "relation", "object"}`` (probed as "subject
relation object"); an ``id`` (or ``uuid``) field names the fact in the report (else ``file:line``).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ckl_toolkit.core.config import ConfigError, fld, require
from ckl_toolkit.core.io import JsonlError, parse_json_object, write_json_atomic, write_text_atomic
from ckl_toolkit.core.losses import LOSS_CHUNK_TOKENS, target_mask, token_nll
from ckl_toolkit.core.text import encode
from ckl_toolkit.evaluation.probes import score_probes


@dataclass
class GateSpec:
    canaries: str | None = fld(
        None,
        "NOT-TO-FORGET probes (JSONL: {probe, object} or {subject, relation, object}, optional id): "
        "facts the served model must keep. Any gate file set turns the gate on.",
    )
    to_learn: str | None = fld(
        None, "TO-LEARN probes of the night's documents (same format), for min_learned."
    )
    heldout: str | None = fld(
        None, "Held-out general text for perplexity: JSONL with a 'text' field, or plain text (a line each)."
    )
    max_canary_drop: float = fld(
        0.0,
        "Largest fraction of the canaries the served model completes exactly that the candidate may lose.",
    )
    max_ppl_rise: float = fld(0.05, "Largest relative rise of held-out perplexity, ppl_new / ppl_served − 1.")
    min_learned: float = fld(
        0.0, "Smallest fraction of the TO-LEARN probes the candidate must complete exactly."
    )
    max_length: int = fld(128, "Tokens per probe or held-out document (longer ones are truncated).")
    batch_size: int = fld(32, "Probes or documents per forward.")
    max_heldout: int = fld(500, "Held-out documents scored (the first ones; 0: all).")
    probe_field: str = fld(
        "probe", "The probe files' probe field (LAMA-ckl / `ckl data synth` rows: task_descriptive)."
    )

    def __post_init__(self):
        require(0.0 <= self.max_canary_drop <= 1.0, "max_canary_drop", "must be in [0, 1]")
        require(self.max_ppl_rise >= 0, "max_ppl_rise", "must be >= 0")
        require(0.0 <= self.min_learned <= 1.0, "min_learned", "must be in [0, 1]")
        require(self.max_length >= 2, "max_length", "must be >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.max_heldout >= 0, "max_heldout", "must be >= 0")

    @property
    def enabled(self) -> bool:
        return any((self.canaries, self.to_learn, self.heldout))

    def build(self) -> Gate:
        """The gate with its probes and text read (bad files fail here, naming file:line and field)."""
        canaries = load_probes(self.canaries, "gate.canaries", self.probe_field) if self.canaries else []
        to_learn = load_probes(self.to_learn, "gate.to_learn", self.probe_field) if self.to_learn else []
        heldout = load_texts(self.heldout, "gate.heldout", self.max_heldout) if self.heldout else []
        return Gate(self, canaries, to_learn, heldout)


def _read_lines(path: str, field: str) -> list[tuple[int, str]]:
    if not Path(path).is_file():
        raise ConfigError(f"{field}: {path} not found")
    with open(path, encoding="utf-8") as f:
        return [(i, line) for i, line in enumerate(f, start=1) if line.strip()]


def load_probes(path: str, field: str, probe_field: str = "probe") -> list[dict]:
    """Rows {id, probe, object} of a probe file (the probe read from ``probe_field``; ids from id or uuid).

    Raises:
        ConfigError: naming ``field``, file:line and what is wrong with the row.
    """
    probes = []
    for line, text in _read_lines(path, field):
        where = f"{field}: {path}:{line}"
        try:
            row = parse_json_object(text)
        except JsonlError as e:
            raise ConfigError(f"{where}: {e}") from None
        obj = row.get("object")
        if not isinstance(obj, str) or not obj.strip():
            raise ConfigError(f"{where}: field 'object' is missing or empty")
        if probe_field in row:
            probe = row[probe_field]
            if not isinstance(probe, str) or obj not in probe:
                raise ConfigError(
                    f"{where}: field '{probe_field}' must be a string that contains the object {obj!r}"
                )
        elif all(isinstance(row.get(k), str) and row[k].strip() for k in ("subject", "relation")):
            probe = f"{row['subject']} {row['relation']} {obj}"
        else:
            raise ConfigError(f"{where}: needs '{probe_field}', or 'subject' and 'relation' (with 'object')")
        name = row.get("id", row.get("uuid", f"{Path(path).name}:{line}"))
        probes.append({"id": str(name), "probe": probe, "object": obj})
    if not probes:
        raise ConfigError(f"{field}: {path} holds no probes")
    return probes


def load_texts(path: str, field: str, limit: int) -> list[str]:
    """Held-out documents: JSONL rows' ``text`` (a ``.jsonl`` file), else one document per line."""
    rows = _read_lines(path, field)
    if path.endswith((".jsonl", ".ndjson")):
        texts = []
        for line, text in rows:
            try:
                row = parse_json_object(text)
            except JsonlError as e:
                raise ConfigError(f"{field}: {path}:{line}: {e}") from None
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ConfigError(f"{field}: {path}:{line}: field 'text' is missing or empty")
            texts.append(row["text"])
    else:
        texts = [text.rstrip("\n") for _, text in rows]
    if not texts:
        raise ConfigError(f"{field}: {path} holds no text")
    return texts[:limit] if limit else texts


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> tuple[float, int]:
    """(Σ NLL in nats, number of target tokens) of ``texts`` under ``model`` (each truncated)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[i : i + batch_size], max_length).to(device)
        nll = token_nll(model, enc.input_ids, enc.attention_mask, None, LOSS_CHUNK_TOKENS)  # (B, T-1)
        total += float(nll.sum())
        tokens += int(target_mask(enc.attention_mask).sum())
    return total, tokens


@dataclass
class Gate:
    spec: GateSpec
    canaries: list[dict]
    to_learn: list[dict]
    heldout: list[str]

    def score(self, model, tokenizer) -> dict:
        """One model's scores: exact match per canary and per TO-LEARN probe, held-out NLL."""
        s = self.spec

        def exact(rows: list[dict]) -> list[bool]:
            if not rows:
                return []
            probes, objects = [r["probe"] for r in rows], [r["object"] for r in rows]
            return score_probes(model, tokenizer, probes, objects, s.batch_size, s.max_length).exact

        nll, tokens = (
            text_nll(model, tokenizer, self.heldout, s.max_length, s.batch_size) if self.heldout else (0.0, 0)
        )
        return {
            "canaries": exact(self.canaries),
            "to_learn": exact(self.to_learn),
            "nll": nll,
            "tokens": tokens,
        }

    def evaluate(self, candidate: Path, baseline: str | Path, dtype: str = "float32") -> dict:
        """Score the served model (``baseline``) and the ``candidate`` version; return the report."""
        from ckl_toolkit.nightly.export import load_model  # loads peft / K-Adapter only when needed

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        scores = {}
        for name, path in (("before", baseline), ("after", candidate)):
            model, tokenizer, what = load_model(path, dtype)
            scores[name] = self.score(model.to(device), tokenizer)
            scores[name]["model"] = what
            del model
            gc.collect()
        return self.report(scores["before"], scores["after"], candidate.name, str(baseline))

    def report(self, before: dict, after: dict, candidate: str, baseline: str) -> dict:
        """The verdict from two models' scores: each check, its value and limit, the failing probes."""
        s, checks = self.spec, []
        report: dict = {
            "candidate": candidate,
            "baseline": baseline,
            "models": [before["model"], after["model"]],
        }
        if self.canaries:
            known = [i for i, ok in enumerate(before["canaries"]) if ok]
            forgotten = [self.canaries[i] for i in known if not after["canaries"][i]]
            drop = len(forgotten) / len(known) if known else 0.0
            report["canaries"] = {
                "n": len(self.canaries),
                "known_before": len(known),
                "known_after": sum(after["canaries"]),
                "forgotten": forgotten,
            }
            note = f"{len(forgotten)} of the {len(known)} canaries the served model knew are forgotten"
            if not known:
                note = "the served model completes none of the canaries: nothing to forget (check the file)"
            checks.append(_check("canaries", drop, s.max_canary_drop, drop <= s.max_canary_drop, note, "<="))
        if self.to_learn:
            learned = sum(after["to_learn"])
            frac = learned / len(self.to_learn)
            missing = [p for p, ok in zip(self.to_learn, after["to_learn"]) if not ok]
            report["to_learn"] = {
                "n": len(self.to_learn),
                "learned_before": sum(before["to_learn"]),
                "learned_after": learned,
                "not_learned": missing,
            }
            note = f"{learned} of {len(self.to_learn)} TO-LEARN probes completed exactly"
            checks.append(_check("to_learn", frac, s.min_learned, frac >= s.min_learned, note, ">="))
        if self.heldout:
            ppl = [_ppl(x["nll"], x["tokens"]) for x in (before, after)]
            rise = ppl[1] / ppl[0] - 1 if math.isfinite(ppl[0]) and ppl[0] > 0 else math.nan
            report["heldout"] = {
                "documents": len(self.heldout),
                "tokens": after["tokens"],
                "ppl_before": ppl[0],
                "ppl_after": ppl[1],
                "rise": rise,
            }
            note = f"perplexity {ppl[0]:.4g} -> {ppl[1]:.4g}"
            checks.append(_check("heldout_ppl", rise, s.max_ppl_rise, rise <= s.max_ppl_rise, note, "<="))
        report["checks"] = checks
        report["failed"] = [c["name"] for c in checks if not c["passed"]]
        report["passed"] = not report["failed"]
        report["failing_probes"] = [p["id"] for p in report.get("canaries", {}).get("forgotten", [])] + [
            p["id"]
            for p in report.get("to_learn", {}).get("not_learned", [])
            if "to_learn" in report["failed"]
        ]
        return report


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(min(nll / tokens, 700.0)) if tokens and math.isfinite(nll) else math.nan


def _check(name: str, value: float, limit: float, passed: bool, note: str, op: str) -> dict:
    """One check; a NaN value (non-finite weights, say) never passes."""
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "op": op,
        "passed": bool(passed and math.isfinite(value)),
        "detail": note,
    }


def write_report(version: Path, report: dict) -> None:
    """``gate.json`` and ``gate.md`` into the version (atomically each)."""
    write_text_atomic(version / "gate.md", report_markdown(report))
    write_json_atomic(version / "gate.json", json.loads(json.dumps(report, default=str)))


def report_markdown(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED (" + ", ".join(report["failed"]) + ")"
    lines = [
        f"# Quality gate of {report['candidate']}: {verdict}",
        "",
        f"Compared with the served model: {report['models'][0]}",
        "",
        "| check | value | limit | passed | detail |",
        "|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        lines.append(
            f"| {c['name']} | {c['value']:.4g} | {c['op']} {c['limit']:g} | "
            f"{'yes' if c['passed'] else '**no**'} | {c['detail']} |"
        )
    for title, key, sub in (
        ("Forgotten canaries", "canaries", "forgotten"),
        ("TO-LEARN probes not learned", "to_learn", "not_learned"),
    ):
        rows = report.get(key, {}).get(sub, [])
        if rows:
            lines += ["", f"## {title} ({len(rows)})", ""]
            lines += [f"- `{p['id']}`: {p['probe']} (object: {p['object']})" for p in rows[:200]]
    return "\n".join(lines) + "\n"
