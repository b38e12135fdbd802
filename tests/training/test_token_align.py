"""Cross-tokenizer weights: decoded spans, overlap max/mean, and a TA model with another tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from ckl_toolkit.core.ta_model import build_ta_model, save_ta_model
from ckl_toolkit.core.text import encode
from ckl_toolkit.nightly.contract import ExitCode
from ckl_toolkit.nightly.run import read_metrics
from ckl_toolkit.training.token_align import (
    align_weights,
    decode_spans,
    same_tokenizer,
)
from ckl_toolkit.training.weighers import (
    CrossTokenizerTAWeights,
    TextBatch,
    TrainAttentionWeights,
    row_text_batch,
)
from ckl_toolkit.update import update
from tests.conftest import build_tiny_lm_dir
from tests.nightly.test_update import facts, make_recipe, write_jsonl

TEXT = "Ada Lovelace was born in Zürich — 東京 . Grace Hopper works for Babbage Engines ."


def test_decode_spans_recover_the_text_and_the_tokenizers_own_offsets(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    enc = tok(TEXT, return_offsets_mapping=True)
    text, spans = decode_spans(tok, enc["input_ids"])
    assert text == TEXT
    assert spans == [tuple(s) for s in enc["offset_mapping"]]  # multi-byte characters included
    window = enc["input_ids"][7:19]  # a row cut out of a document, starting mid-text
    text, spans = decode_spans(tok, window)
    assert text == tok.decode(window) and text in TEXT
    assert "".join(text[a:b] for a, b in dict.fromkeys(spans)) == text  # the spans tile the row


def test_align_weights_takes_max_or_mean_of_overlapping_tokens():
    src = [(0, 3), (3, 6), (6, 9), (0, 0)]  # three φ tokens and a special one
    w = torch.tensor([0.2, 0.8, 0.5, 0.9])
    tgt = [(0, 0), (0, 6), (6, 9), (4, 5), (9, 12)]  # special, spans two, equals one, inside one, none
    got_max = align_weights(src, w, tgt, "max", fill=-1.0)
    assert torch.allclose(got_max, torch.tensor([-1.0, 0.8, 0.5, 0.8, -1.0]))
    got_mean = align_weights(src, w, tgt, "mean")
    assert torch.allclose(got_mean, torch.tensor([0.6, 0.5, 0.5, 0.8, 0.6]))  # fill: mean of φ's weights
    with pytest.raises(ValueError, match="weights.reduce"):
        align_weights(src, w, tgt, "median")


@pytest.fixture(scope="module")
def other_tokenizer_lm(tmp_path_factory):
    """A second tiny LM whose BPE vocabulary (and so tokenisation) differs from tiny_lm_dir's."""
    return build_tiny_lm_dir(tmp_path_factory.mktemp("other_lm"), vocab_size=270, seed=1)


def varied_ta(lm_dir, out):
    torch.manual_seed(0)
    ta = build_ta_model(lm_dir)
    torch.nn.init.normal_(ta.head.weight, std=8.0 / ta.head.in_features**0.5)  # weights spread over (0, 1)
    return ta, save_ta_model(ta, out, AutoTokenizer.from_pretrained(lm_dir))


def test_offsets_with_the_same_tokenizer_reproduce_identity_weights(tmp_path, tiny_lm_dir):
    ta, _ = varied_ta(tiny_lm_dir, tmp_path / "ta")
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    texts = [r["text"] for r in facts("x", 4)] + [TEXT]
    enc = encode(tok, texts, 64)
    identity = TrainAttentionWeights(ta)(TextBatch(enc, texts))  # (B, T-1)
    rows = row_text_batch(tok, enc.input_ids, enc.attention_mask)
    mapped = CrossTokenizerTAWeights(ta, tok, "max")(rows)
    assert identity.std() > 0.05  # not uniform
    assert torch.allclose(identity[:4], mapped[:4], atol=1e-6)
    # Characters are the unit: the byte tokens of "ü", "—", "東", "京" share a span, so they share a weight.
    spans = rows.enc.offsets[4][1:]
    shared = torch.tensor([spans.count(s) > 1 and s[1] > s[0] for s in spans])
    assert torch.allclose(identity[4][~shared], mapped[4][~shared], atol=1e-6)
    assert int(shared.sum()) == 2 + 3 + 3 + 3


def test_a_ta_model_with_another_tokenizer_weights_the_target_through_offsets(
    tmp_path, tiny_lm_dir, other_tokenizer_lm
):
    ta, ta_dir = varied_ta(other_tokenizer_lm, tmp_path / "ta")
    ta_tok, tok = (
        AutoTokenizer.from_pretrained(other_tokenizer_lm),
        AutoTokenizer.from_pretrained(tiny_lm_dir),
    )
    sidecar = json.loads((ta_dir / "ta_config.json").read_text())
    assert same_tokenizer(sidecar, tok) is False and same_tokenizer(sidecar, ta_tok) is True
    enc = encode(tok, [TEXT], 64)
    assert enc.input_ids.shape[1] != ta_tok(TEXT, return_tensors="pt")["input_ids"].shape[1]
    w = CrossTokenizerTAWeights(ta, ta_tok, "max")(row_text_batch(tok, enc.input_ids, enc.attention_mask))
    assert w.shape == (1, enc.input_ids.shape[1] - 1)

    # Each target token's weight is the max over the φ tokens its characters overlap.
    phi = ta_tok(TEXT, return_offsets_mapping=True, return_tensors="pt")
    w_phi = ta(phi["input_ids"], phi["attention_mask"])[0].detach()  # (S,)
    src = [tuple(s) for s in phi["offset_mapping"][0].tolist()]
    for t, (a, b) in enumerate(tok(TEXT, return_offsets_mapping=True)["offset_mapping"][1:]):
        overlapping = [w_phi[s] for s, (c, d) in enumerate(src) if d > c and a < d and b > c]
        assert torch.isclose(w[0, t], torch.stack(overlapping).max(), atol=1e-6)

    # End to end: `align: auto` sees another tokenizer and maps; the update learns and publishes.
    write_jsonl(tmp_path / "data/a.jsonl", facts("c", 6))
    res = update(make_recipe(tmp_path, tiny_lm_dir, "weights.method=taalm", f"weights.ta_path={ta_dir}"))
    assert res.exit_code == ExitCode.OK
    w_means = [m["w_mean"] for m in read_metrics(tmp_path / "out") if m["event"] == "step"]
    assert all(0.05 < x < 0.99 for x in w_means), w_means  # uniform would be 1.0
