"""Pretrain a tiny Llama from scratch on a synthetic world, so it knows the world's facts.

One entry point, :func:`pretrain`: train a BPE tokenizer on ``pretrain.jsonl``, pack the corpus into
fixed-length sequences, train a ``LlamaForCausalLM`` with AdamW (linear warm-up, cosine decay to 10%),
measure how many facts it knows (exact match on a seen template and on the held-out probe template),
and save an HF directory. The result is cached by the world's and the config's hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ckl_toolkit.core.io import MetricsLogger, atomic_dir, read_jsonl, write_json_atomic
from ckl_toolkit.data.tokenizer import train_bpe_tokenizer
from ckl_toolkit.evaluation.probes import score_probes

REPORT = "pretrain_report.json"
FORMAT = "ckl-pretrain-v1"


@dataclass
class PretrainConfig:
    """Base-model shape and pretraining schedule (defaults: the demo's 2.2M-parameter base)."""

    vocab_size: int = 1024  # BPE vocabulary, specials included (~175-token evidence documents)
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 512  # SwiGLU width
    tie_embeddings: bool = True  # share input embeddings and LM head
    seq_len: int = 128  # tokens per packed training sequence
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 50  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    max_steps: int = 900
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0  # model init and batch order
    threads: int = 2  # torch CPU threads
    eval_facts: int = 400  # facts sampled for the knowledge report
    eval_every: int = 0  # also measure knowledge every N steps (0: only at the end)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name}={getattr(self, name)}: must be >= 1")
        for name in ("seq_len", "batch_size", "max_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name}={getattr(self, name)}: must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"pretrain.hidden_size={self.hidden_size}: must be divisible by num_heads={self.num_heads}"
            )
        if not self.lr > 0:
            raise ValueError(f"pretrain.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"pretrain.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"pretrain.warmup_steps={self.warmup_steps}: must be in [0, max_steps)")
        if self.eval_facts < 0 or self.eval_every < 0:
            raise ValueError("pretrain.eval_facts and pretrain.eval_every must be >= 0")

    @classmethod
    def default(cls, seed: int = 0) -> PretrainConfig:
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> PretrainConfig:
        """A smaller base for ``WorldConfig.quick()``: pretrains in about a minute on 2 cores."""
        shape = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384)
        return cls(**shape, batch_size=16, lr=5e-3, warmup_steps=20, max_steps=350, seed=seed)

    def model_config(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=max(512, self.seq_len),
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


def cache_key(world_dir: str | Path, cfg: PretrainConfig) -> str:
    """Hash of the corpus, the probed facts and the training config (threads and eval excluded).

    The world's evidence settings are not in it: they do not change the corpus, so a base model
    stays valid when only TO-LEARN or meta-training documents are redrawn.
    """
    h = hashlib.sha256()
    for name in ("pretrain.jsonl", "pretrain_facts.jsonl"):
        h.update((Path(world_dir) / name).read_bytes())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "eval_facts", "eval_every")}
    h.update(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def is_cached(out_dir: str | Path, key: str) -> bool:
    """True if ``out_dir`` holds a complete model trained for ``key``."""
    out = Path(out_dir)
    needed = ("config.json", "model.safetensors", "tokenizer.json", REPORT)
    if not all((out / f).is_file() for f in needed):
        return False
    return json.loads((out / REPORT).read_text()).get("cache_key") == key


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate ``<bos> text <eos>`` documents and cut them into (N, seq_len) rows."""
    ids: list[int] = []
    for row in tokenizer(texts)["input_ids"]:  # the post-processor already prepends <bos>
        ids += row + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than pretrain.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def knowledge(model, tokenizer, facts: list[dict]) -> dict[str, float]:
    """Exact match of the facts' objects, probed in a seen template and in the held-out one."""
    objects = [f["object"] for f in facts]
    seen = score_probes(model, tokenizer, [f["probe_seen"] for f in facts], objects)
    held = score_probes(model, tokenizer, [f["probe_heldout"] for f in facts], objects)
    return {"em_seen": seen.em, "em_heldout": held.em, "acc_heldout": held.acc, "n_facts": len(facts)}


def eval_sample(facts: list[dict], cfg: PretrainConfig) -> list[dict]:
    """The facts the knowledge report scores: a seeded sample of ``cfg.eval_facts``."""
    return random.Random(cfg.seed).sample(facts, min(cfg.eval_facts, len(facts)))


def _batches(data: torch.Tensor, batch_size: int, gen: torch.Generator):
    """Endless (B, T) batches: a fresh random permutation of the rows every epoch."""
    while True:
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield data[perm[i : i + batch_size]]


def train_loop(
    model, data: torch.Tensor, cfg: PretrainConfig, logger: MetricsLogger, evaluate, progress: bool
):
    """The plain loop: batch, forward, loss, backward, clip, step; log every 10 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    batches = _batches(data, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    model.train()
    t0, bar = time.time(), tqdm(range(cfg.max_steps), desc="pretrain", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = next(batches)  # (B, T) token ids, no padding
        loss = model(input_ids=x, labels=x).loss  # mean next-token NLL in nats
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 10 == 0 or step == cfg.max_steps - 1:
            logger.log(step=step, loss=loss.item(), lr=lr_at(step, cfg), elapsed_s=time.time() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            logger.log(step=step + 1, elapsed_s=time.time() - t0, **evaluate())
            model.train()
    return loss.item(), time.time() - t0


def pretrain(world_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig, progress: bool = True) -> Path:
    """Pretrain a base model on a world (or return the cached one) and save it as an HF directory.

    Args:
        world_dir: a directory written by ``ckl_toolkit.data.world.write_world``.
        out_dir: where the model, tokenizer, ``metrics.jsonl`` and ``pretrain_report.json`` go.
        cfg: model shape and schedule.
        progress: show a tqdm bar.

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
    """
    world_dir, out = Path(world_dir), Path(out_dir)
    key = cache_key(world_dir, cfg)
    if is_cached(out, key):
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        _train_and_save(world_dir, out, cfg, key, progress)
    finally:
        torch.set_num_threads(threads)
    return out


def _train_and_save(world_dir: Path, out: Path, cfg: PretrainConfig, key: str, progress: bool) -> None:
    texts = [r["text"] for r in read_jsonl(world_dir / "pretrain.jsonl", required=("text",))]
    facts = eval_sample(read_jsonl(world_dir / "pretrain_facts.jsonl"), cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, not an append to an old one
    logger = MetricsLogger(out / "metrics.jsonl")
    torch.manual_seed(cfg.seed)
    tok = train_bpe_tokenizer(texts, cfg.vocab_size)
    data = pack(tok, texts, cfg.seq_len)  # (N, seq_len)
    model = LlamaForCausalLM(cfg.model_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    loss, seconds = train_loop(model, data, cfg, logger, lambda: knowledge(model, tok, facts), progress)
    scores = knowledge(model, tok, facts)
    logger.log(step=cfg.max_steps, elapsed_s=seconds, **scores)
    report = {
        "format": FORMAT,
        "cache_key": key,
        "world_dir": str(world_dir),
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "epochs": cfg.max_steps * cfg.batch_size / len(data),  # passes over the packed corpus
        "final_loss": loss,
        "train_seconds": seconds,  # wall clock of the loop, periodic evaluations included
        **scores,
    }
    with atomic_dir(out) as tmp:  # the old directory stays whole until the new one is complete
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copy(out / "metrics.jsonl", tmp / "metrics.jsonl")
        write_json_atomic(tmp / REPORT, report)
