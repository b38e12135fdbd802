from transformers import AutoTokenizer

from ckl_toolkit.core.text import char_spans, encode, object_target_mask


def test_char_spans_all_and_last():
    assert char_spans("a Paris b Paris", "Paris") == [(2, 7), (10, 15)]
    assert char_spans("a Paris b Paris", "Paris", "last") == [(10, 15)]
    assert char_spans("nothing", "Paris") == []


def test_object_mask_marks_exactly_the_object_tokens(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    texts = ["Ada Lovelace works for Babbage Engines .", "Alan Turing was born in Maida Vale"]
    objects = ["Babbage Engines", "Maida Vale"]
    enc = encode(tok, texts, 64)
    mask = object_target_mask(enc, texts, objects, "last")  # (B, T-1) over targets
    for b, obj in enumerate(objects):
        ids = enc.input_ids[b, 1:][mask[b]]
        assert tok.decode(ids).strip() == obj
        # nothing outside: the decoded rest has no part of the object
        rest = tok.decode(enc.input_ids[b, 1:][~mask[b] & enc.attention_mask[b, 1:].bool()])
        assert obj not in rest


def test_object_mask_last_occurrence_only(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    text = "seen in Paris and in Paris"  # both occurrences follow a space: same tokens
    enc = encode(tok, [text], 32)
    n_all = int(object_target_mask(enc, [text], ["Paris"], "all").sum())
    n_last = int(object_target_mask(enc, [text], ["Paris"], "last").sum())
    assert n_all == 2 * n_last > 0
