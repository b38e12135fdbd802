"""`ckl weights`: every token is shown, in order, with exactly the TA model's output at its position."""

from __future__ import annotations

import html
import json
import os
import re

import pytest
import torch
from click.testing import CliRunner

from ckl_toolkit.cli import main
from ckl_toolkit.core.ta_model import build_ta_model, load_ta_model, load_ta_tokenizer, save_ta_model
from ckl_toolkit.evaluation.heatmap import (
    blend,
    intensities,
    mean_weight,
    render_ansi,
    render_html,
    token_weights,
    top_tokens,
)

TEXT = "Ada Lovelace was born in London ."
HOT = TEXT.index("London") - 1  # the character where " London"'s first token starts (with its space)
TRICKY = 'a <b> & "c"'
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def weights(*args: str):
    """``ckl weights ARGS`` through click's test runner."""
    return CliRunner().invoke(main, ["weights", *args])


def _hot_position(tokenizer) -> int:
    offsets = tokenizer(TEXT, return_offsets_mapping=True)["offset_mapping"]
    return next(t for t, (a, b) in enumerate(offsets) if a == HOT)


@pytest.fixture(scope="module")
def ta_dir(tiny_lm_dir, tmp_path_factory):
    """A TA model whose head is fitted so that only the first token of ' London' gets a high weight.

    The head is linear in the trunk's hidden states; with fewer tokens than hidden units a least-squares
    fit hits the wanted logits (+6 on the hot token, -6 elsewhere) exactly.
    """
    tokenizer = load_ta_tokenizer(tiny_lm_dir)
    ta = build_ta_model(tiny_lm_dir, num_layers=1).eval()
    enc = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        hidden = ta.trunk(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[
            0
        ]
        z = torch.full((hidden.shape[0], 1), -6.0)
        z[_hot_position(tokenizer)] = 6.0
        a = torch.cat([hidden, torch.ones(hidden.shape[0], 1)], dim=1).double()
        x = torch.linalg.lstsq(a, z.double()).solution.float()
        ta.head.weight.copy_(x[:-1].T)
        ta.head.bias.copy_(x[-1])
    return save_ta_model(ta, tmp_path_factory.mktemp("ta") / "ta", tokenizer)


@pytest.fixture(scope="module")
def loaded(ta_dir):
    return load_ta_model(ta_dir), load_ta_tokenizer(ta_dir)


def forward(ta, tokenizer, text: str) -> list[float]:
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return ta(enc["input_ids"], enc["attention_mask"])[0].tolist()


def test_weights_are_the_models_output_per_token(loaded):
    ta, tokenizer = loaded
    (doc,) = token_weights(ta, tokenizer, [TEXT])
    pieces = [p for p, _ in doc]
    assert pieces[0] == "<bos>" and "".join(pieces[1:]) == TEXT
    assert [w for _, w in doc] == pytest.approx(forward(ta, tokenizer, TEXT), abs=1e-6)
    hot = _hot_position(tokenizer)
    assert pieces[hot].startswith(" L") and doc[hot][1] > 0.99
    assert max(w for t, (_, w) in enumerate(doc) if t not in (0, hot)) < 0.01
    assert top_tokens(doc, 1) == [(hot, pieces[hot], doc[hot][1])]
    assert mean_weight(doc) == pytest.approx(sum(w for _, w in doc[1:]) / (len(doc) - 1))


def test_several_documents_each_unpadded(loaded):
    ta, tokenizer = loaded
    docs = token_weights(ta, tokenizer, [TEXT, TRICKY, "Paris"])
    for text, doc in zip([TEXT, TRICKY, "Paris"], docs):
        assert "".join(p for p, _ in doc[1:]) == text
        assert [w for _, w in doc] == pytest.approx(forward(ta, tokenizer, text), abs=1e-6)


SPAN_RE = re.compile(r'<span class="t( first)?"(?: style="[^"]*")? title="([^"]*)">(.*?)</span>', re.S)


def test_html_spans_in_order_with_values_and_escaping(loaded):
    ta, tokenizer = loaded
    docs = token_weights(ta, tokenizer, [TEXT, TRICKY])
    page = render_html(docs, ["first", "<script>"])
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page and "src=" not in page and "href=" not in page  # self-contained, inert
    assert "Document 2: &lt;script&gt;" in page
    blocks = page.split('<section class="doc">')[1:]
    assert len(blocks) == 2
    for block, doc in zip(blocks, docs):
        spans = SPAN_RE.findall(block)
        assert [html.unescape(text) for _, _, text in spans] == [p for p, _ in doc]
        assert spans[0][0] == " first" and "no target weight" in spans[0][1]
        shown = [float(title.removeprefix("weight ")) for _, title, _ in spans[1:]]
        assert shown == pytest.approx([w for _, w in doc[1:]], abs=1e-4)
    tricky = blocks[1].split('<div class="tokens">')[1].split("</div>")[0]
    for raw in ("&lt;", "&gt;", "&amp;", "&quot;"):
        assert f">{raw}</span>" in tricky
    assert re.sub(r"<[^<>]*>", "", tricky) == "&lt;bos&gt;a &lt;b&gt; &amp; &quot;c&quot;"  # no raw < > & "
    hot = _hot_position(tokenizer)
    assert f"background: rgba(220, 38, 38, {min(docs[0][hot][1], 1.0):.3f})" in blocks[0]
    assert f'<ol class="top"><li><code>{docs[0][hot][0].strip()}</code> {docs[0][hot][1]:.3f}' in blocks[0]


def test_ansi_colours_and_plain_values(loaded):
    ta, tokenizer = loaded
    (doc,) = token_weights(ta, tokenizer, [TEXT])
    coloured = render_ansi([doc], ["t"])
    lines = coloured.splitlines()
    assert lines[0].startswith("── Document 1: t ──") and f"mean weight {mean_weight(doc):.3f}" in lines[0]
    assert ANSI_RE.sub("", lines[1]) == "<bos>" + TEXT
    hot = _hot_position(tokenizer)
    r, g, b = blend(doc[hot][1])
    assert f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;255;255;255m{doc[hot][0]}\x1b[0m" in lines[1]
    assert "\x1b[48;2;225;225;225m" in lines[1]  # the greyed first token
    assert lines[2].startswith(f"top-10: {doc[hot][0].strip()} {doc[hot][1]:.3f}")
    assert "legend:" in coloured

    plain = render_ansi([doc], color=False)
    assert "\x1b" not in plain
    body = plain.splitlines()[1]
    pairs = re.findall(r"(.*?)\[(--|\d\.\d\d)\]", body, re.S)
    assert [p for p, _ in pairs] == [p for p, _ in doc]
    assert pairs[0][1] == "--"
    assert [float(v) for _, v in pairs[1:]] == pytest.approx([w for _, w in doc[1:]], abs=0.005)


def test_control_characters_cannot_reach_the_terminal():
    doc = [("<bos>", 0.5), ("a\x1b[2J", 0.9), ("\r\nb", 0.1), (" \x9b\u00e9\u00a0", 0.2)]
    for color in (False, True):
        out = render_ansi([doc], color=color)
        assert "\x1b[2J" not in out and "\x9b" not in out and "\r" not in out
    out = render_ansi([doc], color=False)
    assert "a\\x1b[2J[0.90]" in out and "\nb[0.10]" in out and " \\x9b\u00e9\u00a0[0.20]" in out


def test_minmax_scale_stretches_targets():
    doc = [("<bos>", 0.0), ("a", 0.4), ("b", 0.5), ("c", 0.45)]
    assert intensities(doc, "raw") == [0.0, 0.4, 0.5, 0.45]
    assert intensities(doc, "minmax")[1:] == pytest.approx([0.0, 1.0, 0.5])


def test_cli_text_and_html(ta_dir, tmp_path):
    out = tmp_path / "w.html"
    args = ["--ta", str(ta_dir), "--text", TEXT]
    result = weights(*args, "--color", "--html", str(out))
    assert result.exit_code == 0, result.output
    assert "mean weight" in result.output and "top-10:" in result.output and f"wrote {out}" in result.output
    assert "\x1b[48;2;" in result.output
    assert out.read_text().count('<section class="doc">') == 1
    assert (
        out.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
    )  # readable unless umask forbids
    for flags in (["--no-color"], []):  # piped output (not a terminal) defaults to text
        plain = weights(*args, *flags)
        assert plain.exit_code == 0 and "\x1b" not in plain.output and "<bos>[--]Ada[" in plain.output


def test_cli_files(ta_dir, tmp_path):
    rows = tmp_path / "docs.jsonl"
    rows.write_text(
        json.dumps({"text": TEXT}) + "\n\n" + json.dumps({"evidence": TRICKY, "object": "c"}) + "\n"
        + json.dumps({"text": "Paris"}) + "\n"
    )  # fmt: skip
    result = weights("--ta", str(ta_dir), "--file", str(rows), "--no-color", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "Document 1: docs.jsonl:1" in result.output and "Document 2: docs.jsonl:3" in result.output
    assert "Document 3" not in result.output and "showing the first 2 documents" in result.output
    assert "<[" in result.output and "&[" in result.output  # LAMA-ckl evidence rendered

    txt = tmp_path / "doc.txt"
    txt.write_text("Grace Hopper lives in New York .\n")
    result = weights("--ta", str(ta_dir), "--file", str(txt), "--no-color")
    assert result.exit_code == 0 and "Document 1: doc.txt" in result.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    result = weights("--ta", str(ta_dir), "--file", str(bad))
    assert (
        result.exit_code == 1 and f"{bad}:2: no non-empty string field 'text' or 'evidence'" in result.output
    )


def test_cli_usage_errors(ta_dir, tmp_path, tiny_lm_dir):
    assert weights("--ta", str(ta_dir)).exit_code == 2
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    assert weights("--ta", str(ta_dir), "--text", "x", "--file", str(txt)).exit_code == 2
    not_ta = weights("--ta", str(tiny_lm_dir), "--text", "x")
    assert not_ta.exit_code == 1 and "ta_config.json" in not_ta.output


def test_a_near_flat_ta_is_called_so_and_minmax_never_claims_0_to_1():
    flat = [("<bos>", 0.5), ("The", 0.981), (" river", 0.983), (" Seine", 0.984)]
    raw = render_ansi([flat], color=True, scale="raw")
    assert "range 0.981–0.984" in raw and "near-flat: every target weight in [0.981, 0.984]" in raw
    stretched = render_ansi([flat], color=True, scale="minmax")
    legend = stretched.splitlines()[-1]
    assert "lowest weight" in legend and " 0 " not in ANSI_RE.sub("", legend).replace("weight 0", "")
    assert "min-max colours exaggerate" in stretched
    page = render_html([flat], scale="minmax")
    assert "lowest weight" in page and "weights only span [0.981, 0.984]" in page
    sharp = [("<bos>", 0.5), ("The", 0.05), (" river", 0.1), (" Seine", 0.97)]
    assert "near-flat" not in render_ansi([sharp], color=True) + render_html([sharp])


def test_a_surprise_ta_reads_the_targets_loss_given_by_target(tiny_lm_dir, tmp_path):
    """A TA model meta-trained with ta.surprise weighs by the target's per-token loss: `ckl weights`
    computes it with --target (as training does), and says what is missing without it."""
    from transformers import AutoModelForCausalLM

    from ckl_toolkit.core.losses import token_nll
    from tests.conftest import build_tiny_lm_dir

    tokenizer = load_ta_tokenizer(tiny_lm_dir)
    target = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    enc = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        s = torch.log1p(token_nll(target, enc["input_ids"], enc["attention_mask"])[0])  # (T-1,)
    # The head reads only the surprise input, steeply around its mean (a random target's losses all sit
    # near log(vocab)): w_t = sigmoid(100 * (log(1 + loss of x_t) - mean)).
    ta = build_ta_model(tiny_lm_dir, num_layers=1, surprise=True).eval()
    with torch.no_grad():
        ta.head.weight.zero_()
        ta.head.weight[0, -1] = 100.0
        ta.head.bias.fill_(-100.0 * s.mean().item())
    ta_dir = save_ta_model(ta, tmp_path / "ta", tokenizer)
    expected = torch.sigmoid(100.0 * (s - s.mean())).tolist()
    got = [w for _, w in token_weights(ta, tokenizer, [TEXT], target=target)[0][1:]]
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(expected) - min(expected) > 0.3  # the loss, not a constant, sets them

    shown = weights("--ta", str(ta_dir), "--text", TEXT, "--target", str(tiny_lm_dir), "--no-color")
    assert shown.exit_code == 0, shown.output
    assert f"[{expected[2]:.2f}]" in shown.output

    missing = weights("--ta", str(ta_dir), "--text", TEXT)
    assert (
        missing.exit_code == 1 and "pass --target DIR" in missing.output and "Traceback" not in missing.output
    )
    other = build_tiny_lm_dir(tmp_path / "other_lm", vocab_size=270, seed=1)
    wrong = weights("--ta", str(ta_dir), "--text", TEXT, "--target", str(other))
    assert wrong.exit_code == 1 and "is not the TA model's" in wrong.output


def test_target_is_noted_unused_for_a_ta_without_surprise(ta_dir, tiny_lm_dir):
    result = weights("--ta", str(ta_dir), "--text", TEXT, "--target", str(tiny_lm_dir), "--no-color")
    assert result.exit_code == 0 and "--target unused" in result.output
