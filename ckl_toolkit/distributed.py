"""Meta-training across ranks with DeepSpeed (ARCHITECTURE.md §3).

Who holds what, per rank:

    φ (the TA model)  a ZeRO-2/3 engine: DeepSpeed averages its gradient over ranks, which is the
                      mean over the global meta-batch (each rank's surrogate carries its local 1/B).
    θ (the base)      replicated: a plain module per rank; or ``partition_base``: the frozen weights
                      ZeRO-3-partitioned (shared, never edited; gathered layer by layer in forward and
                      backward) and a LoRA set per rank that the inner step and the central
                      differences edit in place, on that rank only.
    episodes          the global meta-batch of step s (``meta.episode_indices``) cut into equal
                      contiguous slices, slice r to rank r. No inner step, direction v or dL/dw is
                      ever all-reduced; only φ's gradient is.

A recipe names a DeepSpeed config (a preset of ``ds_configs/`` or a JSON path) whose ``"auto"``
fields are filled from the recipe (:func:`resolve_ds_config`); the effective config is printed and
saved as ``run_dir/ds_config.json``. Nothing here imports deepspeed at module level, so the
single-process path (``distributed.ds_config: null``) never loads it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckl_toolkit.core.checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, save_state
from ckl_toolkit.core.checkpoint import set_rng_state as _set_rng_state
from ckl_toolkit.core.config import ConfigError, check_choices, fld, require

ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = ROOT / "ds_configs"
PRESETS = ("zero2", "zero3", "zero3_offload")
# Client optimizers that DeepSpeed's ZeRO accepts without "zero_allow_untested_optimizer"
# (deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS).
ZERO_TESTED_OPTIMIZERS = ("adamw", "adam")


@dataclass
class DistributedSpec:
    """How meta-training is spread over ranks (ARCHITECTURE.md §3)."""

    ds_config: str | None = fld(
        None,
        "DeepSpeed config for φ: a preset of ds_configs/ (zero2, zero3, zero3_offload) or a JSON path. "
        "null: one process, plain torch, no DeepSpeed.",
    )
    partition_base: bool = fld(
        False,
        "ZeRO-3-partition the frozen base over ranks (bases that do not fit one device). The inner "
        "step then trains a per-rank LoRA set: needs base.lora, meta.method=central and a ZeRO-3 ds_config.",
    )
    precision: str = fld(
        "auto",
        "φ's precision under DeepSpeed (fills the config's 'auto' bf16/fp16 fields): auto (bf16 on a "
        "GPU that supports it, else fp32), fp32, bf16.",
        choices=("auto", "fp32", "bf16"),
    )
    backend: str = fld(
        "auto",
        "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo, nccl.",
        choices=("auto", "gloo", "nccl"),
    )

    def __post_init__(self):
        check_choices(self)  # field names get their "distributed." prefix from the recipe loader
        require(
            not (self.partition_base and self.ds_config is None),
            "partition_base",
            "needs distributed.ds_config (a ZeRO-3 preset, e.g. zero3)",
        )


@dataclass
class DistContext:
    """This process's place in the run. ``ds_config`` is the effective DeepSpeed config (None: plain)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ds_config: dict | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def deepspeed(self) -> bool:
        return self.ds_config is not None

    @property
    def zero_stage(self) -> int:
        return int((self.ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every rank before the process group exists)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def launched_world_size() -> int:
    """The world size a launcher (deepspeed, torchrun, mpirun) announced; 1 without one."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs: presets, "auto" fields, checks that must fail before any work


def load_ds_config(name_or_path: str) -> tuple[dict, str]:
    """A preset name (``zero3``) or a JSON path -> (config dict, where it came from)."""
    path = Path(name_or_path)
    if not path.exists():
        stem = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
        path = PRESETS_DIR / f"{stem}.json"
    if not path.exists():
        raise ConfigError(
            f"distributed.ds_config={name_or_path!r}: neither a file nor a preset; presets: "
            f"{list(PRESETS)} (in {PRESETS_DIR})"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.ds_config: {path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _accelerator() -> str:
    """'cuda' when torch sees a GPU and DS_ACCELERATOR does not say otherwise, else 'cpu'."""
    forced = os.environ.get("DS_ACCELERATOR")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    if accelerator == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _fill(section: dict, key: str, value: Any, field_name: str, source: str) -> None:
    """Fill an "auto" (or missing) field; a concrete value must agree with the recipe."""
    cur = section.get(key, "auto")
    if cur == "auto":
        section[key] = value
    elif cur != value:
        raise ConfigError(
            f"{field_name}: the recipe gives {value!r} but {source} sets {key}={cur!r}; "
            f'set {key} to "auto" in {source} or change {field_name}'
        )


def resolve_ds_config(recipe, world: int, hidden_size: int, accelerator: str | None = None) -> dict:
    """The effective DeepSpeed config of φ for ``world`` ranks; ConfigError names the field to change.

    Fills from the recipe: ``train_batch_size`` (batch_size), ``train_micro_batch_size_per_gpu``
    (batch_size / world), ``gradient_accumulation_steps`` (1: a meta-step is one optimizer step),
    ``gradient_clipping`` (optim.grad_clip; DeepSpeed would otherwise apply its own default), the
    bf16/fp16 switches (distributed.precision) and the ZeRO-3 bucket sizes (from the hidden size, as
    transformers' Trainer does).
    """
    spec, accelerator = recipe.distributed, accelerator or _accelerator()
    cfg, source = load_ds_config(spec.ds_config)
    cfg = copy.deepcopy(cfg)
    require(
        recipe.batch_size % world == 0,
        "batch_size",
        f"{recipe.batch_size} episodes do not split over {world} ranks; use a multiple of {world}",
    )
    for key in ("optimizer", "scheduler"):
        require(
            key not in cfg,
            "distributed.ds_config",
            f"{source} has an '{key}' section; φ's optimizer comes from the recipe's optim section "
            "(a client torch optimizer), so remove it",
        )
    _fill(cfg, "train_batch_size", recipe.batch_size, "batch_size", source)
    _fill(cfg, "train_micro_batch_size_per_gpu", recipe.batch_size // world, "batch_size", source)
    _fill(cfg, "gradient_accumulation_steps", 1, "batch_size", source)
    _fill(cfg, "gradient_clipping", float(recipe.optim.grad_clip), "optim.grad_clip", source)

    precision = resolve_precision(spec.precision, accelerator)
    bf16, fp16 = cfg.setdefault("bf16", {}), cfg.setdefault("fp16", {})
    _fill(bf16, "enabled", precision == "bf16", "distributed.precision", source)
    _fill(fp16, "enabled", False, "distributed.precision", source)
    if precision == "bf16" and accelerator == "cpu":
        print0(
            "warning: distributed.precision=bf16 on CPU: φ trains in bf16 (the base stays in base.dtype)",
            file=sys.stderr,
        )

    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    require(
        stage in (1, 2, 3), "distributed.ds_config", f"{source}: zero_optimization.stage must be 1, 2 or 3"
    )
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("memory_efficient_linear") is True and recipe.meta.method == "jvp" and stage == 3:
        raise ConfigError(
            f"distributed.ds_config: {source} leaves zero_optimization.memory_efficient_linear on, "
            "which replaces torch's linear process-wide and breaks meta.method=jvp; set it to false"
        )
    zero.setdefault("memory_efficient_linear", False)  # DeepSpeed's default (true) patches F.linear

    name = recipe.optim.name
    if name not in ZERO_TESTED_OPTIMIZERS and not cfg.get("zero_allow_untested_optimizer", False):
        raise ConfigError(
            f"optim.name={name!r}: ZeRO rejects client optimizers it has not tested "
            f"(tested: {list(ZERO_TESTED_OPTIMIZERS)}); use optim.name=adamw, or set "
            f'"zero_allow_untested_optimizer": true in {source}'
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None) and cfg.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(
            f"distributed.ds_config: {source} offloads the optimizer to {offload}, where DeepSpeed "
            'refuses a client torch optimizer unless "zero_force_ds_cpu_optimizer": false is set'
        )
    if spec.partition_base:
        require(
            stage == 3,
            "distributed.ds_config",
            f"distributed.partition_base needs a ZeRO-3 config; {source} has stage {stage}",
        )
    return cfg


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


def check_recipe(recipe, world: int | None = None) -> dict | None:
    """All checks that need no process group: run before any work (and before spawning ranks).

    Returns the effective DeepSpeed config (None for the plain single-process path).
    """
    world = launched_world_size() if world is None else world
    spec = recipe.distributed
    if spec.ds_config is None:
        require(
            world == 1,
            "distributed.ds_config",
            f"{world} ranks were launched but the recipe names no DeepSpeed config; set "
            "distributed.ds_config=zero3 (or run one process)",
        )
        return None
    from transformers import AutoConfig

    field_name = "ta.init_from" if recipe.ta.init_from else "base.path"
    trunk = recipe.ta.init_from or recipe.base.path
    require(bool(trunk), field_name, "a model directory is required")
    try:
        hidden = AutoConfig.from_pretrained(trunk).hidden_size  # sizes the "auto" ZeRO buckets
    except OSError as e:
        raise ConfigError(f"{field_name}: {trunk} is not a readable model directory ({e})") from None
    return resolve_ds_config(recipe, world, hidden)


# ---------------------------------------------------------------------------------------------
# Process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ds_config: dict | None, backend: str = "auto") -> DistContext:
    """Join (or, for one process without a launcher, create) the process group."""
    if ds_config is None:
        return DistContext()
    if "WORLD_SIZE" not in os.environ:  # a plain `python meta.py` / `ckl meta-train`: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    import deepspeed
    import torch._dynamo  # noqa: F401  (zero.Init touches torch._dynamo; import it before)

    # ARCHITECTURE.md §9: without this, init_distributed JIT-builds a shared-memory op (~60 s) on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if _accelerator() == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _accelerator() == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(rank, world, local_rank, ds_config)


def shutdown() -> None:
    """Leave the process group (if one was created)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch_command(
    launcher: str, nproc: int, recipe: str, overrides: tuple[str, ...] | list[str]
) -> list[str]:
    """The command that runs ``ckl_toolkit/meta.py`` on ``nproc`` local ranks with ``launcher``."""
    script = str(Path(__file__).resolve().parent / "meta.py")
    args = [script, "--recipe", recipe, *overrides]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={nproc}",
            f"--master_port={_free_port()}",
            *args,
        ]
    raise ValueError(f"unknown launcher {launcher!r}")


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        torch.distributed.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ctx.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Per-key mean over ranks of scalar metrics (a sync point; NaN stays NaN)."""
    if ctx.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t)}


def episode_slice(batch_size: int, ctx: DistContext) -> slice:
    """The rows of the global meta-batch that rank ``ctx.rank`` runs: contiguous, equal, deterministic."""
    per_rank = batch_size // ctx.world
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


# ---------------------------------------------------------------------------------------------
# Models: the φ engine and the partitioned base


def ta_engine(ta: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext):
    """φ as a DeepSpeed engine around the client optimizer; ZeRO-3 partitions φ's parameters here."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=ta, optimizer=optimizer, config=ctx.ds_config)
    return engine


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


def load_partitioned_base(spec, ctx: DistContext, seed: int) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The base with its frozen weights ZeRO-3-partitioned over ranks and a per-rank LoRA set.

    The weights are built under ``zero.Init`` (transformers does that while a ``HfDeepSpeedConfig``
    is alive; only rank 0 reads the checkpoint values) and wrapped in a DeepSpeed engine without an
    optimizer (ZeRO-3 inference): its hooks gather each layer's shards before the layer's forward or
    backward and free them after. Such an engine registers no gradient hooks, so autograd.grad with
    respect to the LoRA parameters reduces nothing across ranks.

    The LoRA adapters are added after the engine exists, so they are ordinary replicated tensors the
    engine never sees: each rank's inner step edits its own copy. They are seeded like
    ``models.load_causal_lm`` seeds them in one process (``from_pretrained`` draws no random numbers).

    Returns:
        (model, trainable LoRA parameters by name).
    """
    import deepspeed
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from ckl_toolkit.core.models import DTYPES

    require(bool(spec.path), "base.path", "a model directory is required")
    cfg = base_ds_config(ctx.ds_config, spec.dtype)
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


# ---------------------------------------------------------------------------------------------
# φ in one piece (rank 0), for checkpoints, validation and export


def consolidated_ta(engine, ctx: DistContext):
    """A plain TrainAttentionModel holding φ's full weights on rank 0, None elsewhere.

    Collective: every rank must call it. ZeRO-3 gathers one layer at a time to rank 0
    (``_zero3_consolidated_16bit_state_dict``: the module's own dtype, so fp32 when φ trains in
    fp32); the copy is built on the meta device and takes those tensors.
    """
    from transformers import AutoModel

    from ckl_toolkit.core.ta_model import TrainAttentionModel

    ta = engine.module
    if ctx.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:  # ZeRO-1/2: every rank holds the full weights
        state = ta.state_dict() if ctx.is_main else None
    if not ctx.is_main:
        return None
    # The tensors are views into flat buffers (one per gathered layer under ZeRO-3, one per group
    # under ZeRO-1/2), which safetensors refuses to save: give each its own storage.
    for key in list(state):
        state[key] = state[key].clone()
    with torch.device("meta"):
        copy_ = TrainAttentionModel(AutoModel.from_config(ta.trunk.config), ta.head.in_features)
    copy_.load_state_dict(state, assign=True, strict=True)
    for name, buf in ta.named_buffers():  # non-persistent buffers (rotary tables) are not in a state dict
        owner, _, leaf = name.rpartition(".")
        copy_.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    return copy_.to(torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# Checkpoints: φ consolidated (safetensors) + optimizer state per rank (safetensors + JSON)


def _storable(obj: Any) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_storable(v) for v in obj)
    if isinstance(obj, dict):
        return all(_storable(k) and _storable(v) for k, v in obj.items())
    return False


def optimizer_state(engine) -> dict:
    """This rank's ZeRO optimizer state without pickles.

    DeepSpeed's state dict holds a few objects (the loss scaler, stage 2's parameter slice map):
    they are left out here and rebuilt from the running engine on load, which is exact for the
    static loss scale of fp32/bf16 training.
    """
    return {k: v for k, v in engine.optimizer.state_dict().items() if _storable(v)}


def load_optimizer_state(engine, saved: dict, ctx: DistContext) -> None:
    """Restore this rank's ZeRO optimizer state: Adam moments and the fp32 master partition.

    ZeRO-3 also rewrites φ's parameter partition from that master copy; stages 1/2 need φ's
    module weights loaded first (their master copy is checked against them).
    """
    merged = {**engine.optimizer.state_dict(), **saved}
    per_rank: list[dict | None] = [None] * ctx.world
    per_rank[ctx.rank] = merged
    engine.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)


def save_checkpoint_distributed(
    ckpt_root: Path, step: int, engine, ctx: DistContext, tokenizer, recipe_hash: str, keep: int
) -> None:
    """Write ``ckpt_root/step_N`` from every rank; only rank 0 renames it into place and moves ``latest``.

    Rank 0 creates the temporary directory (``checkpoint.save_checkpoint``: complete or absent) and
    broadcasts its path; each rank writes ``state_rank{r}`` (its optimizer partition, RNG state,
    data position); rank 0 adds the consolidated φ (``ta/``) and ``distributed.json``. The rename
    and the ``latest`` pointer happen after a barrier, so ``latest`` never names a step that some
    rank has not finished. ``run_dir`` must be on a filesystem every node shares.
    """
    from ckl_toolkit.core.ta_model import save_ta_model

    full = consolidated_ta(engine, ctx)  # collective

    def write_rank(tmp: Path) -> None:
        save_state(
            tmp / f"state_rank{ctx.rank:05d}",
            {
                "step": step,
                "rank": ctx.rank,
                "world_size": ctx.world,
                "optimizer": optimizer_state(engine),
                "rng": rng_state(),
                "recipe_hash": recipe_hash,
                "torch": torch.__version__,
            },
        )

    def write_all(tmp: Path) -> None:
        broadcast_object(ctx, str(tmp))
        write_rank(tmp)
        save_ta_model(full, tmp / "ta", tokenizer, recipe_hash)
        (tmp / "distributed.json").write_text(
            json.dumps({"world_size": ctx.world, "zero_stage": ctx.zero_stage, "step": step}, indent=2) + "\n"
        )
        barrier(ctx)  # every rank's state file is in tmp before it becomes step_N

    if ctx.is_main:
        save_checkpoint(ckpt_root, step, write_all, keep=keep)
    else:
        write_rank(Path(broadcast_object(ctx, None)))
        barrier(ctx)
    barrier(ctx)  # nobody runs ahead while rank 0 renames and prunes


def resume_distributed(ckpt_root: Path, engine, ctx: DistContext, recipe_hash: str, resume: str) -> int:
    """Load the latest complete checkpoint into the engine and RNG; return the step to continue from."""
    from ckl_toolkit.core.ta_model import load_ta_model

    name = broadcast_object(ctx, getattr(latest_checkpoint(ckpt_root), "name", None) if ctx.is_main else None)
    if name is None:
        return 0
    ckpt = ckpt_root / name
    if resume == "never":
        raise ConfigError(
            f"resume: {ckpt.parent.parent} already holds {name}; use resume=auto or a new run_dir"
        )
    if not (ckpt / "distributed.json").exists():
        raise ConfigError(
            f"resume: {ckpt} was written by a run without DeepSpeed (distributed.ds_config: null); "
            "resume it that way, or use a new run_dir"
        )
    meta = json.loads((ckpt / "distributed.json").read_text())
    if meta["world_size"] != ctx.world:
        raise ConfigError(
            f"resume: {ckpt} was written by {meta['world_size']} ranks and this run has {ctx.world}; "
            f"ZeRO keeps φ's optimizer state partitioned by rank, so resume with {meta['world_size']} "
            "ranks (or use a new run_dir)"
        )
    if meta.get("zero_stage") != ctx.zero_stage:
        raise ConfigError(
            f"distributed.ds_config: {ckpt} was written with ZeRO stage {meta.get('zero_stage')}, "
            f"this run uses stage {ctx.zero_stage}"
        )
    state = load_state(ckpt / f"state_rank{ctx.rank:05d}")
    if state["recipe_hash"] != recipe_hash:
        print0(f"warning: {ckpt} was written by a different recipe; resuming anyway", file=sys.stderr)
    if ctx.zero_stage < 3:  # replicated φ weights: from the consolidated copy
        engine.module.load_state_dict(load_ta_model(ckpt / "ta").state_dict())
    load_optimizer_state(engine, state["optimizer"], ctx)
    _set_rng_state(state["rng"])
    step = int(state["step"])
    engine.global_steps, engine.global_samples = step, step * engine.train_batch_size()
    return step


def save_effective_config(run_dir: Path, ctx: DistContext) -> None:
    """Print the effective DeepSpeed config and save it as ``run_dir/ds_config.json`` (rank 0)."""
    if ctx.is_main and ctx.ds_config is not None:
        text = json.dumps(ctx.ds_config, indent=2, sort_keys=True)
        print0(f"DeepSpeed config ({ctx.world} rank{'s' if ctx.world > 1 else ''}):\n{text}")
        from ckl_toolkit.core.io import write_text_atomic

        write_text_atomic(run_dir / "ds_config.json", text + "\n")
