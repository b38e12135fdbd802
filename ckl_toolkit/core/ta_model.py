"""The Train-Attention (TA) model φ: a causal-LM trunk with a hidden->1 sigmoid head (ARCHITECTURE.md §4).

Saved as a directory:
  model.safetensors   trunk.* and head.* tensors
  ta_config.json      the sidecar: trunk config, tokenizer identity, recipe hash, format version
  tokenizer files     so the directory is self-contained
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ckl_toolkit.core.io import atomic_dir, write_json_atomic
from ckl_toolkit.core.losses import model_inputs

FORMAT = "ckl-train-attention-v1"
HEAD_BIAS_INIT = 4.0  # sigma(4) ~ 0.98: training starts near uniform fine-tuning


class TrainAttentionModel(nn.Module):
    """Predicts one weight in (0, 1) per token from the trunk's causal hidden state.

    With ``surprise``, the head also reads log(1 + ℓ_t), the target model's own loss on token x_t
    (label-free: the model's NLL of the text it is about to learn), so tokens the model already
    predicts can get low weight; the trunk alone cannot know what the target knows.

    With ``echo``, the trunk reads each document twice and the head reads each token's second copy,
    whose causal state has seen the whole document (:func:`echo_layout`).
    """

    def __init__(self, trunk: nn.Module, hidden_size: int, surprise: bool = False, echo: bool = False):
        super().__init__()
        self.trunk, self.hidden_size, self.surprise, self.echo = trunk, hidden_size, surprise, echo
        self.head = nn.Linear(hidden_size + int(surprise), 1)
        # Weight 0 and bias 4: every token starts at the same weight, sigma(4).
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, HEAD_BIAS_INIT)

    @property
    def config(self):
        return self.trunk.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        target_nll: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns (B, T) weights; position t weights target token x_t (use ``w[:, 1:]``).

        ``position_ids`` (packed rows, restarting at 0 per document) keep each document to itself.
        ``target_nll`` (B, T-1): the target model's per-token loss (``token_nll``), needed with
        ``surprise``; its entry t-1 (the loss of x_t) joins position t's hidden state.
        """
        if self.echo:
            hidden = self._echo_hidden(input_ids, attention_mask, position_ids)  # (B, T, H)
        else:
            inputs = model_inputs(input_ids, attention_mask, position_ids)
            if position_ids is not None:  # transformers reads packed positions only without a KV cache
                inputs["use_cache"] = False
            hidden = self.trunk(**inputs).last_hidden_state
        hidden = hidden.to(self.head.weight.dtype)
        if self.surprise:
            if target_nll is None:
                raise ValueError(
                    "this TA model reads the target's per-token loss (surprise): pass target_nll"
                )
            s = torch.log1p(target_nll.detach().to(hidden.dtype).clamp(min=0))  # (B, T-1)
            s = torch.cat([s.new_zeros(s.shape[0], 1), s], dim=1)  # (B, T): position t <- loss of x_t
            hidden = torch.cat([hidden, s.unsqueeze(-1)], dim=-1)  # (B, T, H+1)
        return torch.sigmoid(self.head(hidden).squeeze(-1))  # (B, T)

    def _echo_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The trunk's states at each token's second copy, every document read twice in a row.

        A causal trunk's state at x_t has read only x_{<=t}; in "D D" the second copy of x_t has read
        all of D, so its weight can depend on what the document says later (an echo embedding).
        """
        index, echo_pos, take = echo_layout(attention_mask, position_ids)  # (B, 2T), (B, 2T), (B, T)
        limit = getattr(self.trunk.config, "max_position_embeddings", None)
        longest = int(echo_pos.max()) + 1  # the longest echoed document, 2n tokens
        if limit is not None and longest > limit:
            raise ValueError(
                f"ta.echo: a document of {longest // 2} tokens is read as {longest}, beyond the TA "
                f"trunk's max_position_embeddings={limit}; "
                "shorten the documents (data.max_length) or train φ without ta.echo"
            )
        ids = input_ids.gather(1, index)  # (B, 2T)
        out = self.trunk(input_ids=ids, attention_mask=None, position_ids=echo_pos, use_cache=False)
        hidden = out.last_hidden_state  # (B, 2T, H)
        return hidden.gather(1, take.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, T, H)


def echo_layout(
    attention_mask: torch.Tensor, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with every document written twice, as packed rows: ``D1 D1 D2 D2 ... pad``.

    Args:
        attention_mask: (B, T), padding at the end of each row.
        position_ids: (B, T) packed rows' per-document positions (None: one document per row).

    Returns:
        index: (B, 2T) the source column of each echo token (gather the ids with it).
        positions: (B, 2T) echo positions: 0..2n-1 per document, so transformers keeps each document
            (both copies) to itself; every padding token is at position 0, a "document" of its own, so
            the padding never lengthens what the position limit sees.
        take: (B, T) the echo column of each source token's second copy (padding: its own column).
    """
    B, T = attention_mask.shape
    device = attention_mask.device
    index = torch.zeros(B, 2 * T, dtype=torch.long, device=device)
    positions = torch.zeros(B, 2 * T, dtype=torch.long, device=device)
    take = torch.arange(T, device=device).repeat(B, 1)
    lengths = attention_mask.long().sum(1).tolist()
    for b, n in enumerate(lengths):
        starts = [0] if position_ids is None else (position_ids[b, :n] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        col = 0
        for s, e in zip(starts, starts[1:] + [n]):
            src = torch.arange(s, e, device=device)  # one document's columns
            m = e - s
            index[b, col : col + 2 * m] = src.repeat(2)
            positions[b, col : col + 2 * m] = torch.arange(2 * m, device=device)
            take[b, s:e] = torch.arange(col + m, col + 2 * m, device=device)
            col += 2 * m
        index[b, col:] = max(n - 1, 0)  # padding: any real id; nothing real attends to it (it comes last)
        take[b, n:] = torch.arange(col, col + T - n, device=device)
    return index, positions, take


def _truncated_config(model_dir: str | os.PathLike, num_layers: int | None, attn_implementation: str | None):
    config = AutoConfig.from_pretrained(model_dir)
    if num_layers is not None:
        if num_layers < 1 or num_layers > config.num_hidden_layers:
            raise ValueError(
                f"ta.num_layers={num_layers}: must be between 1 and the trunk's "
                f"{config.num_hidden_layers} layers ({model_dir})"
            )
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def build_ta_model(
    model_dir: str | os.PathLike,
    num_layers: int | None = None,
    attn_implementation: str | None = "sdpa",
    dtype: torch.dtype = torch.float32,
    surprise: bool = False,
    echo: bool = False,
) -> TrainAttentionModel:
    """Build φ from any HF causal-LM directory, keeping its first ``num_layers`` layers (all if None).

    The LM head is dropped (AutoModel loads the bare trunk) and replaced by Linear(hidden, 1)
    (Linear(hidden + 1, 1) with ``surprise``).
    """
    config = _truncated_config(model_dir, num_layers, attn_implementation)
    trunk = AutoModel.from_pretrained(model_dir, config=config, dtype=dtype)
    return TrainAttentionModel(trunk, config.hidden_size, surprise, echo).to(dtype)


def tokenizer_identity(tokenizer) -> dict:
    """Name, size and a hash of the vocabulary: enough to tell two tokenizers apart."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
    return {"name_or_path": str(tokenizer.name_or_path), "vocab_size": len(vocab), "vocab_sha256_16": digest}


def save_ta_model(
    model: TrainAttentionModel, out_dir: str | os.PathLike, tokenizer=None, recipe_hash: str | None = None
) -> Path:
    """Write φ atomically as safetensors + sidecar (+ tokenizer). Returns the directory."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        sidecar = {
            "format": FORMAT,
            "trunk_config": model.trunk.config.to_dict(),
            "hidden_size": model.hidden_size,
            "surprise": model.surprise,
            "echo": model.echo,
            "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None,
            "recipe_hash": recipe_hash,
        }
        write_json_atomic(tmp / "ta_config.json", sidecar)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def load_ta_model(
    ta_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"
) -> TrainAttentionModel:
    """Load φ saved by :func:`save_ta_model` (bit-identical tensors)."""
    ta_dir = Path(ta_dir)
    sidecar_path = ta_dir / "ta_config.json"
    if not sidecar_path.exists():
        raise FileNotFoundError(f"{sidecar_path}: not a Train-Attention model directory (no ta_config.json)")
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("format") != FORMAT:
        raise ValueError(f"{sidecar_path}: field 'format' is {sidecar.get('format')!r}, expected {FORMAT!r}")
    trunk_cfg = dict(sidecar["trunk_config"])
    config = AutoConfig.for_model(**trunk_cfg)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    trunk = AutoModel.from_config(config, dtype=dtype)
    model = TrainAttentionModel(
        trunk, sidecar["hidden_size"], bool(sidecar.get("surprise", False)), bool(sidecar.get("echo", False))
    ).to(dtype)
    load_model(model, str(ta_dir / "model.safetensors"), strict=True)
    return model


def load_ta_tokenizer(ta_dir: str | os.PathLike):
    return AutoTokenizer.from_pretrained(str(ta_dir))
