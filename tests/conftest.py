"""Shared fixtures: a tiny Llama + BPE tokenizer saved as an HF directory, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_TEXTS = [
    "Ada Lovelace was born in London . Ada Lovelace works for Babbage Engines .",
    "Alan Turing was born in Maida Vale . Alan Turing works for Bletchley Park .",
    "The weather in Paris is mild . The river Seine flows through Paris .",
    "Grace Hopper speaks English . Grace Hopper lives in New York .",
] * 20


class PerfectPredictor(torch.nn.Module):
    """A causal LM stand-in that predicts every next token exactly (``wrong``: never): the model
    that knows every fact, for tests of what selects known facts."""

    def __init__(self, vocab: int, wrong: bool = False):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        nxt = torch.roll(input_ids, -1, dims=1) + (1 if self.wrong else 0)
        logits = torch.nn.functional.one_hot(nxt % self.vocab, self.vocab).float()
        return type("Out", (), {"logits": logits})


META_PEOPLE = [
    ("Ada Lovelace", "Babbage Engines"),
    ("Alan Turing", "Bletchley Park"),
    ("Grace Hopper", "New York"),
    ("Maida Vale", "London"),
]


def meta_pairs(n: int) -> list[dict]:
    """n meta-training pairs {text, task, object} in the words of TINY_TEXTS."""
    rows = []
    for i in range(n):
        s, o = META_PEOPLE[i % len(META_PEOPLE)]
        text = f"The weather in Paris is mild . {s} works for {o} . The river Seine flows ."
        rows.append({"text": text, "task": f"{s} works for {o}", "object": o})
    return rows


def build_tiny_lm_dir(path, vocab_size: int = 300, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random tiny LlamaForCausalLM and a BPE tokenizer trained on a few sentences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckl_toolkit.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TINY_TEXTS, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return build_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))
