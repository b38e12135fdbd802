"""What every report draws with: markdown tables, a stable style per method, Agg figures saved atomically.

Figures are made without pyplot (no global state, no GUI backend), so reports render inside any process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckl_toolkit.core.io import atomic_file, write_text_atomic

DPI = 120

# Up to 12 methods stay distinguishable: a colour *and* a marker each (tab10 plus two).
COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#7b4173",
)  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")

RC = {  # every text on a figure >= 9 pt
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 12,
}


def cell(text: Any) -> str:
    """A table cell: pipes would split the cell, newlines would end the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l/r), left by default."""
    align = align.ljust(len(headers), "l")
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def style(i: int) -> dict:
    """Colour, marker and line style of the i-th method, stable across all plots of a report."""
    return {
        "color": COLORS[i % len(COLORS)],
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": LINESTYLES[(i // len(COLORS)) % len(LINESTYLES)],
    }


def new_figure(width: float, height: float):
    """A pyplot-free Agg figure: no global state, no GUI backend, safe inside any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def write_text_shared(path: Path, text: str) -> Path:
    write_text_atomic(path, text)
    return path


def save_figure_atomic(fig, path: Path) -> Path:
    """Render to a temporary sibling and rename, so a reader never sees a half-written PNG."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def legend_outside(ax) -> None:
    """Legend right of the axes: with 12 methods it would hide the curves inside."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
