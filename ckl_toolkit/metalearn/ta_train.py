"""How φ trains (README "Meta-training"): which part of it, its head's start, the outer lr, evidence
windows, and the held-out diagnostic.

Why head-only can work: with the normalised loss Σwℓ/Σw only relative weights matter, so a head at
bias 0 still starts uniform (weight 0: every token σ(0) = 0.5) but on the steep part of the sigmoid,
where a step of the head moves w 4× more than at the default bias 4 (σ'(0) = 0.25 vs σ'(4) ≈ 0.018).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ckl_toolkit.core.losses import token_nll
from ckl_toolkit.core.text import char_spans
from ckl_toolkit.metalearn.episodes import EpisodeBatch

TA_TRAIN = re.compile(r"^(head|all|lora|last_k:(\d+)|lora:(\d+))$")
LORA_R = 8  # ta.train=lora: rank 8, alpha 2r, every linear layer of the trunk
PEFT_PREFIX = "trunk.base_model.model."  # where peft puts the trunk's own names


def parse_ta_train(spec: str) -> tuple[str, int]:
    """('head'|'all', 0), ('last_k', K) or ('lora', r); ValueError 'train: ...' otherwise."""
    m = TA_TRAIN.match(str(spec))
    k = m and (m.group(2) or m.group(3))
    if not m or (k is not None and int(k) < 1):
        raise ValueError(f"train: 'head', 'last_k:K', 'lora', 'lora:R' (K, R >= 1) or 'all', got {spec!r}")
    if m.group(1).startswith("lora"):
        return "lora", int(m.group(3)) if m.group(3) else LORA_R
    return ("last_k", int(k)) if m.group(2) else (m.group(1), 0)


def configure_ta_training(
    ta: nn.Module, spec: str, head_bias: float | None = None, surprise_prior: float = 0.0
) -> dict[str, nn.Parameter]:
    """Freeze what ``spec`` leaves out and set the head's bias; returns φ's trainable parameters.

    ``surprise_prior``: the head's initial weight on its last input, log(1 + ℓ) of a surprise φ.

    head: only the hidden->1 head (the trunk runs without a graph). last_k:K: the trunk's last K
    layers, its final norm, and the head. lora / lora:R: LoRA adapters (rank R, alpha 2R) on every
    linear layer of the trunk, and the head; checkpoints and the export hold φ merged
    (:func:`merge_lora_state`), an ordinary TA model. all: everything.
    """
    kind, k = parse_ta_train(spec)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        ta.requires_grad_(False)
        ta.trunk = get_peft_model(ta.trunk, LoraConfig(r=k, lora_alpha=2 * k, target_modules="all-linear"))
    if head_bias is not None:
        with torch.no_grad():
            ta.head.bias.fill_(head_bias)
    if surprise_prior:
        if not getattr(ta, "surprise", False):
            raise ValueError("surprise_prior: this TA model reads no loss (build it with surprise=True)")
        with torch.no_grad():
            ta.head.weight[0, -1] = surprise_prior
    if kind != "lora":
        ta.requires_grad_(kind == "all")
    ta.head.requires_grad_(True)
    if kind == "last_k":
        layers = ta.trunk.layers
        if k > len(layers):
            raise ValueError(f"train: last_k:{k} but the TA trunk has {len(layers)} layers")
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)
        if getattr(ta.trunk, "norm", None) is not None:
            ta.trunk.norm.requires_grad_(True)
    return {n: p for n, p in ta.named_parameters() if p.requires_grad}


def plain_name(name: str) -> str:
    """A parameter or buffer name of φ with peft's wrapping of the trunk taken out."""
    return "trunk." + name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def merge_lora_state(state: dict[str, torch.Tensor], ta: nn.Module) -> dict[str, torch.Tensor]:
    """φ's state with its trunk's LoRA adapters merged: W + (alpha/r)·B·A, under the plain names.

    The identity for a φ without adapters. The merged φ computes what the adapted one does (peft's
    LoRA linear is base(x) + scaling·B(A(x)); dropout is off).
    """
    cfg = getattr(ta.trunk, "peft_config", None)
    if not cfg:
        return state
    lora = cfg["default"]
    scaling = lora.lora_alpha / lora.r
    out = {}
    for key, t in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            if key.endswith(".weight"):
                a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
                t = t + scaling * (b.to(t.dtype) @ a.to(t.dtype))
            key = key.replace(".base_layer.", ".")
        out[plain_name(key)] = t
    return out


def outer_lr(step: int, lr: float, steps: int, schedule: str, warmup: int, min_ratio: float) -> float:
    """φ's lr at TA step ``step`` (0-based): linear warm-up over ``warmup`` steps, then constant or a
    cosine decay to ``min_ratio·lr`` at ``steps``. A pure function of the step, so a resume needs no state."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def evidence_window(tokenizer, text: str, obj: str, window: int) -> str:
    """The ``window`` tokens of ``text`` around the first occurrence of ``obj`` (the start if absent).

    The whole object sits in the middle when the text allows (from its first token if it is longer
    than the window); the cut is at token boundaries, so re-tokenising gives (nearly) the same tokens.
    """
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= window:
        return text
    first = 0
    spans = char_spans(text, obj, "all")
    if spans:
        a, b = spans[0]
        lo = next((i for i, (_, end) in enumerate(offsets) if end > a), 0)  # the object's tokens lo..hi
        hi = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < b), lo)
        first = max(0, min(lo - max(window - (hi - lo + 1), 0) // 2, len(offsets) - window))
    return text[offsets[first][0] : offsets[first + window - 1][1]]


def window_pairs(tokenizer, rows: list[dict], window: int) -> list[dict]:
    """Pairs with their text cut to an evidence window (``window`` 0: unchanged)."""
    if window <= 0:
        return rows
    return [{**r, "text": evidence_window(tokenizer, r["text"], r["object"], window)} for r in rows]


@torch.no_grad()
def object_weight_share(
    ta: nn.Module, batches: list[EpisodeBatch], base: nn.Module | None = None
) -> dict[str, float]:
    """The held-out diagnostic: the share of φ's total weight that falls on object tokens.

    One forward of φ per batch, no training run. ``diag_uniform_share`` is the same share under
    uniform weights (the object tokens' share of all tokens): a label-free φ that learned nothing
    stays there; one that found the objects rises above it. ``base``: the target whose per-token
    loss a surprise φ reads.
    """
    was = ta.training
    ta.eval()
    obj_w = all_w = n_obj = n_all = 0.0
    for b in batches:
        nll = token_nll(base, b.doc_ids, b.doc_mask) if getattr(ta, "surprise", False) else None
        w = ta(b.doc_ids, b.doc_mask, None, nll)[:, 1:].double()  # (B, T-1)
        real = b.doc_mask[:, 1:].bool()
        obj = b.doc_obj & real
        obj_w, all_w = obj_w + float(w[obj].sum()), all_w + float(w[real].sum())
        n_obj, n_all = n_obj + int(obj.sum()), n_all + int(real.sum())
    ta.train(was)
    return {
        "diag_object_share": obj_w / all_w if all_w else math.nan,
        "diag_uniform_share": n_obj / n_all if n_all else math.nan,
        "diag_w_object": obj_w / n_obj if n_obj else math.nan,
        "diag_w_other": (all_w - obj_w) / (n_all - n_obj) if n_all > n_obj else math.nan,
    }
