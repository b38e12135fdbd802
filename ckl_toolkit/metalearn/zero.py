"""Meta-training under DeepSpeed ZeRO: who holds what on each rank (docs/ARCHITECTURE.md §3).

    φ (the TA model)  an engine (``training.engine``): under ZeRO-2/3 DeepSpeed averages its gradient
                      over ranks, which is the mean over the global meta-batch.
    θ (the base)      replicated: a plain module per rank; or ``partition_base``: the frozen weights
                      ZeRO-3-partitioned (shared, never edited; gathered layer by layer in forward and
                      backward) and a LoRA set per rank that the inner step and the central
                      differences edit in place, on that rank only (:func:`load_partitioned_base`).
    episodes          the step's global meta-batch cut into equal contiguous slices, slice r to rank
                      r (``episodes.episode_slice``). No inner step, direction v or dL/dw is ever
                      all-reduced; only φ's gradient is.

The recipe's DeepSpeed config is filled by ``distributed.ds_config.resolve_ds_config`` (its messages
name the fields in ``config.META_DS_FIELDS``), printed and saved as ``run_dir/ds_config.json``
(:func:`save_effective_config`). Nothing here imports deepspeed at
module level, so the single-process path never loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ckl_toolkit.core.config import require
from ckl_toolkit.core.io import write_text_atomic
from ckl_toolkit.core.models import DTYPES, ModelSpec
from ckl_toolkit.core.ta_model import TrainAttentionModel
from ckl_toolkit.distributed.process import DistContext, print0
from ckl_toolkit.metalearn.ta_train import merge_lora_state, plain_name


def base_ds_config(ds_config: dict, base_dtype: str) -> dict:
    """The config of the partitioned base: ZeRO-3 inference (no optimizer), φ's partitioning settings."""
    zero = {k: v for k, v in ds_config["zero_optimization"].items() if k != "offload_optimizer"}
    zero["memory_efficient_linear"] = False
    # Gather one layer at a time and free it after use. DeepSpeed's defaults (prefetching, and keeping
    # a gathered layer that is used again within 1e9 elements, e.g. in the backward) kept ~88% of the
    # demo base gathered at once during a meta-gradient, which would undo the partition; with these
    # the peak is the largest single module (24% there: the embedding; ~2% for Llama-2-7B).
    zero["stage3_max_reuse_distance"] = 0
    zero["stage3_prefetch_bucket_size"] = 0
    return {
        "train_batch_size": ds_config["train_batch_size"],
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": base_dtype == "bfloat16"},
        "fp16": {"enabled": base_dtype == "float16"},
    }


def _lora_config(lora):
    from peft import LoraConfig

    targets = lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
    )


def load_partitioned_base(
    spec: ModelSpec, ds_config: dict, seed: int
) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The base with its frozen weights ZeRO-3-partitioned over ranks and a per-rank LoRA set.

    The weights are built under ``zero.Init`` (transformers does that while a ``HfDeepSpeedConfig``
    is alive; only rank 0 reads the checkpoint values) and wrapped in a DeepSpeed engine without an
    optimizer (ZeRO-3 inference): its hooks gather each layer's shards before the layer's forward or
    backward and free them after. Such an engine registers no gradient hooks, so autograd.grad with
    respect to the LoRA parameters reduces nothing across ranks.

    The LoRA adapters are added after the engine exists, so they are ordinary replicated tensors the
    engine never sees: each rank's inner step edits its own copy. They are seeded like
    ``models.load_causal_lm`` seeds them in one process (``from_pretrained`` draws no random numbers).

    Args:
        spec: the recipe's ``base`` section (with ``lora``).
        ds_config: φ's effective DeepSpeed config (its ZeRO-3 settings partition the base too).
        seed: the seed of the LoRA initialisation.

    Returns:
        (model, trainable LoRA parameters by name).
    """
    import deepspeed
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    require(bool(spec.path), "base.path", "a model directory is required")
    cfg = base_ds_config(ds_config, spec.dtype)
    hf_config = HfDeepSpeedConfig(cfg)  # must stay alive while from_pretrained runs  # noqa: F841
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
        )
    finally:
        unset_hf_deepspeed_config()  # later from_pretrained calls (φ, validation) load plainly
        del hf_config
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    torch.manual_seed(seed)
    model = get_peft_model(engine.module, _lora_config(spec.lora))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    model._ckl_base_engine = engine  # keep the hooks' owner alive as long as the model
    return model, params


def local_numel(module: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole module) of a module's parameters.

    A ZeRO-3 parameter holds its shard in ``ds_tensor`` and an empty ``data`` outside forward.
    """
    held = full = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            held, full = held + p.ds_tensor.numel(), full + p.ds_numel
        else:
            held, full = held + p.numel(), full + p.numel()
    return held, full


def model_state_bytes(engine, base: nn.Module) -> dict[str, int]:
    """Bytes of model states this rank holds between steps.

    φ: its parameters (a ZeRO-3 parameter holds its shard), the fp32 master copy, the gradient
    buffer and the optimizer state; the base: its parameters (shards when partitioned, plus LoRA).

    Args:
        engine: φ's engine (``training.engine``).
        base: the base model θ.
    """

    def held(p: torch.Tensor) -> int:
        return (p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes

    opt = engine.optimizer
    master = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(
        opt, "single_partition_of_fp32_groups", []
    )
    grads = getattr(opt, "grad_partitions_flat_buffer", None)
    inner = getattr(opt, "optimizer", opt)
    out = {
        "ta_params": sum(held(p) for p in engine.module.parameters()),
        "ta_master": sum(t.nbytes for t in master),
        "ta_grads": grads.nbytes if grads is not None else 0,
        "ta_optimizer": sum(v.nbytes for s in inner.state.values() for v in s.values() if torch.is_tensor(v)),
        "base_params": sum(held(p) for p in base.parameters()),
    }
    out["total"] = sum(out.values())
    return out


def consolidated_ta(engine, ta: TrainAttentionModel) -> TrainAttentionModel | None:
    """A plain fp32 copy of φ with its full weights on rank 0, None elsewhere: to save, validate, export.

    Collective: every rank must call it (ZeRO-3 gathers one layer at a time to rank 0). The copy
    is built on the meta device and takes the gathered tensors, so it costs φ's size once.

    Args:
        engine: φ's engine.
        ta: the module the engine trains (its architecture and non-persistent buffers).
    """
    from transformers import AutoModel

    state = engine.full_state()
    if state is None:
        return None
    # The tensors are views into flat buffers (one per gathered layer under ZeRO-3, one per group
    # under ZeRO-1/2) or the live parameters: give each its own storage (safetensors needs that).
    state = {key: t.detach().clone() for key, t in state.items()}
    state = merge_lora_state(state, ta)  # ta.train=lora: saved and exported merged, a plain TA model
    with torch.device("meta"):
        trunk = AutoModel.from_config(ta.trunk.config)
        copy = TrainAttentionModel(trunk, ta.hidden_size, ta.surprise, ta.echo)
    copy.load_state_dict(state, assign=True, strict=True)
    for name, buf in ta.named_buffers():  # non-persistent buffers (rotary tables) are not in a state dict
        owner, _, leaf = plain_name(name).rpartition(".")
        copy.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    return copy.to(torch.float32).eval()


def save_effective_config(run_dir: Path, ctx: DistContext) -> None:
    """Print the effective DeepSpeed config and save it as ``run_dir/ds_config.json`` (rank 0)."""
    if ctx.is_main and ctx.ds_config is not None:
        text = json.dumps(ctx.ds_config, indent=2, sort_keys=True)
        print0(f"DeepSpeed config ({ctx.world} rank{'s' if ctx.world > 1 else ''}):\n{text}")
        write_text_atomic(run_dir / "ds_config.json", text + "\n")
