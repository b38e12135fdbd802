"""The trained target of an update: full fine-tuning, LoRA / QLoRA (peft), or K-Adapter (ARCHITECTURE.md §4).

A nightly run continues from the served version, not from the original model:

    kind       starts from                                   a version holds
    full       current/model (else target.path)              model/   HF safetensors + tokenizer
    subset     the same; only target.subset trains           model/   (training.subset)
    lora       target.path + current/adapter (trainable)     adapter/ peft adapter (+ model/ if merged)
    qlora      4-bit target.path + current/adapter           adapter/ (+ model/ merged in target.dtype)
    kadapter   target.path + current/adapter                 adapter/ K-Adapter dir (not an HF model)

``model/`` loads with ``AutoModelForCausalLM.from_pretrained``; a peft ``adapter/`` with
``PeftModel.from_pretrained(base, adapter)``; a K-Adapter with ``kadapter.load_adapter``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.models import (
    DTYPES,
    ModelSpec,
    add_lora,
    load_causal_lm,
    load_tokenizer,
    quiet_transformers,
)
from ckl_toolkit.core.paths import model_source
from ckl_toolkit.core.text import ensure_pad_token
from ckl_toolkit.training.kadapter import KAdapterModel, load_adapter
from ckl_toolkit.training.subset import restrict_trainable

if TYPE_CHECKING:
    from ckl_toolkit.training.sections import TargetSpec

MODEL_DIR, ADAPTER_DIR = "model", "adapter"


@dataclass
class Target:
    """The model the update trains, and where it came from."""

    model: nn.Module  # what the loop calls: HF model, PeftModel or KAdapterModel
    tokenizer: object
    spec: TargetSpec
    started_from: str  # the version (or target.path) these weights were loaded from

    def trainable(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything the optimizer steps (shared tensors once)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def check_target_runtime(spec: TargetSpec) -> None:
    """Fail before any loading on combinations this machine cannot run, naming the field.

    Raises:
        ConfigError: QLoRA without CUDA or without bitsandbytes.
    """
    if spec.kind != "qlora":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "target.kind='qlora': 4-bit QLoRA needs a CUDA GPU (bitsandbytes), and none is visible. "
            "Use target.kind=lora on this machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("target.kind='qlora': needs the bitsandbytes package (pip install bitsandbytes)")


def _base_spec(spec: TargetSpec, path: str, lora: bool = False) -> ModelSpec:
    return ModelSpec(path, spec.dtype, spec.attn_implementation, spec.lora if lora else None)


def _load_base(spec: TargetSpec, path: str | Path, field: str = "target.path") -> nn.Module:
    return load_causal_lm(_base_spec(spec, str(path)), field)


def _load_quantized(spec: TargetSpec) -> nn.Module:
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    device = int(os.environ.get("LOCAL_RANK", 0))
    source, local = model_source(spec.path)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=bnb,
            dtype=DTYPES[spec.dtype],
            device_map={"": device},
            local_files_only=local,
            use_safetensors=True,  # never the pickle fallback
        )
    return prepare_model_for_kbit_training(model)


def _fresh_lora(base: nn.Module, spec: TargetSpec) -> nn.Module:
    return add_lora(base, spec.lora)


def build_target(spec: TargetSpec, version: Path | None, seed: int) -> Target:
    """Load the target for a run that starts from ``version`` (None: the first run, from target.path).

    The seed fixes the initialisation of new LoRA / K-Adapter weights, so a resumed run rebuilds the
    same starting point before loading its checkpoint.
    """
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(spec.path, "target.path")
    ensure_pad_token(tokenizer)
    adapter = version / ADAPTER_DIR if version is not None else None
    if spec.kind in ("full", "subset"):
        start = version / MODEL_DIR if version is not None else Path(spec.path)
        model = _load_base(spec, start, "current version" if version is not None else "target.path")
        if spec.kind == "subset":  # the rest is frozen: the optimizer never sees it
            restrict_trainable(model, spec.subset)
    elif spec.kind in ("lora", "qlora"):
        base = _load_quantized(spec) if spec.kind == "qlora" else _load_base(spec, spec.path)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        else:
            model = _fresh_lora(base, spec)
    else:
        base = _load_base(spec, spec.path)
        model = (
            load_adapter(base, adapter) if adapter is not None else KAdapterModel(base, spec.kadapter.build())
        )
    if spec.gradient_checkpointing and spec.kind != "kadapter":  # K-Adapter: the frozen base keeps nothing
        enable_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
    started = str(version) if version is not None else spec.path
    return Target(model, tokenizer, spec, started)


def enable_checkpointing(hf: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5 names it so)."""
    kwargs = {"use_reentrant": False}  # reentrant checkpointing would need inputs that require grad
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_version_kind(version: Path | None, spec: TargetSpec) -> None:
    """Refuse to continue a version trained as another kind of target (its files would not fit)."""
    if version is None or not (version / "version.json").is_file():
        return
    kind = json.loads((version / "version.json").read_text()).get("target_kind")
    if kind is not None and kind != spec.kind:
        raise ConfigError(
            f"target.kind={spec.kind!r}: the current version {version.name} was trained as {kind!r}; "
            "keep the kind, or start a new output_dir"
        )


# ---------------------------------------------------------------------------------------------
# Export (checkpoints of the trainable state: ``training.engine``).


def export_target(target: Target, out: Path) -> list[str]:
    """Write the version's model files into ``out`` (call inside any parameter gather). Returns names.

    full -> model/ ; lora -> adapter/ (+ model/ merged when target.export='merged'); K-Adapter ->
    adapter/. Tensors are safetensors; the tokenizer is saved beside them.
    """
    kind, written = target.spec.kind, []
    if kind in ("full", "subset"):
        target.model.save_pretrained(out / MODEL_DIR)
        target.tokenizer.save_pretrained(out / MODEL_DIR)
        return [MODEL_DIR]
    if kind == "kadapter":
        target.model.save_adapter(out / ADAPTER_DIR)
        return [ADAPTER_DIR]
    target.model.save_pretrained(out / ADAPTER_DIR)
    target.tokenizer.save_pretrained(out / ADAPTER_DIR)
    written.append(ADAPTER_DIR)
    if target.spec.export_kind == "merged":
        merge_lora(target.spec, out / ADAPTER_DIR, out / MODEL_DIR)
        target.tokenizer.save_pretrained(out / MODEL_DIR)
        written.append(MODEL_DIR)
    return written


def merge_lora(spec: TargetSpec, adapter_dir: Path, out: Path) -> None:
    """Merge a saved adapter into a fresh, unquantised copy of the base and save it as an HF model.

    A fresh copy rather than the training model: merging mutates the model, and a 4-bit or
    ZeRO-partitioned base cannot be merged losslessly in place.
    """
    from peft import PeftModel

    base = load_causal_lm(_base_spec(spec, spec.path))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# How far a run moved the trained weights (cheap: sums, norms and a strided sample per tensor).

SAMPLE_PER_TENSOR = 4096


def weights_fingerprint(trainable: dict[str, nn.Parameter]) -> dict[str, dict]:
    """Per trained tensor: its sum and norm (fp64 accumulation) and every k-th element (≤ 4,096, fp32 copy).

    Memory: a few kB per tensor, not a copy of the weights. Call inside any parameter gather (ZeRO-3).
    """
    out = {}
    for name, p in trainable.items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE_PER_TENSOR)
        out[name] = {
            "numel": flat.numel(),
            "step": step,
            "sample": flat[::step][:SAMPLE_PER_TENSOR].float().cpu().clone(),
            "sum": float(flat.sum(dtype=torch.float64)),
            "norm": float(torch.linalg.vector_norm(flat, dtype=torch.float64)),
        }
    return out


def weights_change(start: dict[str, dict], trainable: dict[str, nn.Parameter]) -> dict:
    """How far the trained weights moved from ``start`` (a :func:`weights_fingerprint`).

    ``tensors_changed`` is exact (any change of an element changes a tensor's sum or norm, or a sampled
    element); ``norm_change`` ‖θ−θ₀‖ and ``relative_change`` ‖θ−θ₀‖/‖θ₀‖ are estimated from the sampled
    elements (each tensor's mean squared change times its size).
    """
    changed, sq_change, sq_start = 0, 0.0, 0.0
    for name, p in trainable.items():
        s = start[name]
        flat = p.detach().reshape(-1)
        delta = flat[:: s["step"]][:SAMPLE_PER_TENSOR].float().cpu() - s["sample"]
        moved = bool(delta.abs().max() > 0) if delta.numel() else False
        moved = moved or float(flat.sum(dtype=torch.float64)) != s["sum"]
        moved = moved or float(torch.linalg.vector_norm(flat, dtype=torch.float64)) != s["norm"]
        changed += int(moved)
        if delta.numel():
            sq_change += float(delta.double().pow(2).mean()) * s["numel"]
        sq_start += s["norm"] ** 2
    norm = math.sqrt(sq_change)
    return {
        "tensors_changed": changed,
        "tensors": len(start),
        "norm_change": norm,
        "relative_change": norm / math.sqrt(sq_start) if sq_start > 0 else (math.inf if norm else 0.0),
        "estimate": f"from every k-th element, at most {SAMPLE_PER_TENSOR} per tensor",
    }
