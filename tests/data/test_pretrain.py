"""Pretraining a micro model on a micro world: it learns, saves, reloads, and caches."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import ckl_toolkit.data.pretrain as pretrain_mod
from ckl_toolkit.core.io import read_jsonl
from ckl_toolkit.core.text import encode, object_target_mask
from ckl_toolkit.data.pretrain import PretrainConfig, cache_key, is_cached, knowledge, lr_at, pretrain
from ckl_toolkit.data.tokenizer import train_bpe_tokenizer
from ckl_toolkit.data.world import WorldConfig, build_world, write_world

MICRO = PretrainConfig(
    vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_len=64,
    batch_size=8, lr=5e-3, warmup_steps=5, max_steps=40, threads=1, eval_facts=40,
)  # fmt: skip


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    cfg = WorldConfig(
        seed=7, n_entities=30, to_learn=6, meta_pairs=12, meta_val_pairs=3, nf_candidates=20,
        filler_sentences=3, pretrain_passes=3, n_cities=8, n_companies=8, n_languages=4, n_jobs=6, n_years=8,
    )  # fmt: skip
    return write_world(build_world(cfg), tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def model_dir(world_dir, tmp_path_factory):
    return pretrain(world_dir, tmp_path_factory.mktemp("base") / "model", MICRO, progress=False)


def test_loss_drops(model_dir):
    losses = [r["loss"] for r in read_jsonl(model_dir / "metrics.jsonl") if "loss" in r]
    assert losses[0] > 5.0  # ~ln(320) at initialisation
    assert losses[-1] < losses[0] - 1.0


def test_saved_dir_reloads_with_identical_logits_and_scores(model_dir, world_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    report = json.loads((model_dir / "pretrain_report.json").read_text())
    # A model built from the config with the raw tensors gives the same logits (tied head included).
    raw = LlamaForCausalLM(model.config)
    raw.load_state_dict(load_file(model_dir / "model.safetensors"), strict=False)
    raw.tie_weights()
    ids = torch.tensor([tok("Somebody was born in")["input_ids"]])
    torch.testing.assert_close(model(input_ids=ids).logits, raw(input_ids=ids).logits, rtol=0, atol=0)
    # Scores measured in memory before saving are reproduced exactly from the files.
    facts = pretrain_mod.eval_sample(read_jsonl(world_dir / "pretrain_facts.jsonl"), MICRO)
    again = knowledge(model, tok, facts)
    assert (again["em_seen"], again["em_heldout"]) == (report["em_seen"], report["em_heldout"])
    assert report["n_params"] == sum(p.numel() for p in model.parameters())


def test_cache_returns_without_retraining(model_dir, world_dir, monkeypatch):
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(pretrain_mod, "_train_and_save", boom)
    assert pretrain(world_dir, model_dir, replace(MICRO, threads=2), progress=False) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    other = replace(MICRO, max_steps=41)
    assert not is_cached(model_dir, cache_key(world_dir, other))
    with pytest.raises(AssertionError, match="retrained"):
        pretrain(world_dir, model_dir, other, progress=False)


def test_same_seed_gives_the_same_weights(world_dir, tmp_path):
    cfg = replace(MICRO, max_steps=6, eval_facts=4)
    a, b = (pretrain(world_dir, tmp_path / n, cfg, progress=False) for n in "ab")
    c = pretrain(world_dir, tmp_path / "c", replace(cfg, seed=1), progress=False)
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_tokenizer_offsets_mark_exactly_the_object_tokens(world_dir, tmp_path):
    texts = [r["text"] for r in read_jsonl(world_dir / "pretrain.jsonl")]
    tok = train_bpe_tokenizer(texts, 320, out_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    rows = read_jsonl(world_dir / "to_learn.jsonl") + read_jsonl(world_dir / "not_to_forget_candidates.jsonl")
    probes, objects = [r["task_descriptive"] for r in rows], [r["object"] for r in rows]
    for t in (tok, loaded):
        enc = encode(t, probes, 64)
        assert (enc.input_ids[:, 0] == t.bos_token_id).all()
        mask = object_target_mask(enc, probes, objects, which="last")  # (B, T-1)
        for b, obj in enumerate(objects):
            # With a tiny vocabulary the space can be a token of its own, which is not the object's.
            assert t.decode(enc.input_ids[b, 1:][mask[b]]) in (obj, " " + obj)
            n_real = int(enc.attention_mask[b].sum())
            assert mask[b].nonzero().max() == n_real - 2  # the object is the probe's last token span


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    cfg = replace(MICRO, lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kw, field",
    [({"hidden_size": 33}, "hidden_size"), ({"lr": 0.0}, "lr"), ({"warmup_steps": 40}, "warmup_steps")],
)
def test_validation_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"pretrain\.{field}="):
        replace(MICRO, **kw)
