import random

import pytest
import torch

from ckl_toolkit.core.checkpoint import (
    latest_checkpoint,
    load_state,
    load_step,
    rng_state,
    save_checkpoint,
    save_state,
    save_step,
    set_rng_state,
)


def test_optimizer_state_roundtrip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_state(tmp_path / "s", {"optimizer": opt.state_dict(), "step": 7, "pos": (1, 2)})
    back = load_state(tmp_path / "s")
    assert back["step"] == 7 and back["pos"] == (1, 2)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_rng_roundtrip(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    save_state(tmp_path / "r", rng_state())
    a = (random.random(), torch.rand(2))
    set_rng_state(load_state(tmp_path / "r"))
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_checkpoints_latest_pointer_and_retention(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, lambda d, s=step: (d / "x.txt").write_text(str(s)), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000020", "step_00000030"]
    assert latest_checkpoint(tmp_path).name == "step_00000030"


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, lambda d: (d / "x").write_text("1"))

    def boom(d):
        (d / "x").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, boom)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()


def _train(engine, steps: range) -> None:
    for t in steps:  # batches fixed by t, whatever the global RNG does
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
        engine.step(torch.nn.functional.mse_loss(engine.module(x), y))


def _engine():
    from ckl_toolkit.training.engine import PlainEngine

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return PlainEngine(model, dict(model.named_parameters()), torch.optim.AdamW(model.parameters()), 0.5)


def test_save_step_then_load_step_resumes_an_engine_and_its_rng_exactly(tmp_path):
    engine = _engine()
    _train(engine, range(3))
    torch.manual_seed(123)
    write_main = lambda d: (d / "extra.txt").write_text("rank 0")  # noqa: E731
    ckpt = save_step(tmp_path, 3, engine, {"step": 3, "pos": [1, 2]}, keep=1, write_main=write_main)
    after_rng = torch.rand(2)
    _train(engine, range(3, 6))

    assert latest_checkpoint(tmp_path) == ckpt and ckpt.name == "step_00000003"
    assert {p.name for p in tmp_path.iterdir()} == {"step_00000003", "latest"}  # no staging dir left
    files = {p.name for p in ckpt.iterdir()}
    assert {"state.json", "rng_rank0.json", "engine.json", "trainable.safetensors", "extra.txt"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))]

    resumed = _engine()  # a fresh process: same start, other RNG state
    torch.manual_seed(999)
    assert load_step(ckpt, resumed) == {"step": 3, "pos": [1, 2]}
    assert torch.equal(torch.rand(2), after_rng)
    _train(resumed, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), resumed.module.parameters()))
