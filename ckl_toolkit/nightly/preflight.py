"""Before a nightly run: its paths, its planned work, its RecAdam schedule and its memory, resolved.

``ckl update`` calls :func:`check_paths` before loading anything (a missing model, TA model or stream
fails in seconds, naming the field and the command that creates it) and :func:`planned_work` /
:func:`check_schedule` once the plan is fixed; ``ckl validate`` and ``ckl update --dry-run`` print
:func:`resolve_run`: the same checks and figures without training or writing anything.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ckl_toolkit.core.paths import hub_id, require_file, require_model_dir, require_ta_dir
from ckl_toolkit.training.batching import count_rows

if TYPE_CHECKING:
    from ckl_toolkit.nightly.config import UpdateRecipe
    from ckl_toolkit.nightly.plan import Plan


def check_paths(recipe: UpdateRecipe) -> None:
    """Every path the run reads exists: the model, the TA model (taalm), the stream and pool files.

    Raises:
        ConfigError: naming the field, and the command that writes the path where it is known.
    """
    require_model_dir(recipe.target.path, "target.path")
    if recipe.weights.method == "taalm":
        require_ta_dir(recipe.weights.ta_path, "weights.ta_path")
    for field, stream in (("data.stream", recipe.data.stream), ("data.pool", recipe.data.pool)):
        if stream is None or (field == "data.pool" and recipe.mix_review.mix_ratio == 0):
            continue
        for path in stream.paths:
            if not glob.has_magic(path):  # a glob may match nothing on a quiet night
                require_file(path, f"{field}.paths")
    for name in ("canaries", "to_learn", "heldout"):
        path = getattr(recipe.gate, name)
        if path:
            require_file(path, f"gate.{name}")


@dataclass
class Work:
    """What a run will do: optimizer steps and real tokens over all its epochs, rows per epoch, and the
    tokens of its new documents (one pass, no rehearsal: what the stream brought)."""

    steps: int
    tokens: int
    rows: list[int]
    new_tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def planned_work(recipe: UpdateRecipe, plan: Plan, tokenizer) -> Work:
    """Tokenise every epoch's documents (new + rehearsal, in training order) as the loop will batch them."""
    b, steps, tokens, rows = recipe.batching, 0, 0, []
    for epoch in range(recipe.epochs):
        docs, _ = plan.epoch_documents(recipe.mix_review, b, recipe.seed, epoch)
        n_rows, n_tokens = count_rows(docs, tokenizer, b.max_length, b.pack)
        steps, tokens = steps + math.ceil(n_rows / b.batch_size), tokens + n_tokens
        rows.append(n_rows)
    _, new_tokens = count_rows(plan.new, tokenizer, b.max_length, pack=False)
    return Work(steps, tokens, rows, new_tokens)


def check_schedule(recipe: UpdateRecipe, steps: int) -> dict | None:
    """RecAdam's λ(t) over the planned steps (None for AdamW); refuses one under which nothing is learned.

    Raises:
        ConfigError: λ(t) < 1e-3 at every planned step (``RecAdamSpec.check``).
    """
    if recipe.optim.name != "recadam" or steps == 0:
        return None
    r = recipe.optim.recadam
    lo, hi = r.check(steps)
    k, t0 = r.schedule(steps)
    return {"lambda_first": lo, "lambda_last": hi, "t0_steps": t0, "k_per_step": k, "steps": steps}


# ---------------------------------------------------------------------------------------------
# Memory: an estimate from the model's tensor shapes, calibrated on SmolLM2-135M (benchmarks/).

BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
OVERHEAD_MB = 600  # Python, torch, tokenizers, the stream's documents
# Activations kept per token and layer, in hidden-size units (fp32 Llama layer with LoRA; calibrated)
ACTIVATION_UNITS = 16


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tensor_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a model directory's safetensors files (headers only)."""
    model_dir = Path(model_dir)
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        shapes.update({k: v["shape"] for k, v in _header(path).items() if k != "__metadata__"})
    return shapes


def lora_parameters(shapes: dict[str, list[int]], r: int, target_modules: str) -> int:
    """Parameters of peft LoRA adapters of rank r on the model's linear layers (all-linear or a list)."""
    wanted = None if target_modules == "all-linear" else {t.strip() for t in target_modules.split(",")}
    total = 0
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) != 2 or parts[-1] != "weight" or "layers" not in parts:
            continue  # embeddings and the LM head are not "all-linear" layers
        if wanted is None or parts[-2] in wanted:
            total += r * (shape[0] + shape[1])
    return total


def estimate_memory(recipe: UpdateRecipe, loss_chunk: int) -> dict | None:
    """Peak resident memory of one step, in MB, by part (None for a hub model: no local shapes).

    Parts: the target's weights; trainable state (gradient, Adam's two moments, RecAdam's anchor; fp32);
    the TA model; activations kept for backward (all layers, or with gradient checkpointing each
    layer's input plus one layer's working set); the LM-head logits (one chunk, or the whole batch);
    a fixed overhead. Calibrated against ``benchmarks/bench_update_memory.py`` on SmolLM2-135M.
    """
    t = recipe.target
    if hub_id(t.path) is not None:
        return None
    config = json.loads((Path(t.path) / "config.json").read_text())
    shapes = tensor_shapes(t.path)
    params = sum(math.prod(s) for s in shapes.values())
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    inter = config.get("intermediate_size", 4 * hidden)
    # a subset target is estimated as a full one: an upper bound (its frozen weights need no state)
    trainable = {"full": params, "subset": params, "lora": 0, "qlora": 0, "kadapter": 0}[t.kind]
    if t.kind in ("lora", "qlora"):
        trainable = lora_parameters(shapes, t.lora.r, t.lora.target_modules)
    elif t.kind == "kadapter":  # per adapter: down/up projections + block_layers transformer layers
        k, width = t.kadapter, t.kadapter.adapter_hidden
        adapters = len(k.layers) if k.layers else len({0, layers // 2, layers - 1})
        trainable = adapters * (2 * hidden * width + k.block_layers * 12 * width**2) + 2 * hidden
    per_param = 4 * (3 + (recipe.optim.name == "recadam"))  # grad, m, v (+ anchor), fp32
    per_param += 4 * (t.kind not in ("full", "subset"))  # adapters are not in the base's weights
    tokens = recipe.batching.batch_size * recipe.batching.max_length
    unit = 4 * tokens * hidden  # one fp32 (tokens, hidden) tensor
    per_layer = ACTIVATION_UNITS * unit + 4 * 4 * tokens * inter
    activations = layers * unit + per_layer if t.gradient_checkpointing else layers * per_layer
    if t.kind == "kadapter":
        activations = per_layer  # the frozen base keeps nothing for backward
    logits = 3 * 4 * min(loss_chunk, tokens) * vocab if loss_chunk else 5 * 4 * tokens * vocab
    ta = 0
    if recipe.weights.method == "taalm" and recipe.weights.ta_path:
        ta = sum(f.stat().st_size for f in Path(recipe.weights.ta_path).glob("*.safetensors"))
    elif recipe.weights.method == "rho1":
        ta = params * BYTES[t.dtype]  # the frozen reference copy
    parts = {
        "weights": params * BYTES[t.dtype],
        "trainable_state": trainable * per_param,
        "weigher": ta,
        "activations": activations,
        "logits": logits,
        "overhead": OVERHEAD_MB * 2**20,
    }
    mb = {k: round(v / 2**20) for k, v in parts.items()}
    return {
        "peak_mb": sum(mb.values()),
        "parts_mb": mb,
        "trainable_parameters": trainable,
        "parameters": params,
    }


# ---------------------------------------------------------------------------------------------
# The whole run, resolved without running it.


def runtime(recipe: UpdateRecipe) -> dict:
    """Where the run would compute, and whether this machine can run its target kind.

    Raises:
        ConfigError: QLoRA without CUDA or bitsandbytes (``training.targets.check_target_runtime``).
    """
    from ckl_toolkit.training.targets import check_target_runtime

    check_target_runtime(recipe.target)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "backend": recipe.engine.backend,
        "threads": recipe.threads or torch.get_num_threads(),
    }


def resolve_run(recipe: UpdateRecipe, loss_chunk: int) -> dict:
    """The run ``ckl update`` would start now: paths, documents, tokens, steps, λ(t), runtime, memory.

    Reads the stream and the served version's ledger like the run (bad records are reported, nothing
    is quarantined or written) and tokenises the planned documents.

    Raises:
        ConfigError: a missing path, a runtime this machine lacks, or a RecAdam schedule that cannot learn.
        StreamError: bad input with on_error=fatal.
    """
    from ckl_toolkit.core.models import load_tokenizer
    from ckl_toolkit.nightly.contract import current_version
    from ckl_toolkit.nightly.ledger import DocumentLedger
    from ckl_toolkit.nightly.plan import collect_plan
    from ckl_toolkit.nightly.run import LEDGER_FILE

    check_paths(recipe)
    out = {"runtime": runtime(recipe)}
    version = current_version(recipe.output_dir)
    ledger = DocumentLedger(
        version / LEDGER_FILE if version else Path(recipe.output_dir) / "work" / LEDGER_FILE
    )
    data = recipe.data
    with tempfile.TemporaryDirectory() as quarantine:  # a dry pass: bad records are counted, not kept
        stream = dataclasses.replace(data.stream, quarantine_dir=quarantine)
        pool = data.pool if recipe.mix_review.mix_ratio > 0 else None
        if pool is not None:
            pool = dataclasses.replace(pool, quarantine_dir=quarantine)
        oracle = recipe.weights.object_field if recipe.weights.method == "oracle" else None
        plan = collect_plan(stream, pool, ledger, version, "dry-run", "", data.max_documents, oracle)
    work = planned_work(recipe, plan, load_tokenizer(recipe.target.path))
    out["served_version"] = version.name if version else None
    out["documents"] = {
        "new": len(plan.new),
        "tokens": work.new_tokens,
        "rehearsal_pool": len(plan.pool),
        "stream": plan.stream_stats,
    }
    out["work"] = work.to_dict()
    out["recadam"] = check_schedule(recipe, work.steps)
    out["memory_estimate"] = estimate_memory(recipe, loss_chunk)
    return out
