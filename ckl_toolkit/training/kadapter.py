"""K-Adapter for continual knowledge learning: a frozen causal LM plus trainable adapter blocks.

The adapters form a chain beside the frozen base. Adapter j reads the output of base layer
``layers[j]`` plus adapter j−1's output, runs it through a small causal transformer (down-project,
``block_layers`` pre-LN layers, up-project, with a residual, as in Wang et al., 2021), and the last
adapter's output is fused into the base's final hidden state before the LM head::

    h_fused = h_last + scale · LayerNorm(a_J)        logits = lm_head(h_fused)

The fusion LayerNorm's gain starts at 0, so at step 0 the logits are exactly the base's; a zero
last projection would not do that here, because the LayerNorm rescales whatever it gets. The gain
gets a gradient from the first step and the rest of the adapter from the second. Dropout defaults
to 0.1 (the released TAALM baseline used 0.9, which drowns the adapters' signal; it also crashed on
a constructor-name mismatch). The frozen base always runs in eval mode.

Saved as a directory: ``adapter.safetensors`` (adapter tensors only) and ``kadapter_config.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ckl_toolkit.core.io import atomic_dir, write_json_atomic

FORMAT = "ckl-kadapter-v1"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "kadapter_config.json"


@dataclass
class KAdapterConfig:
    """Where the adapters read the base and how big they are."""

    layers: list[int] | None = None
    """0-based base layers whose outputs the adapters read; None: [0, n//2, n-1] for n layers."""
    adapter_hidden: int = 128
    """Width of the adapter transformer layers."""
    num_heads: int = 4
    """Attention heads per adapter layer; must divide adapter_hidden."""
    block_layers: int = 2
    """Transformer layers inside each adapter (K-Adapter used 2)."""
    scale: float = 0.1
    """Factor on the LayerNorm-ed adapter output added to the base's last hidden state."""
    dropout: float = 0.1
    """Dropout on the adapter layers' residual branches, in [0, 1)."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = list(self.layers)
            if not self.layers or sorted(set(self.layers)) != self.layers:
                raise ValueError(f"kadapter.layers={self.layers}: must be non-empty, strictly increasing")
        for name in ("adapter_hidden", "num_heads", "block_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"kadapter.{name}={getattr(self, name)}: must be >= 1")
        if self.adapter_hidden % self.num_heads:
            raise ValueError(
                f"kadapter.adapter_hidden={self.adapter_hidden}: not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"kadapter.dropout={self.dropout}: must be in [0, 1)")
        if not math.isfinite(self.scale):
            raise ValueError(f"kadapter.scale={self.scale}: must be finite")

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The layers to read in a base of ``num_layers`` layers (validated)."""
        layers = self.layers if self.layers is not None else sorted({0, num_layers // 2, num_layers - 1})
        if layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"kadapter.layers={layers}: the base has layers 0..{num_layers - 1}")
        return layers


class _AdapterLayer(nn.Module):
    """A pre-LN transformer layer with causal self-attention."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.num_heads, W // self.num_heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, T, W)))  # (B, T, W)
        return x + self.drop(self.mlp(self.norm2(x)))


class _AdapterBlock(nn.Module):
    """down-project -> causal transformer layers -> up-project, added to its input."""

    def __init__(self, hidden: int, cfg: KAdapterConfig):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, cfg.adapter_hidden), nn.Linear(cfg.adapter_hidden, hidden)
        self.layers = nn.ModuleList(
            _AdapterLayer(cfg.adapter_hidden, cfg.num_heads, cfg.dropout) for _ in range(cfg.block_layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        z = self.down(x)  # (B, T, A)
        for layer in self.layers:
            z = layer(z, attn_mask)
        return x + self.up(z)  # (B, T, H)


class _Adapter(nn.Module):
    """Everything that trains: the adapter chain and the fusion LayerNorm."""

    def __init__(self, hidden: int, num_adapters: int, cfg: KAdapterConfig):
        super().__init__()
        self.blocks = nn.ModuleList(_AdapterBlock(hidden, cfg) for _ in range(num_adapters))
        self.fuse_norm = nn.LayerNorm(hidden)
        nn.init.zeros_(self.fuse_norm.weight)  # fused term = 0 at init: logits start as the base's


def _attention_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) padding mask -> (B, 1, T, T) bool: causal, real keys only, plus the diagonal.

    The diagonal keeps a padded query from attending to nothing (which would give NaN). With
    ``position_ids`` (packed rows, restarting at 0 per document) a query sees its own document only.
    """
    T = attention_mask.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, T, T)
    if position_ids is not None:
        document = (position_ids == 0).cumsum(-1)  # (B, T) which packed document a token belongs to
        mask = mask & (document[:, None, :, None] == document[:, None, None, :])
    return mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class KAdapterModel(nn.Module):
    """A frozen Hugging Face causal LM with K-Adapter blocks fused before its LM head.

    The base must compute ``logits = lm_head(last_hidden_state)`` (Llama, Qwen2, Mistral, GPT-2,
    SmolLM...); models with final logit soft-capping are refused.

    Args:
        base: a ``*ForCausalLM``; its parameters are set to ``requires_grad=False``.
        cfg: adapter configuration.
    """

    def __init__(self, base: nn.Module, cfg: KAdapterConfig):
        super().__init__()
        if getattr(base.config, "final_logit_softcapping", None):
            raise ValueError("K-Adapter: bases with final_logit_softcapping are not supported")
        self.base, self.cfg = base, cfg
        self.layers = cfg.resolve_layers(base.config.num_hidden_layers)
        self.base.requires_grad_(False)
        self.base.eval()
        self.adapter = _Adapter(base.config.hidden_size, len(self.layers), cfg)

    def train(self, mode: bool = True) -> KAdapterModel:
        super().train(mode)
        self.base.eval()  # frozen features: no dropout in the base, ever
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters: the only ones to give an optimizer."""
        return list(self.adapter.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) and, given ``labels`` (B, T, -100 = ignore), the mean next-token loss.

        ``use_cache`` is accepted for HF-call compatibility and ignored: the adapter scores whole
        sequences and keeps no KV cache. ``position_ids`` mark packed documents (restarting at 0).
        """
        lm_head = self.base.get_output_embeddings()
        logits = lm_head(self.fused_hidden(input_ids, attention_mask, position_ids))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def fused_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, H) the base's last hidden state plus the fused adapter output, in the LM head's dtype."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        base_mask = None if position_ids is not None else attention_mask  # packed: positions say it all
        decoder = self.base.get_decoder()
        out = decoder(
            input_ids=input_ids,
            attention_mask=base_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        # hidden_states: embeddings, then each layer's output (B, T, H); the last one is final-normed.
        hidden = out.hidden_states
        dtype = self.adapter.fuse_norm.weight.dtype
        mask = _attention_mask(attention_mask, position_ids)
        a = torch.zeros_like(hidden[0], dtype=dtype)  # (B, T, H) adapter stream
        for layer, block in zip(self.layers, self.adapter.blocks):
            a = block(hidden[layer + 1].to(dtype) + a, mask)
        fused = out.last_hidden_state.to(dtype) + self.cfg.scale * self.adapter.fuse_norm(a)  # (B, T, H)
        return fused.to(self.base.get_output_embeddings().weight.dtype)

    def lm_trunk_and_head(self):
        """(trunk, head) of ``core.losses.token_nll``'s chunked loss: the fused hidden state, the LM head."""
        return self.fused_hidden, self.base.get_output_embeddings()

    def save_adapter(self, adapter_dir: str | os.PathLike) -> Path:
        """Write the adapter tensors (safetensors) and a JSON sidecar, atomically. Returns the dir."""
        base_cfg = self.base.config
        sidecar = {
            "format": FORMAT,
            "config": {**asdict(self.cfg), "layers": self.layers},
            "base": {
                "model_type": base_cfg.model_type,
                "hidden_size": base_cfg.hidden_size,
                "num_hidden_layers": base_cfg.num_hidden_layers,
                "vocab_size": base_cfg.vocab_size,
            },
        }
        with atomic_dir(adapter_dir) as tmp:
            save_model(self.adapter, str(tmp / WEIGHTS_FILE))
            write_json_atomic(tmp / CONFIG_FILE, sidecar)
        return Path(adapter_dir)


def load_adapter(base: nn.Module, adapter_dir: str | os.PathLike) -> KAdapterModel:
    """Rebuild a ``KAdapterModel`` around ``base`` from a ``save_adapter`` directory.

    Raises:
        FileNotFoundError: when the directory has no sidecar.
        ValueError: when the sidecar's format or base shape does not match ``base``.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a K-Adapter directory (no {CONFIG_FILE})")
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != FORMAT:
        raise ValueError(f"{path}: format {sidecar.get('format')!r}, expected {FORMAT!r}")
    for key, saved in sidecar["base"].items():
        have = getattr(base.config, key)
        if key != "model_type" and have != saved:
            raise ValueError(f"{path}: adapter trained on a base with {key}={saved}, this base has {have}")
    model = KAdapterModel(base, KAdapterConfig(**sidecar["config"]))
    load_model(model.adapter, str(adapter_dir / WEIGHTS_FILE), strict=True)
    return model
