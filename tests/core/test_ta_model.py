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


def _random_head(ta):
    torch.manual_seed(1)
    with torch.no_grad():
        ta.head.weight.normal_()
    return ta


def test_echo_weights_read_the_whole_document(tiny_lm_dir):
    """ta.echo: the weight of token 1 changes when a later token does (a causal read cannot), and it
    is exactly φ's weight at that token's second copy in "D D"."""
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    enc = encode(tok, ["Ada Lovelace was born in London ."], 32)
    ids, mask = enc.input_ids, enc.attention_mask
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % tok.vocab_size
    causal = _random_head(build_ta_model(tiny_lm_dir))
    echo = _random_head(build_ta_model(tiny_lm_dir, echo=True))
    assert torch.equal(causal(ids, mask)[0, 1], causal(later, mask)[0, 1])
    assert (echo(ids, mask)[0, 1] - echo(later, mask)[0, 1]).abs() > 1e-6
    n = ids.shape[1]
    twice = torch.cat([ids, ids], dim=1)  # (1, 2n)
    w_twice = causal(twice, torch.ones_like(twice))[0, n:]  # the same trunk and head, read causally
    torch.testing.assert_close(echo(ids, mask)[0], w_twice)


def test_echo_padded_and_packed_rows_match_one_document_per_row(tiny_lm_dir):
    """Padding never reaches a real token, and packed documents (position_ids restarting at 0) are
    echoed each to itself: the weights equal those of each document alone."""
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ta = _random_head(build_ta_model(tiny_lm_dir, echo=True))
    texts = ["Ada Lovelace was born in London .", "Paris", "Grace Hopper speaks English ."]
    alone = [ta(e.input_ids, e.attention_mask)[0] for e in (encode(tok, [t], 32) for t in texts)]
    enc = encode(tok, texts, 32)  # one document per row, padded at the end
    w = ta(enc.input_ids, enc.attention_mask)
    for b, ref in enumerate(alone):
        torch.testing.assert_close(w[b, : ref.shape[0]], ref)
    ids = [encode(tok, [t], 32).input_ids[0] for t in texts]
    row = torch.cat(ids).unsqueeze(0)  # (1, ΣT): all three packed in one row
    pos = torch.cat([torch.arange(len(x)) for x in ids]).unsqueeze(0)
    w_packed = ta(row, torch.ones_like(row), pos)[0]
    torch.testing.assert_close(w_packed, torch.cat(alone))


def test_echo_survives_save_and_load(tiny_lm_dir, tmp_path):
    ta = _random_head(build_ta_model(tiny_lm_dir, echo=True))
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    back = load_ta_model(save_ta_model(ta, tmp_path / "ta", tok))
    assert back.echo
    enc = encode(tok, ["Grace Hopper speaks English ."], 32)
    assert torch.equal(ta(enc.input_ids, enc.attention_mask), back(enc.input_ids, enc.attention_mask))


def test_echo_names_the_position_limit(tiny_lm_dir):
    """A document whose echo is longer than the trunk's positions fails naming the field to change."""
    import pytest

    ta = build_ta_model(tiny_lm_dir, echo=True)  # max_position_embeddings 512
    ids = torch.randint(0, 300, (1, 300))
    with pytest.raises(ValueError, match="ta.echo: a document of 300 tokens is read as 600.*max_length"):
        ta(ids, torch.ones_like(ids))
    assert ta(ids[:, :256], torch.ones_like(ids[:, :256])).shape == (1, 256)
    # short documents in long padded rows are not long documents: the padding does not count
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[0, :10], mask[1, :8] = 1, 1
    short = ta(ids.repeat(2, 1), mask)
    torch.testing.assert_close(short[0, :10], ta(ids[:, :10], torch.ones_like(ids[:, :10]))[0])
