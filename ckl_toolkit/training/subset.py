"""Parameter-subset targets: fine-tune only some of the base's own weights (``target.kind: subset``).

    target.subset     trains                                          e.g. (Llama names)
    attention         the self-attention projections                  layers.*.self_attn.{q,k,v,o}_proj
    mlp               the whole MLP of every layer                    layers.*.mlp.{gate,up,down}_proj
    mlp_gate_up       the MLP's gate and up projections               layers.*.mlp.{gate,up}_proj
    top_k_layers:K    every weight of the last K decoder layers       layers.{L-K..L-1}.*
    freeze_bottom_k:K all but the input embeddings and layers 0..K-1  layers.{K..L-1}.*, norm, lm_head
    any other string  the parameters whose name matches it (re.search) "q_proj|v_proj"

Where to update matters as much as which tokens: updating only the attention projections, or only
the MLP's gate and up projections, learns almost as much as full fine-tuning and forgets far less,
and freezing the bottom layers keeps more of what the model knew (README "Targets"). A subset target
is a full model whose other parameters have ``requires_grad=False``: the optimizer never sees them,
so they stay bit-identical, and a version holds an ordinary HF ``model/`` as a full fine-tune does.
With tied input/output embeddings, freezing the embeddings freezes the LM head as well.
"""

from __future__ import annotations

import re

from torch import nn

from ckl_toolkit.core.config import ConfigError

NAMED = {
    "attention": r"\.(self_attn|attention|attn)\.",
    "mlp": r"\.(mlp|feed_forward)\.",
    "mlp_gate_up": r"\.(mlp|feed_forward)\.(gate_proj|up_proj|gate_up_proj|w1|w3)\.",
}
LAYER = re.compile(r"\.layers\.(\d+)\.")
EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings)\.")


def check_subset(subset: str, field: str = "target.subset") -> None:
    """Refuse a subset spelling that cannot select anything.

    Raises:
        ConfigError: naming ``field``: a bad K, or a pattern that is not a regular expression.
    """
    if subset in NAMED:
        return
    kind, _, k = subset.partition(":")
    if kind in ("top_k_layers", "freeze_bottom_k"):
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"{field}: {subset!r}: K must be a positive integer, e.g. {kind}:4")
        return
    try:
        re.compile(subset)
    except re.error as e:
        raise ConfigError(
            f"{field}: {subset!r} is neither attention, mlp, mlp_gate_up, top_k_layers:K, freeze_bottom_k:K "
            f"nor a regular expression over parameter names ({e})"
        ) from None


def _layer(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def subset_names(model: nn.Module, subset: str) -> list[str]:
    """The names of the parameters ``subset`` trains (shared tensors once, in ``named_parameters`` order).

    Raises:
        ConfigError: the subset selects nothing, or the model has fewer than K layers.
    """
    names = [n for n, _ in model.named_parameters()]
    layers = sorted({i for n in names if (i := _layer(n)) is not None})
    kind, _, k = subset.partition(":")
    if kind in ("top_k_layers", "freeze_bottom_k"):
        if int(k) > len(layers):
            raise ConfigError(f"target.subset: {subset!r}, but the model has {len(layers)} decoder layers")
        if kind == "top_k_layers":
            keep = set(layers[-int(k) :])
            chosen = [n for n in names if _layer(n) in keep]
        else:
            frozen = set(layers[: int(k)])
            chosen = [n for n in names if _layer(n) not in frozen and not EMBEDDINGS.search(n)]
    else:
        pattern = re.compile(NAMED.get(subset, subset))
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        example = names[len(names) // 2]
        raise ConfigError(
            f"target.subset: {subset!r} selects no parameter of this model (names look like {example})"
        )
    return chosen


def restrict_trainable(model: nn.Module, subset: str) -> list[str]:
    """Freeze every parameter of ``model`` outside ``subset``; returns the names left trainable."""
    chosen = set(subset_names(model, subset))
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return sorted(chosen)
