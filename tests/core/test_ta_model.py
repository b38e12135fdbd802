import torch
from transformers import AutoTokenizer

from ckl_toolkit.core.ta_model import HEAD_BIAS_INIT, build_ta_model, load_ta_model, save_ta_model
from ckl_toolkit.core.text import encode


def test_ta_weights_shape_range_and_initial_value(tiny_lm_dir):
    ta = build_ta_model(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    enc = encode(tok, ["Ada Lovelace was born in London .", "Paris"], 32)
    w = ta(enc.input_ids, enc.attention_mask)
    assert w.shape == enc.input_ids.shape
    assert torch.all((w > 0) & (w < 1))
    # head weight 0 and bias 4: every token starts at sigma(4)
    torch.testing.assert_close(w, torch.full_like(w, torch.sigmoid(torch.tensor(HEAD_BIAS_INIT)).item()))


def test_first_k_layers(tiny_lm_dir):
    ta = build_ta_model(tiny_lm_dir, num_layers=1)
    assert len(ta.trunk.layers) == 1
    full = build_ta_model(tiny_lm_dir)
    # the kept layer carries the pretrained weights, not a fresh init
    torch.testing.assert_close(ta.trunk.layers[0].mlp.up_proj.weight, full.trunk.layers[0].mlp.up_proj.weight)


def test_save_load_bit_identical(tiny_lm_dir, tmp_path):
    ta = build_ta_model(tiny_lm_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # make the head non-trivial so a load that drops it would be caught
        ta.head.weight.normal_()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    out = save_ta_model(ta, tmp_path / "ta", tok, recipe_hash="abc")
    back = load_ta_model(out)
    sd1, sd2 = ta.state_dict(), back.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    enc = encode(tok, ["Grace Hopper speaks English ."], 32)
    assert torch.equal(ta(enc.input_ids, enc.attention_mask), back(enc.input_ids, enc.attention_mask))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()


def test_load_rejects_non_ta_dir(tiny_lm_dir):
    import pytest

    with pytest.raises(FileNotFoundError, match="ta_config.json"):
        load_ta_model(tiny_lm_dir)
