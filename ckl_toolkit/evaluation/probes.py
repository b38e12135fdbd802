"""Probe scoring (ARCHITECTURE.md §6): teacher-force the probe, argmax at each object token.

A fact's token accuracy is the fraction of its object tokens (last occurrence in the probe) that the
model predicts exactly; exact match (EM) is 1 when all of them are right. The same pass also sums
the NLL of every target token of the probes, for the whole-probe (e.g. whole-triple) perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ckl_toolkit.core.losses import target_mask, token_nll_from_logits
from ckl_toolkit.core.text import encode, object_target_mask


@dataclass
class ProbeScores:
    """Per-fact scores, each a list aligned with the probes."""

    token_acc: list[float]
    exact: list[bool]
    object_nll: list[float]  # mean NLL of the object tokens, in nats (NaN: object not found)
    token_nll_sum: float = 0.0  # NLL summed over every target token of every probe (all but the first)
    tokens: int = 0  # how many target tokens that sum covers

    @property
    def acc(self) -> float:
        return sum(self.token_acc) / max(len(self.token_acc), 1)

    @property
    def em(self) -> float:
        return sum(self.exact) / max(len(self.exact), 1)

    @property
    def nll(self) -> float:
        return sum(self.object_nll) / max(len(self.object_nll), 1)

    @property
    def found_object_nll(self) -> list[float]:
        """Object NLLs of the probes whose object was found (the others have no object tokens)."""
        return [x for x in self.object_nll if not math.isnan(x)]

    @property
    def ppl(self) -> float:
        """Corpus perplexity exp(Σ NLL / #tokens) over every target token of every probe."""
        return math.exp(min(self.token_nll_sum / max(self.tokens, 1), 700.0))


@torch.no_grad()
def score_probes(
    model: torch.nn.Module,
    tokenizer,
    probes: list[str],
    objects: list[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> ProbeScores:
    """Score each (probe, object) pair; the object must occur in its probe."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    acc, exact, nll_out = [], [], []
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(probes), batch_size):
        texts, objs = probes[i : i + batch_size], objects[i : i + batch_size]
        enc = encode(tokenizer, texts, max_length).to(device)
        obj_mask = object_target_mask(enc, texts, objs, which="last").to(device)  # (B, T-1)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        nll = token_nll_from_logits(logits, enc.input_ids, enc.attention_mask)  # (B, T-1), 0 on padding
        tokens = target_mask(enc.attention_mask)  # (B, T-1)
        total_nll += float(nll[tokens].sum())
        total_tokens += int(tokens.sum())
        correct = logits[:, :-1].argmax(-1) == enc.input_ids[:, 1:]  # (B, T-1)
        for b in range(len(texts)):
            m = obj_mask[b]
            n = int(m.sum())
            if n == 0:  # object truncated away or absent: counts as wrong, never silently skipped
                acc.append(0.0)
                exact.append(False)
                nll_out.append(float("nan"))
                continue
            c = correct[b][m]
            acc.append(float(c.float().mean()))
            exact.append(bool(c.all()))
            nll_out.append(float(nll[b][m].mean()))
    model.train(was_training)
    return ProbeScores(acc, exact, nll_out, total_nll, total_tokens)
