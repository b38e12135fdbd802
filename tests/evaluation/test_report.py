"""`ckl report`: the markdown tables carry the right numbers (x100) and the PNGs are real plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckl_toolkit.cli import main
from ckl_toolkit.evaluation.report import ResultsError, load_results, write_report

EPOCHS = 6


def summary(to_learn, to_learn_em, nf, nf_em, lr, seconds) -> dict:
    """A SUMMARY as `ckl eval` writes it: headline numbers derived from the curves."""
    e = max(range(len(to_learn)), key=lambda i: (to_learn[i], -i))
    k = max(range(len(to_learn_em)), key=lambda i: (to_learn_em[i], -i))
    return {
        "top_acc": to_learn[e],
        "epoch": e,
        "nf_acc": nf[e],
        "total": to_learn[e] + nf[e],
        "top_em": to_learn_em[k],
        "em_epoch": k,
        "nf_em": nf_em[k],
        "lr": lr,
        "seconds": seconds,
        "curve": {
            "to_learn": to_learn,
            "to_learn_em": to_learn_em,
            "not_to_forget": nf,
            "not_to_forget_em": nf_em,
            "train_loss": [3.0 - 0.3 * i for i in range(EPOCHS)],
        },
    }


def rising(start: float, top: float, peak: int, end: float) -> list[float]:
    """A learning curve: rises from start to top at epoch ``peak``, then drifts to ``end``."""
    up = [start + (top - start) * i / peak for i in range(peak + 1)]
    down = [top + (end - top) * (i + 1) / (EPOCHS - peak) for i in range(EPOCHS - peak)]
    return up + down


def falling(start: float, end: float) -> list[float]:
    return [start + (end - start) * (i / EPOCHS) ** 0.7 for i in range(EPOCHS + 1)]


def lama_results() -> dict:
    methods = {
        "finetune": summary(
            rising(0.05, 0.3125, 4, 0.29), rising(0.0, 0.21, 5, 0.2),
            falling(0.91, 0.7234), falling(0.88, 0.65), 3e-4, 101.25,
        ),
        "taalm": summary(
            rising(0.05, 0.45678, 3, 0.44), rising(0.0, 0.3333, 3, 0.31),
            falling(0.91, 0.8512), falling(0.88, 0.8), 3e-4, 187.5,
        ),
        "rho1": summary(
            rising(0.05, 0.38, 5, 0.37), rising(0.0, 0.25, 4, 0.24), falling(0.91, 0.78), falling(0.88, 0.7),
            3e-4, 150.0,
        ),
    }  # fmt: skip
    equal = {
        "finetune": summary(
            rising(0.05, 0.2, 6, 0.2), rising(0.0, 0.12, 6, 0.12), falling(0.91, 0.88), falling(0.88, 0.88),
            1e-4, 99.0,
        ),
        "taalm": summary(
            rising(0.05, 0.41, 4, 0.4), rising(0.0, 0.3, 4, 0.29), falling(0.91, 0.885), falling(0.88, 0.881),
            2e-4, 180.0,
        ),
    }  # fmt: skip
    return {
        "benchmark": "lama_ckl",
        "title": "LAMA-ckl on synthetic world runs/demo/world",
        "machine": "2-core CPU, torch 2.13.0",
        "data": {
            "source": "synthetic world runs/demo/world",
            "to_learn": 200,
            "not_to_forget": 300,
            "probe_field": "task_descriptive",
            "split": "TA meta-trained on 200 disjoint pairs",
            "seed": 0,
        },
        "protocol": {"epochs": EPOCHS, "lr": 3e-4, "batch_size": 8},
        "methods": methods,
        "equal_nf": {"target": {"metric": "nf_em", "value": 0.88, "reference": "finetune"}, "methods": equal},
        "seconds": 1234.5,
    }


PERIODS = ["0901-1001", "1001-1101"]
PROBES = [f"{p}/{k}" for p in PERIODS for k in ("changed", "unchanged")]


def tw_method(learn: float, forget: float, lr: float, with_forgetting: bool = True) -> dict:
    """Changed facts of a period are learned at its stage; unchanged ones erode a little each stage."""
    rows = []
    for s, stage in enumerate(["base", *PERIODS]):
        probes = {}
        for j, probe in enumerate(PROBES):
            period, kind = probe.split("/")
            trained = s > PERIODS.index(period)
            if kind == "changed":
                acc = (
                    0.1
                    + (learn if trained else 0.0)
                    - (forget * (s - 1 - PERIODS.index(period)) if trained else 0)
                )
            else:
                acc = 0.6 - forget * s - 0.01 * j
            nll = 4.0 - 5.0 * acc
            probes[probe] = {"nll": nll, "ppl": 2.718 ** (nll / 3), "acc": acc, "em": acc / 2, "n": 40 + j}
        rows.append({"stage": stage, "probes": probes})
    method = {"after": rows, "seconds": 55.5, "lr": lr}
    if with_forgetting:
        method["forgetting"] = {
            p: max(r["probes"][p]["acc"] for r in rows[:-1]) - rows[-1]["probes"][p]["acc"] for p in PROBES
        }
    return method


def tw_results() -> dict:
    return {
        "benchmark": "temporalwiki",
        "title": "TemporalWiki substitute",
        "machine": "2-core CPU",
        "stream": "substitute: sentences rendered from each period's changed triples",
        "periods": PERIODS,
        "probe_sets": PROBES,
        "methods": {
            "finetune": tw_method(0.3, 0.08, 3e-4),
            "taalm": tw_method(0.45, 0.02, 3e-4),
            "rho1": tw_method(0.35, 0.05, 3e-4, with_forgetting=False),
        },
        "seconds": 200.0,
    }


def make_run(tmp_path: Path, results: dict | str) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    text = results if isinstance(results, str) else json.dumps(results)
    (run / "results.json").write_text(text)
    return run


def table_row(md: str, method: str, after: str = "") -> list[str]:
    """Cells of the first table row for ``method`` after the heading ``after``, bold marks removed."""
    text = md[md.index(after) :] if after else md
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{method}` |"))
    return [c.strip().strip("*") for c in line.strip("|").split("|")][1:]


def assert_real_plot(path: Path, size: tuple[int, int]) -> None:
    """A PNG of the expected pixel size with many distinct colours (lines, text, fills), not blank."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colours) > 200, f"{path} looks blank: {len(colours)} colours"
    white = max(count for count, rgb in colours if rgb == (255, 255, 255))
    assert white < 0.95 * size[0] * size[1]


def test_lama_table_numbers_are_x100(tmp_path):
    run = make_run(tmp_path, lama_results())
    paths = write_report(run)
    assert [p.name for p in paths] == ["report.md", "curves.png", "curves_equal_nf.png"]
    md = (run / "report.md").read_text()
    # taalm: top 0.45678 at epoch 3, NF at epoch 3, total = sum; EM 0.3333 at epoch 3.
    nf3 = falling(0.91, 0.8512)[3]
    nf_em3 = falling(0.88, 0.8)[3]
    nf_last, nf_em_last = falling(0.91, 0.8512)[-1], falling(0.88, 0.8)[-1]
    assert table_row(md, "taalm") == [
        "45.68", "3", f"{100 * nf3:.2f}", f"{100 * (0.45678 + nf3):.2f}", f"{100 * nf_last:.2f}",
        "33.33", "3", f"{100 * nf_em3:.2f}", f"{100 * nf_em_last:.2f}", "0.0003", "187.5",
    ]  # fmt: skip
    assert table_row(md, "finetune")[:2] == ["31.25", "4"]
    # The best Top Acc is bold, the others are not.
    assert "| **45.68** |" in md and "| 31.25 |" in md
    for header in ("Top Acc", "Epoch", "NF Acc", "Total Knowledge", "Top EM", "EM epoch", "NF EM", "lr"):
        assert f" {header} |" in md


def test_lama_equal_nf_section_and_context(tmp_path):
    run = make_run(tmp_path, lama_results())
    write_report(run)
    md = (run / "report.md").read_text()
    assert "## Results at equal NOT-TO-FORGET" in md
    assert "**NF EM = 88.00**" in md and "`finetune`" in md
    assert table_row(md, "taalm", after="## Results at equal NOT-TO-FORGET")[:2] == ["41.00", "4"]
    assert table_row(md, "taalm", after="## Results at equal NOT-TO-FORGET")[9] == "0.0002"
    for text in ("synthetic world runs/demo/world", "200", "300", "task_descriptive", "disjoint pairs"):
        assert text in md
    assert "| `batch_size` | 8 |" in md and "2-core CPU, torch 2.13.0" in md and "1234.5 s" in md
    assert "](curves.png)" in md and "](curves_equal_nf.png)" in md
    assert "Plotted metric: **exact match**" in md


def test_a_method_below_the_nf_target_is_marked_in_the_equal_nf_table(tmp_path):
    results = lama_results()
    results["equal_nf"]["methods"]["taalm"]["meets_target"] = False  # e.g. an unswept run that forgets more
    results["equal_nf"]["methods"]["finetune"]["meets_target"] = True
    run = make_run(tmp_path, results)
    write_report(run)
    md = (run / "report.md").read_text()
    section = md[md.index("## Results at equal NOT-TO-FORGET") :]
    assert "| `taalm` (below the NF target) |" in section
    assert "| `finetune` |" in section  # a method that meets it is not marked
    assert "| `taalm` |" in md  # the same-lr table never marks


def test_lama_plots_are_readable_pngs(tmp_path):
    run = make_run(tmp_path, lama_results())
    write_report(run)
    assert_real_plot(run / "curves.png", (1440, 552))
    assert_real_plot(run / "curves_equal_nf.png", (1440, 552))
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_outputs_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    import os
    import stat

    run = make_run(tmp_path, lama_results())
    mask = os.umask(0o022)
    try:
        paths = write_report(run)
    finally:
        os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {0o644}


def test_metric_option_switches_the_plotted_curves(tmp_path):
    run = make_run(tmp_path, lama_results())
    write_report(run, tmp_path / "em", metric="em")
    write_report(run, tmp_path / "acc", metric="acc")
    assert (tmp_path / "em" / "curves.png").read_bytes() != (tmp_path / "acc" / "curves.png").read_bytes()
    assert "Plotted metric: **token accuracy**" in (tmp_path / "acc" / "report.md").read_text()


def test_no_equal_nf_view_means_no_second_table(tmp_path):
    results = lama_results()
    del results["equal_nf"]
    run = make_run(tmp_path, results)
    assert [p.name for p in write_report(run)] == ["report.md", "curves.png"]
    assert "equal NOT-TO-FORGET" not in (run / "report.md").read_text()


def test_temporalwiki_tables(tmp_path):
    run = make_run(tmp_path, tw_results())
    paths = write_report(run)
    assert [p.name for p in paths] == ["report.md", "periods.png", "periods_nll.png"]
    md = (run / "report.md").read_text()
    assert "object-token nll" in md.lower() and "nats, lower is better" in md
    assert "Whole-triple perplexity" in md
    taalm = tw_results()["methods"]["taalm"]
    section = md[md.index("### `taalm`") :]
    base = next(ln for ln in section.splitlines() if ln.startswith("| base |"))
    cell = taalm["after"][0]["probes"]["0901-1001/changed"]
    assert base.split("|")[2].strip() == f"{cell['nll']:.3f} / {100 * cell['acc']:.1f}"
    assert "0901-1001/changed (n=40)" in section
    last = taalm["after"][-1]["probes"]["1001-1101/unchanged"]
    assert f"{last['ppl']:.2f}" in section


def test_temporalwiki_forgetting_recorded_or_derived(tmp_path):
    run = make_run(tmp_path, tw_results())
    write_report(run)
    md = (run / "report.md").read_text()
    after = "## Forgetting"
    for name in ("finetune", "rho1"):  # rho1 has no recorded forgetting: derived from its accuracies
        method = tw_results()["methods"][name]
        accs = [r["probes"]["0901-1001/changed"]["acc"] for r in method["after"]]
        expected = 100 * (max(accs[:-1]) - accs[-1])
        assert table_row(md, name, after=after)[0] == f"{expected:+.1f}"
    assert table_row(md, "finetune", after=after)[0] == "+8.0"


def test_temporalwiki_plots(tmp_path):
    run = make_run(tmp_path, tw_results())
    write_report(run)
    from PIL import Image

    for name in ("periods.png", "periods_nll.png"):
        with Image.open(run / name) as img:
            width, height = img.size
        assert 600 < width < 3000 and 400 < height < 2500
        assert_real_plot(run / name, (width, height))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON at line 1"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"benchmark": "squad"}), "field 'benchmark' is 'squad'"),
        (json.dumps({"benchmark": "lama_ckl", "methods": {}}), "methods: expected a non-empty object"),
        (json.dumps({**lama_results(), "data": "LAMA"}), "data: expected an object"),
        (json.dumps({**tw_results(), "probe_sets": []}), "probe_sets: expected a non-empty list"),
    ],
)
def test_malformed_results_name_the_file(tmp_path, content, message):
    run = make_run(tmp_path, content)
    with pytest.raises(ResultsError) as e:
        write_report(run)
    assert str(run / "results.json") in str(e.value) and message in str(e.value)


def test_missing_field_names_the_json_path(tmp_path):
    results = lama_results()
    del results["methods"]["taalm"]["top_acc"]
    results["methods"]["rho1"]["curve"]["to_learn"][2] = "high"
    run = make_run(tmp_path, results)
    with pytest.raises(ResultsError, match=r"methods\.taalm: missing field 'top_acc'"):
        load_results(run)
    del results["methods"]["taalm"]
    run = make_run(tmp_path, results)
    with pytest.raises(ResultsError, match=r"methods\.rho1\.curve\.to_learn: expected a list of numbers"):
        load_results(run)
    tw = tw_results()
    tw["methods"]["taalm"]["after"][1]["probes"]["0901-1001/changed"].pop("nll")
    run = make_run(tmp_path, tw)
    with pytest.raises(ResultsError, match=r"after\[1\]\.probes\.0901-1001/changed: missing field 'nll'"):
        load_results(run)


def test_cli_end_to_end(tmp_path):
    run = make_run(tmp_path, lama_results())
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(out), "--metric", "acc"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(out / n) for n in ("report.md", "curves.png", "curves_equal_nf.png")]
    assert not (run / "report.md").exists()

    with pytest.raises(FileNotFoundError, match="not found"):
        load_results(tmp_path / "nowhere")
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert str(tmp_path / "nowhere" / "results.json") in missing.output and "not found" in missing.output

    bad = CliRunner().invoke(main, ["report", str(run), "--metric", "f1"])
    assert bad.exit_code == 2


def test_a_method_that_learned_nothing_is_marked_not_ranked_and_its_twin_is_named(tmp_path):
    """Epoch 0 = the untrained model: its NOT-TO-FORGET 100 must not be bolded as the best retention."""
    flat = [0.05] * (EPOCHS + 1)
    results = lama_results()
    nothing = summary(flat, [0.0] * (EPOCHS + 1), [1.0] + [0.75] * EPOCHS, [1.0] + [0.7] * EPOCHS, 3e-4, 9.0)
    results["methods"] = {
        "finetune": nothing,
        "taalm": json.loads(json.dumps(nothing)),  # the same curves: the TA weights changed nothing
        "oracle": summary(rising(0.05, 0.4, 3, 0.39), rising(0.0, 0.3, 3, 0.3), falling(1.0, 0.9),
                          falling(1.0, 0.85), 3e-4, 9.0),
    }  # fmt: skip
    del results["equal_nf"]
    run = make_run(tmp_path, results)
    write_report(run)
    md = (run / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| `finetune` |"))
    assert "| 100.00 † |" in line and "**100.00" not in line  # marked, not bold
    assert (
        table_row(md, "finetune")[1] == "0" and table_row(md, "finetune")[4] == "75.00"
    )  # NF after training
    assert "**100.00" not in md and "**140.00" not in md  # no untrained number is ranked best anywhere
    assert "`taalm` has exactly the curves of `finetune`" in md
    assert "†" in md.split("## Curves")[0].split("Higher is better")[1]  # the legend explains the mark


def test_identical_curves_are_labelled_and_both_drawn(tmp_path):
    from ckl_toolkit.evaluation.report import same_as

    assert same_as({"a": [1.0, 2.0], "b": [1.0, 3.0], "c": [1.0, 2.0]}) == {"c": "a"}
    results = lama_results()
    results["methods"]["rho1"] = json.loads(json.dumps(results["methods"]["finetune"]))
    run = make_run(tmp_path, results)
    from ckl_toolkit.evaluation import report

    labels = []
    real_plot = report._new_figure

    def spy(width, height):
        fig = real_plot(width, height)
        labels.append(fig)
        return fig

    report._new_figure = spy
    try:
        write_report(run)
    finally:
        report._new_figure = real_plot
    ax = labels[0].axes[0]
    names = [line.get_label() for line in ax.get_lines()]
    assert "rho1 (= finetune)" in names
    twin = ax.get_lines()[names.index("rho1 (= finetune)")]
    first = ax.get_lines()[names.index("finetune")]
    assert list(twin.get_ydata()) == list(first.get_ydata()) and twin.get_xdata()[0] > first.get_xdata()[0]
    assert "mean over 200 facts" in ax.get_title() and "mean over 300 facts" in labels[0].axes[1].get_title()
