"""The nights of a TemporalWiki eval in a report: fact gain against its control, retention, the front.

A raw NLL drop on the trained facts is shown only beside its control (the same relation's facts
that were not trained), so a table cannot read "learned" where the model only learned the format.
"""

from __future__ import annotations

import math
from pathlib import Path

from ckl_toolkit.core.io import write_json_atomic
from ckl_toolkit.evaluation.plots import legend_outside, md_table, new_figure, rc, save_figure_atomic, style

NIGHT_UNITS = (
    "Fact gain = each trained fact's drop in object NLL (nats) minus the mean drop of untrained facts of the "
    "same relation (the control: what format and priors explain), on a wording the stream does not contain "
    "(reworded) and on the stream's own (verbatim); EM = the same with exact match. Retention = of the facts "
    "the base model answered exactly, the share it still answers exactly."
)


def _f(x: float | None, fmt: str = "{:+.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def night_rows(nights: dict[str, list[dict]]) -> list[list[str]]:
    """One row per run and night: fact gain (reworded, verbatim), raw drop beside its control, retention."""
    rows = []
    for key, stages in nights.items():
        for night in stages:
            rw, vb = night["fact_gain"]["reworded"], night["fact_gain"]["verbatim"]
            kept = night.get("retention", {})
            rows.append(
                [
                    key,
                    night["period"],
                    _f(rw["nats"]),
                    _f(100 * rw["em"], "{:+.1f}"),
                    _f(vb["nats"]),
                    f"{_f(rw['raw_nats'])} / {_f(rw['control_nats'])}",
                    f"{rw['matched']}/{rw['facts']}",
                    _f(100 * kept["share"], "{:.1f}") + f" ({kept['kept']}/{kept['known']})" if kept else "–",
                ]
            )
    return rows


def plot_tradeoff(tradeoff: dict, path: Path) -> Path:
    """Fact gain (reworded, nats) against retention (%): each run a point, each method's front a line."""
    with rc():
        fig = new_figure(8.0, 5.0)
        ax = fig.add_subplot(1, 1, 1)
        for i, (method, view) in enumerate(tradeoff.items()):
            look = style(i)
            xs = [100 * p["retention"] for p in view["points"]]
            ys = [p["fact_gain"] for p in view["points"]]
            ax.scatter(xs, ys, color=look["color"], marker=look["marker"], alpha=0.45, s=28)
            front = view["front"]
            ax.plot(
                [100 * p["retention"] for p in front],
                [p["fact_gain"] for p in front],
                color=look["color"],
                marker=look["marker"],
                linestyle=look["linestyle"],
                label=f"{method} (front of {len(xs)})",
            )
        ax.axvline(95, color="0.6", linestyle=":", linewidth=1)
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_xlabel("retention: known facts still answered exactly (%)")
        ax.set_ylabel("fact gain, reworded probes (nats)")
        ax.set_title("Fact gain against retention per night (each point: one lr x epochs)")
        legend_outside(ax)
        fig.tight_layout()
        return save_figure_atomic(fig, path)


def nights_section(results: dict, out_dir: Path) -> tuple[list[str], list[Path]]:
    """The report's markdown for the nights, and the files written beside it (plot, tradeoff.json)."""
    rows = night_rows(results.get("nights", {}))
    if not rows:
        return [], []
    headers = [
        "run",
        "night",
        "fact gain reworded (nats)",
        "EM (pts)",
        "verbatim (nats)",
        "raw drop / control (nats)",
        "facts with a control",
        "retention % (kept/known)",
    ]
    md = ["## Did the nights learn their facts? (fact gain against a control)", "", NIGHT_UNITS, ""]
    md += [md_table(headers, rows), ""]
    written = []
    tradeoff = results.get("tradeoff")
    if tradeoff:
        written.append(plot_tradeoff(tradeoff, out_dir / "tradeoff.png"))
        json_path = out_dir / "tradeoff.json"
        write_json_atomic(json_path, tradeoff, sort_keys=False)
        written.append(json_path)
        md += [
            "### Trade-off: fact gain against retention",
            "",
            "![fact gain vs retention](tradeoff.png)",
            "",
        ]
        front_rows = [
            [m, p["run"], f"{p['lr']:g}", p["epochs"], _f(p["fact_gain"]), _f(100 * p["retention"], "{:.1f}")]
            for m, view in tradeoff.items()
            for p in view["front"]
        ]
        md += ["Each method's front (no run of it has both more fact gain and more retention):", ""]
        md += [md_table(["method", "run", "lr", "epochs", "fact gain (nats)", "retention %"], front_rows), ""]
    return md, written
