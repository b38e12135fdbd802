import random

import pytest
import torch

from ckl_toolkit.core.checkpoint import (
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    save_state,
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
