"""RecAdam: the annealed pull, Adam on the task gradient, anchors in the state, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ckl_toolkit.training.recadam import RecAdam, recadam_lambda

K, T0 = 0.5, 30  # a schedule short enough to cross in a test: λ goes 0 -> 1 over t ~ 15..45


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True) * 3.0  # a target far from the initial function


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_lambda_schedule():
    assert recadam_lambda(T0, K, T0) == 0.5
    assert recadam_lambda(T0 + 10, K, T0) == pytest.approx(1 / (1 + math.exp(-5)))
    assert recadam_lambda(T0 - 10, K, T0) == pytest.approx(1 / (1 + math.exp(5)))
    values = [recadam_lambda(t, K, T0) for t in range(0, 80)]
    assert all(a < b for a, b in zip(values, values[1:]))
    # Far tails must neither overflow nor leave [0, 1].
    assert recadam_lambda(-(10**6), K, T0) == 0.0 and recadam_lambda(10**6, K, T0) == 1.0


def test_pull_follows_lambda_at_every_step():
    # Zero gradient => Adam's term is exactly 0, so each step is only −lr·(1−λ(t))·γ·(θ_t − θ*).
    lr, gamma = 1e-4, 500.0  # lr·γ = 0.05: θ−θ* shrinks slowly, so it stays well above rounding
    p = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    anchor = p.detach() + torch.randn(5, 3, dtype=torch.float64)
    opt = RecAdam([p], lr=lr, anneal_k=K, anneal_t0=T0, gamma=gamma, anchors={p: anchor})
    for t in range(1, 61):
        p.grad = torch.zeros_like(p)
        before = p.detach().clone()
        opt.step()
        observed = (p.detach() - before) / (-lr * gamma * (before - anchor))  # = 1 − λ(t) elementwise
        torch.testing.assert_close(observed, torch.full_like(observed, 1 - recadam_lambda(t, K, T0)))


def test_update_matches_formula_early_and_late():
    # The full step, against an independent float64 transcription of Chen et al.'s update.
    lr, gamma, wd, (b1, b2), eps = 1e-4, 5000.0, 0.01, (0.9, 0.999), 1e-8
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, dtype=torch.float64))
    theta_star = p.detach().clone()
    opt = RecAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, anneal_k=K, anneal_t0=T0, gamma=gamma)
    theta, m, v = theta_star.clone(), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    share_of_pull = {}
    for t in range(1, 71):
        g = torch.randn(6, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        lam = 1 / (1 + math.exp(-K * (t - T0)))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        adam = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        pull = gamma * (theta - theta_star)
        theta = theta - lr * (lam * adam + (1 - lam) * pull + wd * theta)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-15)
        share_of_pull[t] = ((1 - lam) * pull).norm() / (lam * adam).norm()
    assert share_of_pull[5] > 10  # early: the pull dominates the step
    assert share_of_pull[70] < 0.01  # late: it is Adam


def test_late_recadam_is_adamw():
    # With λ == 1 (t0 far in the past) RecAdam must reduce to torch's AdamW, bit for bit.
    a, b = _model(), _model()
    ra = RecAdam(a.parameters(), lr=1e-3, weight_decay=0.1, anneal_t0=-(10**4), gamma=1.0)
    aw = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1)
    _train(a, ra, range(20))
    _train(b, aw, range(20))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_penalty_applies_to_every_group():
    # The released baseline's defect: a no-decay group (where it put the LoRA matrices) got no pull.
    m = _model()
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in m.named_parameters() if n.endswith("bias")]
    opt = RecAdam(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, anneal_k=K, anneal_t0=T0,
    )  # fmt: skip
    _train(m, opt, range(1))  # anchors taken at the first step
    for p in m.parameters():
        p.data.add_(1.0)  # push every tensor away from its anchor
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in m.parameters():
        drift = p.detach() - opt.state[p]["anchor"]
        assert (drift < 1.0).all(), "every parameter, decayed or not, is pulled back"


def test_moves_toward_anchor_more_than_adamw():
    a, b = _model(), _model()
    start = [p.detach().clone() for p in a.parameters()]
    ra = RecAdam(a.parameters(), lr=1e-3, anneal_k=K, anneal_t0=T0, gamma=500.0)
    aw = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.0)
    _train(a, ra, range(40))
    _train(b, aw, range(40))

    def dist(m: nn.Module) -> float:
        return sum((p.detach() - s).pow(2).sum() for p, s in zip(m.parameters(), start)).sqrt().item()

    assert dist(a) < 0.5 * dist(b)
    for p, s in zip(a.parameters(), start):
        assert torch.equal(ra.state[p]["anchor"], s)  # θ* is the starting weights


def test_state_dict_round_trip_and_exact_resume():
    full = _model()
    opt_full = RecAdam(full.parameters(), lr=1e-3, anneal_k=K, anneal_t0=T0, gamma=500.0)
    _train(full, opt_full, range(40))

    first = _model()
    opt_first = RecAdam(first.parameters(), lr=1e-3, anneal_k=K, anneal_t0=T0, gamma=500.0)
    _train(first, opt_first, range(20))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    opt_resumed = RecAdam(resumed.parameters(), lr=1e-3, anneal_k=K, anneal_t0=T0, gamma=500.0)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed.load_state_dict(ckpt["optim"])
    for p, q in zip(first.parameters(), resumed.parameters()):
        assert torch.equal(opt_first.state[p]["anchor"], opt_resumed.state[q]["anchor"])
    _train(resumed, opt_resumed, range(20, 40))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)

    # Control: resuming the weights without the optimizer state re-anchors at step 20 and diverges.
    fresh = _model(seed=123)
    fresh.load_state_dict(ckpt["model"])
    _train(fresh, RecAdam(fresh.parameters(), lr=1e-3, anneal_k=K, anneal_t0=T0, gamma=500.0), range(20, 40))
    assert not all(torch.equal(p, q) for p, q in zip(full.parameters(), fresh.parameters()))


def test_rejects_divergent_pull_and_bad_anchors():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr\\*gamma"):
        RecAdam([p], lr=1e-3, gamma=5000.0)
    with pytest.raises(ValueError, match="shape"):
        RecAdam([p], lr=1e-5, anchors={p: torch.zeros(4)})
    with pytest.raises(ValueError, match="weight_decay"):
        RecAdam([p], lr=1e-5, weight_decay=-1.0)


# --- ZeRO-3: DeepSpeed hands this optimizer the rank's flat fp32 partition -------------------------

Z3_KW = dict(lr=1e-3, anneal_k=0.5, anneal_t0=10, gamma=500.0)


def _zero3_worker(ckpt_dir: str) -> None:
    """Run under torch.distributed.run with 2 ranks; rank r writes its findings to ckpt_dir/r.json."""
    import json
    import os

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~60 s JIT build (§9)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = {"train_micro_batch_size_per_gpu": 16 // world, "zero_optimization": {"stage": 3}}
    config.update(zero_allow_untested_optimizer=True, gradient_clipping=0.0)  # 0: compare with plain torch

    def engine():
        m = _model()
        return deepspeed.initialize(model=m, optimizer=RecAdam(m.parameters(), **Z3_KW), config=config)[0]

    def train(e, steps: range) -> None:
        for t in steps:
            x, y = (z.chunk(world)[rank] for z in _batch(t))
            e.backward(nn.functional.mse_loss(e(x), y))
            e.step()

    e = engine()
    start_partition = torch.cat([p.ds_tensor.detach().float().flatten() for p in e.module.parameters()])
    train(e, range(20))
    (flat, state), *rest = e.optimizer.optimizer.state.items()
    e.save_checkpoint(ckpt_dir, tag="s20")
    train(e, range(20, 40))
    uninterrupted = [safe_get_full_fp32_param(p).clone() for p in e.module.parameters()]
    e2 = engine()
    e2.load_checkpoint(ckpt_dir, tag="s20")
    train(e2, range(20, 40))
    resumed = [safe_get_full_fp32_param(p).clone() for p in e2.module.parameters()]
    reference = _model()
    _train(reference, RecAdam(reference.parameters(), **Z3_KW), range(40))
    result = {
        "n_state": 1 + len(rest),
        "anchor_numel": state["anchor"].numel(),
        "anchor_is_start_partition": torch.equal(state["anchor"], start_partition),
        "partition_moved": not torch.equal(flat.detach(), start_partition),
        "resume_equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
        "max_diff_vs_torch": max(
            (a - b).abs().max().item() for a, b in zip(uninterrupted, reference.parameters())
        ),
    }
    with open(os.path.join(ckpt_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.distributed
def test_zero3_two_ranks_anchor_partition_and_resume(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path)
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    n_params = sum(p.numel() for p in _model().parameters())  # 49 -> 25 per rank with padding
    for rank in range(2):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["n_state"] == 1  # one flat partition, no orphaned state for the client parameters
        assert r["anchor_numel"] < n_params  # the anchor is sharded like the moments
        assert r["anchor_is_start_partition"] and r["partition_moved"]
        assert r["resume_equal"]
        assert r["max_diff_vs_torch"] < 1e-6  # same trajectory as the unsharded optimizer


if __name__ == "__main__":
    import sys

    _zero3_worker(sys.argv[1])
