"""DeepSpeed configs: the ``ds_configs/`` presets, their "auto" fields, checks that must fail before any work.

A job's recipe names a config (a preset name or a JSON path). :func:`resolve_ds_config` fills its
"auto" fields from flat arguments the job takes from its recipe, and refuses combinations DeepSpeed
would break on later. Its messages name the caller's recipe fields, which the caller passes as a
:class:`DsFields`, so ``ckl meta-train`` says ``batch_size`` where ``ckl update`` says
``batching.batch_size``.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckl_toolkit.core.config import ConfigError, require
from ckl_toolkit.distributed.process import accelerator as detect_accelerator
from ckl_toolkit.distributed.process import print0

PRESETS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
PRESETS = ("zero2", "zero3", "zero3_offload")
# Client optimizers that DeepSpeed's ZeRO accepts without "zero_allow_untested_optimizer"
# (deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS).
ZERO_TESTED_OPTIMIZERS = ("adamw", "adam")
# Ours, written for ZeRO (RecAdam keeps its anchors per flat partition): allowed without asking.
ZERO_AWARE_OPTIMIZERS = ("recadam",)


@dataclass(frozen=True)
class DsFields:
    """The recipe fields the messages name, spelled as the calling job's recipe spells them."""

    ds_config: str  # the config's name or path
    batch: str  # the global batch (over all ranks)
    clip: str  # the gradient-norm clip
    precision: str  # what decides bf16
    optimizer: str  # the client optimizer's name


def load_ds_config(name_or_path: str, field: str) -> tuple[dict, str]:
    """A preset name (``zero3``) or a JSON path -> (config dict, where it came from).

    Raises:
        ConfigError: naming ``field`` when it is neither a file nor a preset, or not JSON.
    """
    path = Path(name_or_path)
    if not path.exists():
        stem = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
        path = PRESETS_DIR / f"{stem}.json"
    if not path.exists():
        raise ConfigError(
            f"{field}={name_or_path!r}: neither a file nor a preset; "
            f"presets: {list(PRESETS)} (in {PRESETS_DIR})"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{field}: {path}:{e.lineno}: invalid JSON ({e.msg})") from None


def model_hidden_size(model_dir: str, field: str, default: int | None = None) -> int:
    """The hidden size of an HF model directory (it sizes the "auto" ZeRO buckets).

    Args:
        model_dir: the directory whose ``config.json`` is read.
        field: the recipe field that names it, for the message.
        default: for configs without ``hidden_size``; None: such a config is an error.
    """
    from transformers import AutoConfig

    require(bool(model_dir), field, "a model directory is required")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except OSError as e:
        raise ConfigError(f"{field}: {model_dir} is not a readable model directory ({e})") from None
    hidden = getattr(config, "hidden_size", default)
    require(hidden is not None, field, f"{model_dir} has no hidden_size in its config")
    return int(hidden)


def resolve_precision(precision: str, accelerator: str) -> str:
    """auto: bf16 on a GPU that supports it, else fp32; fp32 and bf16 stay."""
    if precision != "auto":
        return precision
    if accelerator == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _fill(section: dict, key: str, value: Any, field: str, source: str) -> None:
    """Fill an "auto" (or missing) key; a concrete value must agree with the recipe."""
    cur = section.get(key, "auto")
    if cur == "auto":
        section[key] = value
    elif cur != value:
        raise ConfigError(
            f"{field}: the recipe gives {value!r} but {source} sets {key}={cur!r}; "
            f'set {key} to "auto" in {source} or change {field}'
        )


def resolve_ds_config(
    ds_config: str,
    *,
    world: int,
    batch_size: int,
    grad_clip: float,
    precision: str,
    optimizer: str,
    jvp: bool,
    partition_base: bool,
    hidden_size: int,
    fields: DsFields,
    accelerator: str | None = None,
) -> dict:
    """The effective DeepSpeed config for ``world`` ranks; a ConfigError names the field to change.

    Fills ``train_batch_size`` (batch_size), ``train_micro_batch_size_per_gpu`` (batch_size / world),
    ``gradient_accumulation_steps`` (1: one batch is one optimizer step), ``gradient_clipping``
    (grad_clip; DeepSpeed would otherwise apply its own default), the bf16/fp16 switches and the
    ZeRO-3 bucket sizes (from the hidden size, as transformers' Trainer does).

    Args:
        ds_config: a preset of ``ds_configs/`` or a JSON path.
        world: ranks of the run.
        batch_size: the global batch, summed over ranks; must divide by ``world``.
        grad_clip: the gradient-norm clip (0: off).
        precision: auto, fp32 or bf16 for the engine's model.
        optimizer: the client torch optimizer's name (adamw, adam, sgd, recadam).
        jvp: forward-mode AD runs through the model (ZeRO-3's linear replacement would break it).
        partition_base: a frozen base is ZeRO-3-partitioned with this config (needs stage 3).
        hidden_size: the model's hidden size.
        fields: how the caller's recipe names each of these.
        accelerator: cuda or cpu; default: what this machine has.
    """
    cfg, source = load_ds_config(ds_config, fields.ds_config)
    cfg = copy.deepcopy(cfg)
    require(
        batch_size % world == 0,
        fields.batch,
        f"{batch_size} rows do not split over {world} ranks; use a multiple of {world}",
    )
    for key in ("optimizer", "scheduler"):
        require(
            key not in cfg,
            fields.ds_config,
            f"{source} has an '{key}' section; the optimizer comes from the recipe's {fields.optimizer} "
            "(a client torch optimizer), so remove it",
        )
    _fill(cfg, "train_batch_size", batch_size, fields.batch, source)
    _fill(cfg, "train_micro_batch_size_per_gpu", batch_size // world, fields.batch, source)
    _fill(cfg, "gradient_accumulation_steps", 1, fields.batch, source)
    _fill(cfg, "gradient_clipping", float(grad_clip), fields.clip, source)
    accelerator = accelerator or detect_accelerator()
    _fill_precision(cfg, resolve_precision(precision, accelerator), accelerator, fields, source)
    stage = _fill_zero(cfg, hidden_size, jvp, fields, source)
    _check_optimizer(cfg, optimizer, fields, source)
    if partition_base:
        msg = f"a partitioned base needs a ZeRO-3 config; {source} has stage {stage}"
        require(stage == 3, fields.ds_config, msg)
    return cfg


def _fill_precision(cfg: dict, precision: str, accelerator: str, fields: DsFields, source: str) -> None:
    bf16, fp16 = cfg.setdefault("bf16", {}), cfg.setdefault("fp16", {})
    _fill(bf16, "enabled", precision == "bf16", fields.precision, source)
    _fill(fp16, "enabled", False, fields.precision, source)
    if precision == "bf16" and accelerator == "cpu":
        print0(f"warning: {fields.precision} asks for bf16 on CPU: DeepSpeed trains in bf16", file=sys.stderr)


def _fill_zero(cfg: dict, hidden_size: int, jvp: bool, fields: DsFields, source: str) -> int:
    """Fill the ZeRO section's "auto" bucket sizes; returns the stage."""
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    require(stage in (1, 2, 3), fields.ds_config, f"{source}: zero_optimization.stage must be 1, 2 or 3")
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("memory_efficient_linear") is True and jvp and stage == 3:
        raise ConfigError(
            f"{fields.ds_config}: {source} leaves zero_optimization.memory_efficient_linear on, which "
            "replaces torch's linear process-wide and breaks forward-mode AD (JVP); set it to false"
        )
    zero.setdefault("memory_efficient_linear", False)  # DeepSpeed's default (true) patches F.linear
    return stage


def _check_optimizer(cfg: dict, optimizer: str, fields: DsFields, source: str) -> None:
    if optimizer in ZERO_AWARE_OPTIMIZERS:
        cfg["zero_allow_untested_optimizer"] = True
    elif optimizer not in ZERO_TESTED_OPTIMIZERS and not cfg.get("zero_allow_untested_optimizer", False):
        raise ConfigError(
            f"{fields.optimizer}={optimizer!r}: ZeRO rejects client optimizers it has not tested "
            f"(tested: {list(ZERO_TESTED_OPTIMIZERS)}); use {fields.optimizer}=adamw, or set "
            f'"zero_allow_untested_optimizer": true in {source}'
        )
    offload = (cfg["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None) and cfg.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(
            f"{fields.ds_config}: {source} offloads the optimizer to {offload}, where DeepSpeed "
            'refuses a client torch optimizer unless "zero_force_ds_cpu_optimizer": false is set'
        )
