"""Operating on published versions: list them with their gate results, roll ``current`` back.

    ckl versions runs/update            every version: served?, documents, gate verdict, why rejected
    ckl rollback runs/update            serve the newest version older than current that is not rejected
    ckl rollback runs/update --to v3    serve v3 (--force: even one the gate or a rollback rejected)

A rollback marks every version newer than its target rejected (``rolled_back_to``), so no later
update adopts them again, then moves ``current`` like a publish does; each step is recorded in
``rollback.json`` first, so a rollback killed anywhere is finished by the next rollback or update
(``contract.finish_rollback``). The next update continues from the served version's ledger: the
rolled-back versions' documents are unseen again and are learned afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.nightly.contract import (
    GATE_REPORT,
    REJECTED,
    ROLLBACK,
    VERSION_DIR,
    RunLock,
    current_version,
    fault_point,
    finish_rollback,
    gate_verdict,
    is_rejected,
    list_versions,
    reconcile,
)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def version_rows(output_dir: str | Path) -> list[dict]:
    """One row per version, oldest first: what ``ckl versions`` prints."""
    out = Path(output_dir)
    served = current_version(out)
    rows = []
    for v in list_versions(out):
        meta, gate, rejected = _read(v / "version.json"), _read(v / GATE_REPORT), _read(v / REJECTED)
        rows.append(
            {
                "version": v.name,
                "current": served is not None and v.name == served.name,
                "created": meta.get("created"),
                "base_version": meta.get("base_version"),
                "documents": meta.get("documents"),
                "gate": gate_verdict(v) or "-",
                "gate_failed": gate.get("failed", []),
                "failing_probes": len(gate.get("failing_probes", [])),
                "rejected": rejected.get("reason") if (v / REJECTED).exists() else None,
                "rejected_detail": rejected.get("detail"),
            }
        )
    return rows


def versions_table(rows: list[dict]) -> str:
    lines = [
        "| | version | created | built on | documents | gate | rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gate = r["gate"] + (
            f" ({', '.join(r['gate_failed'])}; {r['failing_probes']} probes)" if r["gate_failed"] else ""
        )
        rejected = f"{r['rejected']}: {r['rejected_detail']}" if r["rejected"] else ""
        lines.append(
            f"| {'*' if r['current'] else ''} | {r['version']} | {r['created']} | "
            f"{r['base_version'] or 'base'} | {r['documents']} | {gate} | {rejected} |"
        )
    return "\n".join(lines) + "\n(* = served by `current`)\n"


def _version(out: Path, spec: str) -> Path:
    name = f"v{int(spec.lstrip('v')):06d}" if spec.lstrip("v").isdigit() else spec
    path = out / "versions" / name
    if not VERSION_DIR.match(name) or not path.is_dir():
        known = ", ".join(v.name for v in list_versions(out)) or "none"
        raise ConfigError(f"--to: {spec} is not a version in {out}/versions (known: {known})")
    return path


def rollback(
    output_dir: str | Path, to: str | None = None, force: bool = False
) -> tuple[Path | None, Path, str]:
    """Serve an earlier (or, with ``to``, any) version; returns (previously served, now served, note).

    Without ``to``, a rollback that was killed half-way is finished rather than a second one started.

    Raises:
        LockedError: an update or another rollback holds the output directory.
        ConfigError: no such version, nothing older to roll back to, or a rejected target without force.
    """
    out = Path(output_dir)
    with RunLock(out):
        pending = (out / ROLLBACK).exists()
        before = current_version(out)
        served = reconcile(out)  # finishes a killed publish or rollback first
        if pending and to is None:
            return before, served, "finished a rollback that was interrupted"
        if served is None:
            raise ConfigError(f"{out}: no version is served; nothing to roll back")
        if to is None:
            older = [v for v in list_versions(out) if v.name < served.name and not is_rejected(v)]
            if not older:
                raise ConfigError(
                    f"{out}: no version older than {served.name} that is not rejected (ckl versions)"
                )
            target = older[-1]
        else:
            target = _version(out, to)
        if target.name == served.name:
            return served, served, "already served"
        if is_rejected(target) and not force:
            why = _read(target / REJECTED)
            raise ConfigError(
                f"--to: {target.name} was rejected ({why.get('reason')}: {why.get('detail')}); "
                "pass --force to serve it anyway"
            )
        write_json_atomic(out / ROLLBACK, {"from": served.name, "to": target.name, "force": force})
        fault_point("rollback_planned")
        finish_rollback(out)
        return served, target, "rolled back" if target.name < served.name else "rolled forward"
