"""Loading target / base causal LMs and choosing their trainable subset (full or LoRA).

Local paths load with local files only; a hub model is ``hf://org/name`` (``core.paths``). Loading is
quiet: transformers' load report (e.g. the LM head a bare trunk leaves out) and its progress bars stay
off the terminal; ``CKL_VERBOSE=1`` shows them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckl_toolkit.core.config import check_choices, fld, require
from ckl_toolkit.core.paths import model_source, require_model_dir

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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings (load reports) and progress bars off while inside, unless CKL_VERBOSE=1."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("CKL_VERBOSE") == "1":
        yield
        return
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def silence_known_noise() -> None:
    """Known noise off for this process unless CKL_VERBOSE=1: transformers' load reports, progress bars
    and deprecation FutureWarnings (peft's too), and DeepSpeed's "Setting accelerator to CPU" warning
    at every import on a machine without CUDA (it would choose the CPU anyway)."""
    if os.environ.get("CKL_VERBOSE") == "1":
        return
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\..*)?$")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def load_causal_lm(spec: ModelSpec, field_name: str = "base.path") -> nn.Module:
    """Load a causal LM (local files only, or an ``hf://`` id); wrap it with LoRA when ``spec.lora`` is set.

    Raises:
        ConfigError: naming ``field_name`` when the directory does not exist.
    """
    require(bool(spec.path), field_name, "a model directory is required")
    require_model_dir(spec.path, field_name)
    source, local = model_source(spec.path)
    source = os.path.abspath(source) if local else source  # recorded as name_or_path (peft: the base)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=DTYPES[spec.dtype],
            attn_implementation=spec.attn_implementation,
            local_files_only=local,
            use_safetensors=True,  # never the pickle fallback
        )
    if spec.lora is not None:
        model = add_lora(model, spec.lora)
    return model


def load_tokenizer(path: str, field_name: str = "target.path"):
    """The tokenizer of a model directory (local files only) or of an ``hf://`` id."""
    require_model_dir(path, field_name)
    source, local = model_source(path)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(
            os.path.abspath(source) if local else source, local_files_only=local
        )


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
