"""One batching policy: windows (never truncation), packing, exact resume from a cursor, epoch order."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ckl_toolkit.core.documents import Document
from ckl_toolkit.training.batching import BatchStats, Cursor, batches, epoch_documents


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level with no merges: one token per UTF-8 byte, so lengths are known exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


TEXTS = ["short", "exactly8", "a document of twenty", "x", "nineteen characters", "ok"]


def documents(texts: list[str]) -> list[Document]:
    return [Document(f"d{i}", t, "s.jsonl", i + 1) for i, t in enumerate(texts)]


class CountingTokenizer:
    """A tokenizer that records which texts it was asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts):
        self.seen.extend(texts)
        return self.tokenizer(texts)


def real_rows(out) -> list[list[int]]:
    return [ids[m.bool()].tolist() for b in out for ids, m in zip(b.input_ids, b.attention_mask)]


def test_padded_batches_split_long_documents_into_windows(tokenizer):
    stats = BatchStats()
    out = list(batches(documents(TEXTS), tokenizer, max_length=8, batch_size=3, stats=stats))
    expected = [ids[i : i + 8] for ids in tokenizer(TEXTS)["input_ids"] for i in range(0, len(ids), 8)]
    assert real_rows(out) == expected  # every token, in order, one document per row: nothing truncated
    assert stats.split_docs == 2 and stats.tokens == sum(len(t) for t in TEXTS)
    assert out[0].input_ids.shape == (3, 8) and out[0].input_ids.dtype == torch.long
    assert [[d.id for d in r] for r in out[0].rows] == [["d0"], ["d1"], ["d2"]]
    assert [d.id for d in out[0].completed] == ["d0", "d1"]  # d2 continues in the next batch
    assert [d.id for b in out for d in b.completed] == [f"d{i}" for i in range(6)]
    assert (out[-1].input_ids[out[-1].attention_mask == 0] == tokenizer.pad_token_id).all()


def test_packed_batches_fill_rows_with_eos_between_documents(tokenizer):
    out = list(batches(documents(TEXTS), tokenizer, max_length=8, batch_size=2, pack=True))
    flat = torch.cat([b.input_ids[b.attention_mask.bool()] for b in out]).tolist()
    assert flat == [t for ids in tokenizer(TEXTS)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    masks = torch.cat([b.attention_mask for b in out])
    assert masks[:-1].all() and masks.shape[1] == 8  # only the very last row is short


@pytest.mark.parametrize("pack", [False, True])
def test_batches_resume_exactly_after_any_batch_without_retokenising(tokenizer, pack):
    docs = documents(TEXTS * 2)
    full_stats = BatchStats()
    full = list(batches(docs, tokenizer, 8, 2, pack=pack, stats=full_stats))
    assert len(full) > 4
    for k, done in enumerate(full):
        saved = Cursor.from_json(json.loads(json.dumps(done.cursor.to_json())))
        counting = CountingTokenizer(tokenizer)
        rest = list(batches(docs, counting, 8, 2, pack=pack, start=saved))
        assert len(rest) == len(full) - k - 1
        for a, b in zip(rest, full[k + 1 :]):
            assert torch.equal(a.input_ids, b.input_ids) and a.cursor == b.cursor
            assert [[d.id for d in r] for r in a.rows] == [[d.id for d in r] for r in b.rows]
            assert [d.id for d in a.completed] == [d.id for d in b.completed]
        assert len(counting.seen) == len(docs) - saved.docs  # nothing before the cursor is tokenised


def test_epoch_order_is_arrival_a_seeded_shuffle_or_a_mix_review_draw():
    new, pool = documents(TEXTS), [Document(f"p{i}", f"old {i}", "p.jsonl", i + 1) for i in range(20)]
    same, ratio = epoch_documents(new, pool, 0.0, 0.7, 0, 0, None)
    assert [d.id for d in same] == [d.id for d in new] and ratio == 0.0
    shuffled, _ = epoch_documents(new, pool, 0.0, 0.7, 0, 0, "k")
    assert sorted(d.id for d in shuffled) == sorted(d.id for d in new) and shuffled != same
    assert epoch_documents(new, pool, 0.0, 0.7, 0, 0, "k")[0] == shuffled  # seeded: the same again
    mixed, ratio = epoch_documents(new, pool, 2.0, 0.5, 0, 1, None)
    assert ratio == 1.0 and len(mixed) == len(new) + 6
    assert sum(d.id.startswith("p") for d in mixed) == 6


# ---------------------------------------------------------------------------------------------
# Packing isolation: a packed document attends to itself only, so its loss is its loss alone


PACKED = [
    "Ada Lovelace was born in London .",
    "Alan Turing works for Bletchley Park .",
    "Grace Hopper lives in New York .",
]


def _per_document_nll(model, batch, chunk: int, isolate: bool = True) -> list[torch.Tensor]:
    """Each document's per-token NLL (its own targets only), read off the batch's rows in order."""
    from ckl_toolkit.core.losses import target_mask, token_nll

    with torch.no_grad():
        positions = batch.position_ids if isolate else None
        nll = token_nll(model, batch.input_ids, batch.attention_mask, positions, chunk)
    real = target_mask(batch.attention_mask, batch.position_ids)
    pos = batch.position_ids if batch.position_ids is not None else batch.attention_mask.cumsum(1) - 1
    out = []
    for b in range(nll.size(0)):
        starts = [t for t in range(pos.size(1)) if pos[b, t] == 0 and batch.attention_mask[b, t]]
        ends = starts[1:] + [int(batch.attention_mask[b].sum())]
        out += [nll[b, s : e - 1][real[b, s : e - 1]] for s, e in zip(starts, ends)]
    return out


@pytest.mark.parametrize("kind", ["sdpa", "eager", "lora", "kadapter"])
def test_a_packed_document_has_the_loss_it_has_alone(tiny_lm_dir, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckl_toolkit.core.models import LoraSpec, add_lora
    from ckl_toolkit.training.kadapter import KAdapterConfig, KAdapterModel

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    attn = "eager" if kind == "eager" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation=attn)
    if kind == "lora":
        model = add_lora(model, LoraSpec(r=4))
    elif kind == "kadapter":
        model = KAdapterModel(model, KAdapterConfig(adapter_hidden=16, dropout=0.0))
        torch.nn.init.normal_(model.adapter.fuse_norm.weight, std=0.5)
    model.eval()
    docs = [Document(f"p{i}", t, "s", i + 1) for i, t in enumerate(PACKED)]
    alone = next(batches(docs, tok, 64, 3, pack=False))
    packed = next(batches(docs, tok, 64, 3, pack=True))
    assert packed.input_ids.shape[0] == 1 and packed.position_ids is not None  # all three in one row
    got = _per_document_nll(model, packed, 8)[: len(docs)]
    want = _per_document_nll(model, alone, 8)
    for g, w in zip(got, want):
        # packed: one more target per document (the EOS that ends it); the shared ones are equal
        torch.testing.assert_close(g[: len(w)], w, rtol=0, atol=1e-5)
    leaky = _per_document_nll(model, packed, 8, isolate=False)[1]  # without positions B reads A
    assert not torch.allclose(leaky[: len(want[1])], want[1], atol=1e-3)


def test_packed_rows_restart_positions_per_document(tokenizer):
    batch = next(batches(documents(["abc", "de", "fghij"]), tokenizer, 8, 4, pack=True))
    # "abc<eos>de<eos>" | "fghij<eos>": positions restart for every document and at each row
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6, 7]]
    from ckl_toolkit.core.losses import target_mask

    real = target_mask(batch.attention_mask, batch.position_ids)
    assert real[0].tolist() == [True, True, True, False, True, True, False]  # "d", "f" start documents
    assert next(batches(documents(["abc"]), tokenizer, 8, 4, pack=False)).position_ids is None


def test_train_attention_weights_of_a_packed_document_are_its_weights_alone(tiny_lm_dir):
    from transformers import AutoTokenizer

    from ckl_toolkit.core.ta_model import build_ta_model
    from ckl_toolkit.core.text import Encoded
    from ckl_toolkit.training.weighers import TextBatch, TrainAttentionWeights

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    ta = build_ta_model(tiny_lm_dir)
    torch.nn.init.normal_(ta.head.weight, std=1.0)  # weights that depend on the context
    weigh = TrainAttentionWeights(ta)
    docs = [Document(f"p{i}", t, "s", i + 1) for i, t in enumerate(PACKED)]

    def per_document(batch) -> list[torch.Tensor]:
        w = weigh(TextBatch(Encoded(batch.input_ids, batch.attention_mask, [], batch.position_ids), []))
        pos = batch.position_ids if batch.position_ids is not None else batch.attention_mask.cumsum(1) - 1
        out = []
        for b in range(w.size(0)):
            n = int(batch.attention_mask[b].sum())
            starts = [t for t in range(n) if pos[b, t] == 0] + [n]
            out += [w[b, s : e - 1] for s, e in zip(starts, starts[1:])]  # targets of each document
        return out

    alone = per_document(next(batches(docs, tok, 64, 3, pack=False)))
    packed = per_document(next(batches(docs, tok, 64, 3, pack=True)))
    for a, p in zip(alone, packed):
        torch.testing.assert_close(p[: len(a)], a, rtol=0, atol=1e-5)
