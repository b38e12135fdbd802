"""Meta-train a Train-Attention model: ``ckl meta-train --recipe R [key=value ...]``.

The loop, per TA step (DESIGN §2, the paper's Algorithm 1 with an exact meta-gradient):

    w      = φ(D)                             token weights of the documents, (B, T-1)
    θ'     = θ - a·∇θ TWL(θ; D, w)            one weighted inner step of the base (then undone)
    L_T    = NLL of the task objects under θ'
    dL/dw  = exact, from one directional derivative (no second-order autograd)
    φ     <- AdamW step on (w · stopgrad(dL/dw)).sum()

The base θ never keeps an update: every episode starts from the same θ.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ckl_toolkit.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
)
from ckl_toolkit.config import ConfigError, load_recipe, recipe_hash, to_yaml
from ckl_toolkit.io import MetricsLogger, read_jsonl, write_text_atomic
from ckl_toolkit.lama_ckl import ProtocolConfig, run_lama_ckl
from ckl_toolkit.meta_config import MetaRecipe
from ckl_toolkit.metagrad import meta_gradient
from ckl_toolkit.models import load_causal_lm, trainable_parameters
from ckl_toolkit.ta_model import TrainAttentionModel, build_ta_model, load_ta_model, save_ta_model
from ckl_toolkit.text import encode, object_target_mask
from ckl_toolkit.weighting import TrainAttentionWeights

PAIR_FIELDS = ("text", "task", "object")


@dataclass
class EpisodeBatch:
    doc_ids: torch.Tensor  # (B, T) documents D
    doc_mask: torch.Tensor  # (B, T)
    doc_obj: torch.Tensor  # (B, T-1) bool: object tokens in D (diagnostics only)
    task_ids: torch.Tensor  # (B, Tt) tasks T (probes)
    task_mask: torch.Tensor  # (B, Tt)
    task_obj: torch.Tensor  # (B, Tt-1) bool: the object's last occurrence in the task


def load_pairs(path: str, field_name: str) -> list[dict]:
    if not path:
        raise ConfigError(f"{field_name}: a JSONL file of meta-training pairs is required")
    if not Path(path).exists():
        raise ConfigError(f"{field_name}: {path} does not exist")
    rows = read_jsonl(path, required=PAIR_FIELDS)
    for i, r in enumerate(rows, start=1):
        if r["object"] not in r["task"]:
            raise ConfigError(f"{path}:{i}: field 'object' {r['object']!r} does not occur in 'task'")
    return rows


def episode_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The pairs of TA step ``step``: a seeded permutation per epoch, read in order.

    The position in the data is a pure function of the step, so a resumed run sees exactly the
    episodes an uninterrupted one would.
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def make_episode_batch(tokenizer, rows: list[dict], recipe: MetaRecipe) -> EpisodeBatch:
    docs, tasks, objects = [r["text"] for r in rows], [r["task"] for r in rows], [r["object"] for r in rows]
    d = encode(tokenizer, docs, recipe.data.max_length)
    t = encode(tokenizer, tasks, recipe.data.task_max_length)
    return EpisodeBatch(
        d.input_ids, d.attention_mask, object_target_mask(d, docs, objects, "all"),
        t.input_ids, t.attention_mask, object_target_mask(t, tasks, objects, "last"),
    )


def weight_stats(w: torch.Tensor, batch: EpisodeBatch) -> dict[str, float]:
    """Mean weight on the documents' object tokens vs every other real token: what φ has learned."""
    real = batch.doc_mask[:, 1:].bool()
    obj, other = batch.doc_obj & real, ~batch.doc_obj & real
    return {
        "w_object": float(w[obj].mean()) if obj.any() else float("nan"),
        "w_other": float(w[other].mean()) if other.any() else float("nan"),
    }


def validate(ta: TrainAttentionModel, base_spec, tokenizer, val_rows: list[dict], recipe: MetaRecipe) -> dict:
    """The Top-Acc protocol on a few held-out facts: fine-tune a fresh base copy with φ's weights."""
    rows = [{"evidence": r["text"], "task_descriptive": r["task"], "object": r["object"]}
            for r in val_rows[: recipe.val.pairs]]
    target = load_causal_lm(base_spec)  # fresh θ for every validation
    cfg = ProtocolConfig(epochs=recipe.val.epochs, lr=recipe.val.lr, batch_size=recipe.val.batch_size,
                         max_length=recipe.data.max_length, seed=recipe.seed)
    ta_was_training = ta.training
    res = run_lama_ckl(target, tokenizer, rows, [], TrainAttentionWeights(ta), cfg, progress=False)
    ta.train(ta_was_training).requires_grad_(True)
    s = res.summary()
    return {"val_top_acc": s["top_acc"], "val_top_em": s["top_em"], "val_em_epoch": s["em_epoch"]}


def save_run_checkpoint(run_dir: Path, step: int, ta, optimizer, tokenizer, recipe: MetaRecipe) -> None:
    def write(tmp: Path) -> None:
        save_ta_model(ta, tmp / "ta", tokenizer, recipe_hash(recipe))
        save_state(tmp / "state", {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                                   "recipe_hash": recipe_hash(recipe), "torch": torch.__version__})

    save_checkpoint(run_dir / "checkpoints", step, write, keep=recipe.keep_checkpoints)


def resume_from(run_dir: Path, ta: TrainAttentionModel, optimizer, recipe: MetaRecipe) -> int:
    """Load the latest checkpoint into (ta, optimizer, RNG); return the step to continue from."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return 0
    if recipe.resume == "never":
        raise ConfigError(f"resume: {run_dir} already holds {ckpt.name}; use resume=auto or a new run_dir")
    state = load_state(ckpt / "state")
    if state["recipe_hash"] != recipe_hash(recipe):
        print(f"warning: {ckpt} was written by a different recipe; resuming anyway", file=sys.stderr)
    ta.load_state_dict(load_ta_model(ckpt / "ta").state_dict())
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return checkpoint_step(ckpt)


def meta_train(recipe: MetaRecipe) -> Path:
    """Run (or resume) meta-training; returns the directory of the final TA model."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", to_yaml(recipe))

    # --- models: the base θ (frozen apart from the undone inner step) and φ
    tokenizer = AutoTokenizer.from_pretrained(recipe.base.path)
    base = load_causal_lm(recipe.base).requires_grad_(False)
    params = trainable_parameters(base)  # the subset the inner step moves
    for p in params.values():
        p.requires_grad_(True)
    ta = build_ta_model(recipe.ta.init_from or recipe.base.path, recipe.ta.num_layers)
    ta.train()
    optimizer = torch.optim.AdamW(ta.parameters(), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)

    pairs = load_pairs(recipe.data.train, "data.train")
    val_rows = load_pairs(recipe.data.val, "data.val") if recipe.data.val else []
    start = resume_from(run_dir, ta, optimizer, recipe)
    metrics = MetricsLogger(run_dir / "metrics.jsonl")
    if start:
        print(f"resuming from step {start}")

    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="meta-train",
               disable=not recipe.progress)
    t0 = time.perf_counter()
    for step in bar:
        rows = [pairs[i] for i in episode_indices(len(pairs), recipe.batch_size, step, recipe.seed)]
        batch = make_episode_batch(tokenizer, rows, recipe)

        w = ta(batch.doc_ids, batch.doc_mask)[:, 1:]  # (B, T-1) token weights in (0, 1), with graph to φ
        out = meta_gradient(base, params, batch.doc_ids, batch.doc_mask, w.detach(),
                            batch.task_ids, batch.task_mask, batch.task_obj, recipe.meta)
        surrogate = (w * out.dL_dw).sum()  # its gradient w.r.t. φ is the exact meta-gradient
        optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(ta.parameters(), recipe.optim.grad_clip or math.inf)
        optimizer.step()

        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            record = {"step": done, "outer_loss": out.outer_loss, "outer_loss_before": out.outer_loss_before,
                      "inner_loss": out.inner_loss, "grad_norm": float(grad_norm),
                      "seconds": time.perf_counter() - t0, **weight_stats(w.detach(), batch)}
            if val_rows and (done == recipe.steps or (recipe.val_every and done % recipe.val_every == 0)):
                record.update(validate(ta, recipe.base, tokenizer, val_rows, recipe))
            metrics.log(**record)
            bar.set_postfix(outer=f"{out.outer_loss:.3f}", w_obj=f"{record['w_object']:.2f}",
                            w_oth=f"{record['w_other']:.2f}")
        if done == recipe.steps or (recipe.save_every and done % recipe.save_every == 0):
            save_run_checkpoint(run_dir, done, ta, optimizer, tokenizer, recipe)

    final = save_ta_model(ta, run_dir / "ta", tokenizer, recipe_hash(recipe))
    return final


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python ckl_toolkit/meta.py --recipe R [key=value ...]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(MetaRecipe, args.recipe, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.dry_run:
        print(to_yaml(recipe))
        return
    print(f"TA model written to {meta_train(recipe)}")


if __name__ == "__main__":
    main()
