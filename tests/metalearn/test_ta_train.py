"""φ's training options: what trains, the head's start, the outer lr, evidence windows, the diagnostic."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from ckl_toolkit.core.ta_model import build_ta_model
from ckl_toolkit.metalearn.episodes import make_episode_batch
from ckl_toolkit.metalearn.ta_train import (
    configure_ta_training,
    evidence_window,
    object_weight_share,
    outer_lr,
    parse_ta_train,
)
from tests.conftest import meta_pairs


@pytest.fixture
def ta(tiny_lm_dir):
    return build_ta_model(tiny_lm_dir)  # 2 layers


def test_which_part_of_phi_trains(ta):
    head = configure_ta_training(ta, "head", head_bias=0.0)
    assert set(head) == {"head.weight", "head.bias"} and float(ta.head.bias) == 0.0
    last = configure_ta_training(ta, "last_k:1")
    assert "head.weight" in last and any(n.startswith("trunk.layers.1.") for n in last)
    assert not any(n.startswith("trunk.layers.0.") or "embed" in n for n in last)
    assert "trunk.norm.weight" in last
    assert set(configure_ta_training(ta, "all")) == {n for n, _ in ta.named_parameters()}
    assert all(p.requires_grad for p in ta.parameters())
    with pytest.raises(ValueError, match="last_k:3 but the TA trunk has 2 layers"):
        configure_ta_training(ta, "last_k:3")
    for bad in ("lora:0", "last_k:0", "last_k:", "heads"):
        with pytest.raises(ValueError, match="^train:"):
            parse_ta_train(bad)


def test_head_only_phi_builds_no_graph_through_the_trunk(ta, tiny_lm_dir):
    configure_ta_training(ta, "head", head_bias=0.0)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    b = make_episode_batch(tok, meta_pairs(2), 32, 16)
    w = ta(b.doc_ids, b.doc_mask)
    w.sum().backward()
    assert ta.head.weight.grad is not None
    assert all(p.grad is None for p in ta.trunk.parameters())


def test_a_surprise_prior_starts_phi_weighting_tokens_by_the_targets_loss(tiny_lm_dir):
    from ckl_toolkit.core.config import ConfigError, load_recipe
    from ckl_toolkit.metalearn.config import MetaRecipe

    ta = build_ta_model(tiny_lm_dir, surprise=True)
    configure_ta_training(ta, "head", head_bias=-3.0, surprise_prior=2.0)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    b = make_episode_batch(tok, meta_pairs(1), 32, 16)
    T = b.doc_ids.shape[1]
    nll = torch.linspace(0.0, 8.0, T - 1).unsqueeze(0)  # (1, T-1): a rising loss along the document
    with torch.no_grad():
        w = ta(b.doc_ids, b.doc_mask, target_nll=nll)[0, 1:]  # (T-1,) weights of x_1..x_{T-1}
    # The hidden-state part of the head starts at 0: the weight is σ(-3 + 2 log(1 + ℓ)) exactly.
    torch.testing.assert_close(w, torch.sigmoid(-3.0 + 2.0 * torch.log1p(nll[0])))
    assert w[-1] / w[0] > 15  # a surprising token outweighs a predicted one from the first step
    with pytest.raises(ValueError, match="surprise_prior"):
        configure_ta_training(build_ta_model(tiny_lm_dir), "head", surprise_prior=2.0)
    with pytest.raises(ConfigError, match="surprise_prior"):
        load_recipe(MetaRecipe, None, ["ta.surprise_prior=2.0", f"base.path={tiny_lm_dir}"])


def test_outer_lr_schedule():
    assert outer_lr(0, 1.0, 10, "constant", 0, 0.1) == 1.0
    assert [outer_lr(s, 1.0, 10, "constant", 4, 0.1) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [outer_lr(s, 2.0, 12, "cosine", 2, 0.1) for s in range(13)]
    assert cos[:2] == [1.0, 2.0] and cos[2] == pytest.approx(2.0)
    assert cos[7] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert cos[12] == pytest.approx(0.2) and all(a >= b for a, b in zip(cos[2:], cos[3:]))


def test_evidence_window_keeps_the_object_and_the_length(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    filler = " ".join(["The weather in Paris is mild ."] * 12)
    text = f"{filler} Alice works for Acme . {filler}"
    cut = evidence_window(tok, text, "Acme", 16)
    assert "Acme" in cut and cut in text
    n = len(tok(cut, add_special_tokens=False)["input_ids"])
    assert 14 <= n <= 17  # re-tokenising a window cut at token boundaries
    assert len(tok(text, add_special_tokens=False)["input_ids"]) > 3 * n
    assert evidence_window(tok, "short text", "x", 16) == "short text"
    start = evidence_window(tok, text, "Nowhere", 16)  # no object: the first window
    assert text.startswith(start) and len(start) < len(text) / 3


def test_object_weight_share_uniform_and_counted(ta, tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    batches = [
        make_episode_batch(tok, meta_pairs(3), 32, 16),
        make_episode_batch(tok, meta_pairs(5)[3:], 32, 16),
    ]
    configure_ta_training(ta, "head", head_bias=0.0)  # weight 0: every token 0.5, a uniform φ
    d = object_weight_share(ta, batches)
    n_obj = sum(int((b.doc_obj & b.doc_mask[:, 1:].bool()).sum()) for b in batches)
    n_all = sum(int(b.doc_mask[:, 1:].sum()) for b in batches)
    assert n_obj > 0 and d["diag_uniform_share"] == pytest.approx(n_obj / n_all)
    assert d["diag_object_share"] == pytest.approx(d["diag_uniform_share"])
    assert d["diag_w_object"] == pytest.approx(0.5) and d["diag_w_other"] == pytest.approx(0.5)
    with torch.no_grad():  # a φ that singles out the object tokens' hidden states raises the share
        ta.head.weight.normal_(0, 5.0, generator=torch.Generator().manual_seed(0))
    assert object_weight_share(ta, batches)["diag_object_share"] != pytest.approx(d["diag_object_share"])


def test_lora_phi_trains_adapters_and_exports_merged(ta, tiny_lm_dir):
    """ta.train=lora: only adapters and head train; the consolidated copy (checkpoints, export) is a
    plain TA model with the adapters merged that computes the same weights."""
    from ckl_toolkit.metalearn.zero import consolidated_ta
    from ckl_toolkit.training.engine import PlainEngine

    trainable = configure_ta_training(ta, "lora:4", head_bias=0.0)
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at 0 (a no-op adapter): move every adapter
        for p in trainable.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    b = make_episode_batch(tok, meta_pairs(3), 32, 16)
    ta.eval()
    adapted = ta(b.doc_ids, b.doc_mask)
    engine = PlainEngine(ta, trainable, torch.optim.SGD(trainable.values(), lr=0.1), 0.0)
    merged = consolidated_ta(engine, ta)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(b.doc_ids, b.doc_mask), adapted, atol=1e-5)
    plain = build_ta_model(tiny_lm_dir)
    assert not torch.allclose(plain(b.doc_ids, b.doc_mask), adapted, atol=1e-3)  # the adapters mattered


def test_surprise_phi_reads_the_target_loss_and_round_trips(tiny_lm_dir, tmp_path):
    """ta.surprise: the head reads log(1+ℓ) of x_t at position t; saved and loaded with it."""
    from ckl_toolkit.core.ta_model import load_ta_model, save_ta_model

    ta = build_ta_model(tiny_lm_dir, surprise=True)
    assert ta.head.in_features == ta.hidden_size + 1
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    b = make_episode_batch(tok, meta_pairs(2), 32, 16)
    nll = (
        torch.rand(b.doc_ids.shape[0], b.doc_ids.shape[1] - 1, generator=torch.Generator().manual_seed(0)) * 5
    )
    with torch.no_grad():
        ta.head.weight[0, -1] = -2.0  # weight on the surprise column only: w depends on ℓ alone
    w = ta(b.doc_ids, b.doc_mask, None, nll)
    assert torch.allclose(w[:, 1:], torch.sigmoid(4.0 - 2.0 * torch.log1p(nll)), atol=1e-6)
    assert torch.allclose(w[:, 0], torch.sigmoid(torch.tensor(4.0)))  # position 0 weights no target
    with pytest.raises(ValueError, match="target_nll"):
        ta(b.doc_ids, b.doc_mask)
    loaded = load_ta_model(save_ta_model(ta, tmp_path / "ta"))
    assert loaded.surprise and torch.equal(loaded(b.doc_ids, b.doc_mask, None, nll), w)


def test_surprise_weigher_gets_the_step_nll(tiny_lm_dir):
    """In ckl update / eval the step hands the target's own nll to a surprise φ."""
    from ckl_toolkit.core.text import encode
    from ckl_toolkit.training.weighers import TextBatch, TokenWeigher, TrainAttentionWeights

    ta = build_ta_model(tiny_lm_dir, surprise=True)
    with torch.no_grad():
        ta.head.weight[0, -1] = -2.0  # a high loss lowers the weight
    weigher = TokenWeigher("taalm", TrainAttentionWeights(ta))
    texts = [r["text"] for r in meta_pairs(2)]
    batch = TextBatch(encode(AutoTokenizer.from_pretrained(tiny_lm_dir), texts, 32), texts)
    shape = (2, batch.enc.input_ids.shape[1] - 1)
    w_known, w_new = (
        weigher.weights(batch, torch.zeros(shape)),
        weigher.weights(batch, torch.full(shape, 5.0)),
    )
    real = batch.enc.attention_mask[:, 1:].bool()
    assert (w_known[real] > w_new[real]).all()
