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
    """

    def __init__(self, trunk: nn.Module, hidden_size: int, surprise: bool = False):
        super().__init__()
        self.trunk, self.hidden_size, self.surprise = trunk, hidden_size, surprise
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
        inputs = model_inputs(input_ids, attention_mask, position_ids)
        if position_ids is not None:  # transformers reads packed positions only without a KV cache
            inputs["use_cache"] = False
        hidden = self.trunk(**inputs).last_hidden_state.to(self.head.weight.dtype)  # (B, T, H)
        if self.surprise:
            if target_nll is None:
                raise ValueError(
                    "this TA model reads the target's per-token loss (surprise): pass target_nll"
                )
            s = torch.log1p(target_nll.detach().to(hidden.dtype).clamp(min=0))  # (B, T-1)
            s = torch.cat([s.new_zeros(s.shape[0], 1), s], dim=1)  # (B, T): position t <- loss of x_t
            hidden = torch.cat([hidden, s.unsqueeze(-1)], dim=-1)  # (B, T, H+1)
        return torch.sigmoid(self.head(hidden).squeeze(-1))  # (B, T)


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
) -> TrainAttentionModel:
    """Build φ from any HF causal-LM directory, keeping its first ``num_layers`` layers (all if None).

    The LM head is dropped (AutoModel loads the bare trunk) and replaced by Linear(hidden, 1)
    (Linear(hidden + 1, 1) with ``surprise``).
    """
    config = _truncated_config(model_dir, num_layers, attn_implementation)
    trunk = AutoModel.from_pretrained(model_dir, config=config, dtype=dtype)
    return TrainAttentionModel(trunk, config.hidden_size, surprise).to(dtype)


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
    model = TrainAttentionModel(trunk, sidecar["hidden_size"], bool(sidecar.get("surprise", False))).to(dtype)
    load_model(model, str(ta_dir / "model.safetensors"), strict=True)
    return model


def load_ta_tokenizer(ta_dir: str | os.PathLike):
    return AutoTokenizer.from_pretrained(str(ta_dir))
