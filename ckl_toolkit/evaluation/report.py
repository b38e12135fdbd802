"""Turn a run's ``results.json`` into a markdown report and PNG plots (``ckl report RUN_DIR``).

The report is what a researcher reads after ``ckl eval``: the paper-style LAMA-ckl table (accuracies
printed x100, as the paper does) or the TemporalWiki stage x probe-set matrices, with the data,
protocol and machine spelled out so a table never travels without its context. Every output is
written atomically, so a report that is being regenerated is never seen half-written.

matplotlib is imported inside the plotting functions only: ``ckl --help`` must not pay for it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ckl_toolkit.evaluation.nights_report import nights_section
from ckl_toolkit.evaluation.plots import legend_outside as _legend_outside
from ckl_toolkit.evaluation.plots import (
    md_table,
    save_figure_atomic,
    write_text_shared,
)
from ckl_toolkit.evaluation.plots import new_figure as _new_figure
from ckl_toolkit.evaluation.plots import rc as _rc
from ckl_toolkit.evaluation.plots import style as _style

RESULTS = "results.json"
MAX_WIDTH_IN = 16.0  # heatmap panels wrap onto more rows beyond this figure width
METRICS = ("acc", "em")


SUMMARY_NUMBERS = ("top_acc", "epoch", "nf_acc", "total", "top_em", "em_epoch", "nf_em")
CURVES = ("to_learn", "to_learn_em", "not_to_forget", "not_to_forget_em")
METRIC_LABELS = {
    "top_acc": "Top Acc",
    "nf_acc": "NF Acc",
    "total": "Total Knowledge",
    "top_em": "Top EM",
    "nf_em": "NF EM",
}
NO_VALUE = "–"


# ----------------------------------------------------------------------------- loading and validation


class ResultsError(ValueError):
    """results.json cannot be read or is malformed; the message names the file and, for a bad field,
    its JSON path (the checks below raise it with the JSON path alone; ``load_results`` adds the file)."""


def _is_number(x: Any, finite: bool = True) -> bool:
    """A JSON number (not a bool); NLL and perplexity may legitimately be inf, accuracies may not."""
    return isinstance(x, int | float) and not isinstance(x, bool) and (not finite or math.isfinite(x))


_KIND_WORDS = {
    "number": "a finite number",
    "real": "a number",
    "int": "an integer",
    "str": "a string",
    "dict": "a non-empty object",
    "list": "a non-empty list",
    "numbers": "a list of numbers",
}


def _require(obj: Any, key: str, where: str, kind: str = "number") -> Any:
    """Fetch ``obj[key]`` and check its kind, so rendering code can trust the structure."""
    if not isinstance(obj, dict) or key not in obj:
        raise ResultsError(f"{where}: missing field '{key}'")
    value = obj[key]
    checks: dict[str, Callable[[Any], bool]] = {
        "number": _is_number,
        "real": lambda v: _is_number(v, finite=False),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict) and len(v) > 0,
        "list": lambda v: isinstance(v, list) and len(v) > 0,
        "numbers": lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
    }
    if not checks[kind](value):
        raise ResultsError(f"{where}.{key}: expected {_KIND_WORDS[kind]}, got {json.dumps(value)[:60]}")
    return value


def _optional_number(obj: dict, key: str, where: str, finite: bool = True) -> None:
    if obj.get(key) is not None and not _is_number(obj[key], finite):
        word = "a finite number" if finite else "a number"
        raise ResultsError(f"{where}.{key}: expected {word}, got {json.dumps(obj[key])[:60]}")


def _check_summary(summary: Any, where: str) -> None:
    for key in SUMMARY_NUMBERS:
        _require(summary, key, where, "int" if key.endswith("epoch") else "number")
    for key in ("lr", "seconds"):
        _optional_number(summary, key, where)
    curve = _require(summary, "curve", where, "dict")
    for key in CURVES:
        _require(curve, key, f"{where}.curve", "numbers")


def _check_lama(results: dict) -> None:
    for key in ("data", "protocol"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            raise ResultsError(f"{key}: expected an object, got {json.dumps(results[key])[:60]}")
    for name, summary in _require(results, "methods", "results", "dict").items():
        _check_summary(summary, f"methods.{name}")
    equal = results.get("equal_nf")
    if equal is not None:
        _require(equal, "target", "equal_nf", "dict")
        for name, summary in _require(equal, "methods", "equal_nf", "dict").items():
            _check_summary(summary, f"equal_nf.methods.{name}")


def _check_temporalwiki(results: dict) -> None:
    _require(results, "periods", "results", "list")
    probe_sets = _require(results, "probe_sets", "results", "list")
    if not all(isinstance(p, str) for p in probe_sets):
        raise ResultsError("probe_sets: expected a list of strings")
    for name, method in _require(results, "methods", "results", "dict").items():
        where = f"methods.{name}"
        for i, row in enumerate(_require(method, "after", where, "list")):
            _require(row, "stage", f"{where}.after[{i}]", "str")
            for probe, cell in _require(row, "probes", f"{where}.after[{i}]", "dict").items():
                cell_where = f"{where}.after[{i}].probes.{probe}"
                _require(cell, "nll", cell_where, "real")
                _require(cell, "acc", cell_where)
                _optional_number(cell, "ppl", cell_where, finite=False)
                for key in ("em", "n"):
                    _optional_number(cell, key, cell_where)
        forgetting = method.get("forgetting")
        if forgetting is not None and not isinstance(forgetting, dict):
            raise ResultsError(f"{where}.forgetting: expected an object")
        for key in ("lr", "seconds"):
            _optional_number(method, key, where)


CHECKS = {"lama_ckl": _check_lama, "temporalwiki": _check_temporalwiki}


def load_results(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """Read and validate ``RUN_DIR/results.json``.

    Raises:
        FileNotFoundError: no results.json in ``run_dir``.
        ResultsError: naming the file and what is wrong (unreadable, bad JSON, unknown benchmark,
            missing or mistyped field), so the user knows which file to fix.
    """
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (results.json is written by `ckl eval`)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot read: {e}") from None
    if not isinstance(results, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(results).__name__}")
    benchmark = results.get("benchmark")
    if benchmark not in CHECKS:
        raise ResultsError(
            f"{path}: field 'benchmark' is {benchmark!r}; known benchmarks: {', '.join(sorted(CHECKS))}"
        )
    try:
        CHECKS[benchmark](results)
    except ResultsError as e:
        raise ResultsError(f"{path}: {e}") from None
    return path, results


# ----------------------------------------------------------------------------- markdown helpers


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] printed x100, as the paper prints accuracies."""
    return NO_VALUE if x is None else f"{100 * x:.{digits}f}"


def fmt_lr(lr: float | None) -> str:
    return NO_VALUE if lr is None else f"{lr:.3g}"


def fmt_seconds(s: float | None) -> str:
    return NO_VALUE if s is None else f"{s:.1f}"


def _bold_best(
    values: dict[str, str], higher_is_better: bool = True, exclude: set[str] = frozenset()
) -> dict[str, str]:
    """Bold the best formatted value of a column (ties all bold); one method needs no bold.

    ``exclude``: methods whose value does not compete (e.g. an untrained model's number).
    """
    numeric = {k: float(v) for k, v in values.items() if v != NO_VALUE and k not in exclude}
    if len(numeric) < 2:
        return values
    best = max(numeric.values()) if higher_is_better else min(numeric.values())
    return {k: f"**{v}**" if k in numeric and numeric[k] == best else v for k, v in values.items()}


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _key_value_table(mapping: dict, skip: Sequence[str] = ()) -> str:
    rows = [(f"`{k}`", _scalar(v)) for k, v in mapping.items() if k not in skip]
    return md_table(["Setting", "Value"], rows) if rows else "_none recorded_"


# ----------------------------------------------------------------------------- plotting helpers


# ----------------------------------------------------------------------------- LAMA-ckl


METRIC_WORDS = {"acc": "token accuracy", "em": "exact match"}


def _curve_keys(metric: str) -> tuple[str, str]:
    return ("to_learn", "not_to_forget") if metric == "acc" else ("to_learn_em", "not_to_forget_em")


def same_as(series: dict[str, list[float]]) -> dict[str, str]:
    """Method -> the earlier method whose series is exactly the same (plotted on top of each other)."""
    first: dict[tuple, str] = {}
    out = {}
    for name, ys in series.items():
        key = tuple(ys)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def _line_style(i: int, name: str, twins: dict[str, str], step: float) -> tuple[dict, float, str]:
    """(style, x shift, label) of the i-th method's line; a twin of an earlier line (``same_as``) is
    drawn dashed and hollow, a hair to the right, and labelled "(= other)", so both stay visible."""
    if name not in twins:
        return _style(i), 0.0, name
    shift = step * (1 + list(twins).index(name) % 3)
    return {**_style(i), "linestyle": "--", "markerfacecolor": "none"}, shift, f"{name} (= {twins[name]})"


def plot_lama_curves(
    methods: dict[str, dict], path: Path, metric: str, title: str, counts: tuple = (None, None)
) -> Path:
    """Two panels side by side: TO-LEARN and NOT-TO-FORGET per epoch, one line per method.

    A curve identical to an earlier method's is drawn dashed, shifted right by a hair, and labelled
    "(= other)": it would otherwise hide under the first. ``counts``: probes per panel, in the titles.
    """
    with _rc():
        fig = _new_figure(12.0, 4.6)
        axes = fig.subplots(1, 2)
        words = METRIC_WORDS[metric]
        panels = zip(axes, _curve_keys(metric), ("TO-LEARN", "NOT-TO-FORGET"), counts)
        for ax, key, label, n in panels:
            series = {name: [100 * y for y in s["curve"][key]] for name, s in methods.items()}
            twins = same_as(series)
            for i, (name, ys) in enumerate(series.items()):
                style, shift, shown = _line_style(i, name, twins, 0.06)
                ax.plot(
                    [x + shift for x in range(len(ys))], ys, label=shown, linewidth=1.8, markersize=5, **style
                )
            mean_of = f", mean over {n} facts" if n else ""
            ax.set_title(f"{label} {words} (%) per epoch{mean_of}")
            ax.set_xlabel("epoch (0 = before training)")
            ax.set_ylabel(f"{label} {words} (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
        _legend_outside(axes[1])
        fig.suptitle(title)
        fig.tight_layout()
        return save_figure_atomic(fig, path)


UNTRAINED = " †"  # marks numbers of epoch 0, i.e. of the untrained model
BELOW_TARGET = " (below the NF target)"  # equal-NF view: no run of the method kept enough


def _lama_rows(methods: dict[str, dict]) -> list[list[str]]:
    """The paper's columns (x100), NOT-TO-FORGET after the last epoch, EM, lr and time.

    The best of each quality column is bold, but a method whose best epoch is 0 learned nothing: its
    Top / NF / Total numbers are the untrained model's (NF is 100 by construction), marked † and not
    ranked.
    """
    untrained = {m for m, s in methods.items() if s["epoch"] == 0}
    untrained_em = {m for m, s in methods.items() if s["em_epoch"] == 0}
    columns = {}
    for key in METRIC_LABELS:
        skip = untrained_em if key in ("top_em", "nf_em") else untrained
        values = _bold_best({m: pct(s[key]) for m, s in methods.items()}, exclude=skip)
        columns[key] = {m: v + (UNTRAINED if m in skip else "") for m, v in values.items()}
    for key in ("not_to_forget", "not_to_forget_em"):
        columns[key] = _bold_best({m: pct(s["curve"][key][-1]) for m, s in methods.items()})
    return [
        [
            f"`{name}`" + (BELOW_TARGET if s.get("meets_target") is False else ""),
            columns["top_acc"][name],
            str(s["epoch"]),
            columns["nf_acc"][name],
            columns["total"][name],
            columns["not_to_forget"][name],
            columns["top_em"][name],
            str(s["em_epoch"]),
            columns["nf_em"][name],
            columns["not_to_forget_em"][name],
            fmt_lr(s.get("lr")),
            fmt_seconds(s.get("seconds")),
        ]
        for name, s in methods.items()
    ]


def _twins_note(methods: dict[str, dict]) -> list[str]:
    """A line per method whose every curve equals an earlier method's: the table cannot tell them apart."""
    curves = {m: [x for key in CURVES for x in s["curve"][key]] for m, s in methods.items()}
    return [
        f"- `{name}` has exactly the curves of `{other}`: whatever it changes did not change a single score."
        for name, other in same_as(curves).items()
    ]


LAMA_HEADERS = (
    "Method", "Top Acc", "Epoch", "NF Acc", "Total Knowledge", "NF Acc (last)",
    "Top EM", "EM epoch", "NF EM", "NF EM (last)", "lr", "Time (s)",
)  # fmt: skip
LAMA_ALIGN = "lrrrrrrrrrrr"

LAMA_LEGEND = (
    "All accuracies are percentages (fractions x100, as in the paper). **Top Acc**: best TO-LEARN "
    "object-token accuracy over epochs 0..E; **Epoch**: the epoch it is reached (0 = before training); "
    "**NF Acc**: NOT-TO-FORGET token accuracy at that epoch; **Total Knowledge** = Top Acc + NF Acc; "
    "**NF Acc (last)**: NOT-TO-FORGET after the last epoch. "
    "**Top EM / EM epoch / NF EM / NF EM (last)**: the same for exact match of the whole object. "
    "Higher is better everywhere; the best value of each column is in bold. **†**: the best epoch is 0, "
    "the method never beat the untrained model on TO-LEARN, so these are the untrained model's numbers "
    "(NOT-TO-FORGET is 100 at epoch 0 by construction: it is what the untrained model knows); they are "
    "not ranked, and NF (last) shows what training did to NOT-TO-FORGET."
)


def _target_sentence(target: dict) -> str:
    metric = str(target.get("metric", "?"))
    label = METRIC_LABELS.get(metric, metric)
    value = target.get("value")
    shown = pct(value) if metric in METRIC_LABELS and _is_number(value) else _scalar(value)
    reference = target.get("reference")
    ref = f" (reference method: `{reference}`)" if reference else ""
    return (
        f"Each method is shown at the learning rate from its sweep that meets the target "
        f"**{label} = {shown}**{ref}. Comparing TO-LEARN accuracy at equal forgetting shows which "
        f"method learns more for the same retention. A method none of whose runs meets it is shown at "
        f"its best {label} and marked{BELOW_TARGET}."
    )


def _data_section(data: dict) -> list[str]:
    lines = [
        f"- Source: {data.get('source', NO_VALUE)}",
        f"- TO-LEARN probes: {data.get('to_learn', NO_VALUE)}; NOT-TO-FORGET probes: "
        f"{data.get('not_to_forget', NO_VALUE)}; probe field: `{data.get('probe_field', NO_VALUE)}`",
        f"- TA meta-training split: {data.get('split', NO_VALUE)}",
    ]
    known = {"source", "to_learn", "not_to_forget", "probe_field", "split"}
    lines += [f"- `{k}`: {_scalar(v)}" for k, v in data.items() if k not in known]
    return lines


def _footer(results: dict) -> list[str]:
    return [
        "## Machine",
        "",
        f"{results.get('machine', NO_VALUE)}; total wall time {fmt_seconds(results.get('seconds'))} s.",
        "",
    ]


def write_lama_report(results: dict, out_dir: Path, metric: str) -> list[Path]:
    """report.md with the same-lr table, the optional equal-NF table, data, protocol and plots."""
    title = results.get("title") or "LAMA-ckl"
    words = METRIC_WORDS[metric]
    data = results.get("data") or {}
    counts = (data.get("to_learn"), data.get("not_to_forget"))
    written = [
        plot_lama_curves(
            results["methods"], out_dir / "curves.png", metric, f"{title}: same learning rate", counts
        )
    ]
    md = [f"# {title}", "", "Benchmark: **LAMA-ckl**.", "", "## Results (same learning rate)", ""]
    md += [md_table(LAMA_HEADERS, _lama_rows(results["methods"]), LAMA_ALIGN), "", LAMA_LEGEND, ""]
    twins = _twins_note(results["methods"])
    md += [*twins, ""] if twins else []
    equal = results.get("equal_nf")
    if equal is not None:
        written.append(
            plot_lama_curves(
                equal["methods"],
                out_dir / "curves_equal_nf.png",
                metric,
                f"{title}: equal NOT-TO-FORGET",
                counts,
            )
        )
        md += ["## Results at equal NOT-TO-FORGET", "", _target_sentence(equal["target"]), ""]
        md += [md_table(LAMA_HEADERS, _lama_rows(equal["methods"]), LAMA_ALIGN), ""]
    md += ["## Curves", "", f"Plotted metric: **{words}** (`--metric {metric}`), in %.", ""]
    md += ["![TO-LEARN and NOT-TO-FORGET per epoch, same learning rate](curves.png)", ""]
    if equal is not None:
        md += ["![TO-LEARN and NOT-TO-FORGET per epoch, equal NOT-TO-FORGET](curves_equal_nf.png)", ""]
    md += ["## Data", "", *_data_section(results.get("data") or {}), ""]
    md += ["## Protocol", "", _key_value_table(results.get("protocol") or {}), ""]
    md += _footer(results)
    report = out_dir / "report.md"
    write_text_shared(report, "\n".join(md))
    return [report, *written]


# ----------------------------------------------------------------------------- TemporalWiki


TW_UNITS = (
    "Units: **object NLL** = mean object-token negative log-likelihood, nats, lower is better; "
    "**Acc** = object-token accuracy, %, higher is better; **PPL** = whole-triple perplexity, "
    "exp(mean NLL over all tokens of the rendered triple sentence), lower is better; "
    "**forgetting** = best earlier accuracy minus final accuracy, percentage points, lower is better."
)


def _probe_cell(row: dict, probe: str) -> dict | None:
    return row["probes"].get(probe)


def _probe_n(method: dict, probe: str) -> int | None:
    for row in method["after"]:
        cell = _probe_cell(row, probe)
        if cell is not None and cell.get("n") is not None:
            return int(cell["n"])
    return None


def _nll_acc(cell: dict | None) -> str:
    return NO_VALUE if cell is None else f"{cell['nll']:.3f} / {pct(cell['acc'], 1)}"


def _ppl(cell: dict | None) -> str:
    return NO_VALUE if cell is None or cell.get("ppl") is None else f"{cell['ppl']:.2f}"


def forgetting(method: dict, probe: str) -> float | None:
    """The recorded forgetting, else max earlier accuracy minus final accuracy (the spec's definition)."""
    recorded = (method.get("forgetting") or {}).get(probe)
    if _is_number(recorded):
        return float(recorded)
    accs = [c["acc"] for c in (_probe_cell(r, probe) for r in method["after"]) if c is not None]
    return max(accs[:-1]) - accs[-1] if len(accs) >= 2 else None


def _probe_header(method: dict, probe: str) -> str:
    n = _probe_n(method, probe)
    return probe if n is None else f"{probe} (n={n})"


def _method_section(name: str, method: dict, probe_sets: list[str]) -> list[str]:
    headers = ["Stage", *(_probe_header(method, p) for p in probe_sets)]
    align = "l" + "r" * len(probe_sets)
    nll_rows = [
        [row["stage"], *(_nll_acc(_probe_cell(row, p)) for p in probe_sets)] for row in method["after"]
    ]
    ppl_rows = [[row["stage"], *(_ppl(_probe_cell(row, p)) for p in probe_sets)] for row in method["after"]]
    return [
        f"### `{name}` (lr {fmt_lr(method.get('lr'))}, {fmt_seconds(method.get('seconds'))} s)",
        "",
        "Object-token NLL (nats, lower is better) / object-token accuracy (%, higher is better); "
        "row `base` is before training, then one row after each period:",
        "",
        md_table(headers, nll_rows, align),
        "",
        "Whole-triple perplexity (lower is better):",
        "",
        md_table(headers, ppl_rows, align),
        "",
    ]


def _final_table(methods: dict[str, dict], probe_sets: list[str]) -> str:
    """Final-stage object NLL of every method side by side, best (lowest) per column in bold."""
    columns = {
        p: _bold_best(
            {
                m: NO_VALUE if (c := _probe_cell(d["after"][-1], p)) is None else f"{c['nll']:.3f}"
                for m, d in methods.items()
            },
            higher_is_better=False,
        )
        for p in probe_sets
    }
    rows = [[f"`{m}`", *(columns[p][m] for p in probe_sets)] for m in methods]
    return md_table(["Method", *probe_sets], rows, "l" + "r" * len(probe_sets))


def _forgetting_table(methods: dict[str, dict], probe_sets: list[str]) -> str:
    def fmt(v: float | None) -> str:
        return NO_VALUE if v is None else f"{100 * v:+.1f}"

    rows = [[f"`{m}`", *(fmt(forgetting(d, p)) for p in probe_sets)] for m, d in methods.items()]
    return md_table(["Method", *probe_sets], rows, "l" + "r" * len(probe_sets))


def _split_probe(probe: str) -> tuple[str, str]:
    """'0901-1001/changed' -> ('0901-1001', 'changed'); a name without '/' is its own kind."""
    prefix, sep, kind = probe.rpartition("/")
    return (prefix, kind) if sep else ("", probe)


def plot_period_heatmaps(results: dict, path: Path) -> Path:
    """One heatmap per method (rows = stage, cols = probe set), accuracy % annotated in each cell.

    All methods share one colour scale so that equal colours mean equal accuracy across panels.
    """
    methods, probe_sets = results["methods"], results["probe_sets"]
    grids = {m: _acc_grid(d, probe_sets) for m, d in methods.items()}
    values = [v for g in grids.values() for row in g for v in row if not math.isnan(v)]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 100.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    n_stages = max(len(d["after"]) for d in methods.values())
    panel_width = 1.15 * len(probe_sets) + 2.6
    ncols = max(1, min(len(methods), int(MAX_WIDTH_IN // panel_width)))
    nrows = math.ceil(len(methods) / ncols)
    width = ncols * panel_width
    height = nrows * (0.5 * n_stages + 2.4) + 0.6
    with _rc():
        fig = _new_figure(width, height)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (name, method) in zip(axes, methods.items()):
            labels = [_probe_header(method, p) for p in probe_sets]  # "set (n=50)": how many probes
            _heatmap(ax, fig, grids[name], [r["stage"] for r in method["after"]], labels, (vmin, vmax))
            ax.set_title(name)
        for ax in axes[len(methods) :]:
            ax.set_visible(False)
        fig.suptitle(f"{results.get('title') or 'TemporalWiki'}: object-token accuracy (%) after each stage")
        fig.tight_layout()
        return save_figure_atomic(fig, path)


def _acc_grid(method: dict, probe_sets: list[str]) -> list[list[float]]:
    return [
        [math.nan if (c := _probe_cell(row, p)) is None else 100 * c["acc"] for p in probe_sets]
        for row in method["after"]
    ]


def _heatmap(ax, fig, grid: list[list[float]], stages: list[str], probe_sets: list[str], limits) -> None:
    import numpy as np

    data = np.array(grid, dtype=float)
    vmin, vmax = limits
    image = ax.imshow(data, cmap="Blues", vmin=vmin, vmax=vmax, aspect="auto")
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            value = data[r, c]
            dark = not math.isnan(value) and (value - vmin) / (vmax - vmin) > 0.6
            text = NO_VALUE if math.isnan(value) else f"{value:.1f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(probe_sets)), labels=list(probe_sets), rotation=30, ha="right")
    ax.set_yticks(range(len(stages)), labels=stages)
    ax.set_xlabel("probe set")
    ax.set_ylabel("stage (after training on)")
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.9)


def plot_period_nll(results: dict, path: Path) -> Path:
    """Object NLL per stage: one panel per probe set (rows = period, cols = changed/unchanged),
    one line per method; a dotted line marks the stage that trained on that probe set's period."""
    methods, probe_sets = results["methods"], results["probe_sets"]
    prefixes = list(dict.fromkeys(_split_probe(p)[0] for p in probe_sets))
    kinds = list(dict.fromkeys(_split_probe(p)[1] for p in probe_sets))
    with _rc():
        fig = _new_figure(5.2 * len(kinds) + 2.2, 3.4 * len(prefixes) + 0.6)
        axes = fig.subplots(len(prefixes), len(kinds), squeeze=False)
        used = set()
        for probe in probe_sets:
            prefix, kind = _split_probe(probe)
            r, c = prefixes.index(prefix), kinds.index(kind)
            used.add((r, c))
            _nll_panel(axes[r][c], methods, probe)
        for r, row in enumerate(axes):
            for c, ax in enumerate(row):
                ax.set_visible((r, c) in used)
        _legend_outside(axes[0][len(kinds) - 1])
        fig.suptitle(
            f"{results.get('title') or 'TemporalWiki'}: object-token NLL per stage (nats, lower is better)\n"
            "dotted line: the stage that trained on the probe set's period"
        )
        fig.tight_layout()
        return save_figure_atomic(fig, path)


def _nll_panel(ax, methods: dict[str, dict], probe: str) -> None:
    stages = max(([row["stage"] for row in m["after"]] for m in methods.values()), key=len)
    points = {
        name: [
            (stages.index(row["stage"]), cell["nll"])
            for row in method["after"]
            if (cell := _probe_cell(row, probe)) is not None and row["stage"] in stages
        ]
        for name, method in methods.items()
    }
    twins = same_as({name: [y for _, y in p] for name, p in points.items()})
    for i, (name, pts) in enumerate(points.items()):
        style, shift, shown = _line_style(i, name, twins, 0.04)
        ax.plot(
            [x + shift for x, _ in pts],
            [y for _, y in pts],
            label=shown,
            linewidth=1.8,
            markersize=5,
            **style,
        )
    prefix = _split_probe(probe)[0]
    if prefix in stages:
        ax.axvline(stages.index(prefix), color="0.5", linestyle=":", linewidth=1.2)
    ax.set_xticks(range(len(stages)), labels=stages)
    n = _probe_n(next(iter(methods.values())), probe)
    ax.set_title(probe if n is None else f"{probe} (mean over {n} probes)")
    ax.set_xlabel("stage (after training on)")
    ax.set_ylabel("object NLL (nats)")
    ax.grid(True, alpha=0.3)


def write_temporalwiki_report(results: dict, out_dir: Path) -> list[Path]:
    """report.md with per-method stage x probe-set tables, a forgetting table and two plots."""
    title = results.get("title") or "TemporalWiki"
    methods, probe_sets = results["methods"], results["probe_sets"]
    written = [
        plot_period_heatmaps(results, out_dir / "periods.png"),
        plot_period_nll(results, out_dir / "periods_nll.png"),
    ]
    periods = " → ".join(str(p) for p in results["periods"])
    md = [f"# {title}", "", "Benchmark: **TemporalWiki**.", ""]
    md += [f"- Stream: {results.get('stream', NO_VALUE)}", f"- Periods, trained in this order: {periods}", ""]
    md += [TW_UNITS, "", "## Final stage: object-token NLL (nats, lower is better)", ""]
    md += [_final_table(methods, probe_sets), ""]
    md += ["## Forgetting (accuracy percentage points, lower is better)", ""]
    md += [_forgetting_table(methods, probe_sets), ""]
    night_md, night_files = nights_section(results, out_dir)
    md += night_md
    written += night_files
    md += ["## Per method", ""]
    for name, method in methods.items():
        md += _method_section(name, method, probe_sets)
    md += ["## Plots", "", "![Object-token accuracy per stage and probe set](periods.png)", ""]
    md += ["![Object-token NLL per stage](periods_nll.png)", ""]
    md += _footer(results)
    report = out_dir / "report.md"
    write_text_shared(report, "\n".join(md))
    return [report, *written]


# ----------------------------------------------------------------------------- entry points


def write_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, metric: str = "em"
) -> list[Path]:
    """Write report.md and the PNG plots for ``run_dir/results.json``; returns the written paths.

    Args:
        run_dir: the run directory holding ``results.json``.
        out_dir: where to write (default: ``run_dir``).
        metric: LAMA-ckl curves plot ``em`` (exact match) or ``acc`` (token accuracy).

    Raises:
        FileNotFoundError: no results.json in ``run_dir``.
        ResultsError: results.json malformed, or of an unknown benchmark.
        ValueError: an unknown ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    _, results = load_results(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if results["benchmark"] == "lama_ckl":
        return write_lama_report(results, out, metric)
    return write_temporalwiki_report(results, out)
