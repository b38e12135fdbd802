"""Loading target / base causal LMs and choosing their trainable subset (full or LoRA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ckl_toolkit.core.config import check_choices, fld, require

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoraSpec:
    r: int = fld(8, "LoRA rank (the paper: 64 on Llama-2-7B).")
    alpha: int = fld(16, "LoRA alpha.")
    dropout: float = fld(0.0, "LoRA dropout (0 keeps the meta-gradient deterministic).")
    target_modules: str = fld("all-linear", "peft target_modules: 'all-linear' or a comma-separated list.")

    def __post_init__(self):
        require(self.r >= 1, "r", "must be >= 1")


@dataclass
class ModelSpec:
    path: str = fld("", "HF model directory (config.json + safetensors + tokenizer).")
    dtype: str = fld("float32", "Parameter dtype.", choices=tuple(DTYPES))
    attn_implementation: str = fld(
        "eager", "Attention kernel; forward-mode JVP needs 'eager' on CPU.", choices=("eager", "sdpa")
    )
    lora: LoraSpec | None = fld(None, "Train LoRA adapters instead of all parameters (null: full).")

    def __post_init__(self):
        check_choices(self)


def load_causal_lm(spec: ModelSpec, field_name: str = "base.path") -> nn.Module:
    """Load a causal LM; wrap it with LoRA adapters when ``spec.lora`` is set."""
    require(bool(spec.path), field_name, "a model directory is required")
    model = AutoModelForCausalLM.from_pretrained(
        spec.path, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
    )
    if spec.lora is not None:
        model = add_lora(model, spec.lora)
    return model


def add_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """Wrap ``model`` with fresh peft LoRA adapters (only they require grad afterwards)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the inner step moves: LoRA adapters if present, else every parameter."""
    named = dict(model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    return lora if lora else named
