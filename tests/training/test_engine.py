"""The plain engine's step (backward, clip, step, the norm) and the checkpoint layout both engines check."""

import json

import pytest
import torch

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.distributed.process import DistContext
from ckl_toolkit.training.engine import ENGINE_FILE, PlainEngine, build_engine, check_layout


def model_and_loss(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g) * 10
    return model, lambda m: torch.nn.functional.mse_loss(m(x), y)


def test_step_without_clip_is_a_plain_optimizer_step_and_returns_the_norm():
    model, loss = model_and_loss()
    reference, _ = model_and_loss()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    loss(reference).backward()
    norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    opt.step()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = build_engine(model, dict(model.named_parameters()), optimizer, 0.0, DistContext())
    assert isinstance(engine, PlainEngine)
    assert engine.step(loss(model)) == pytest.approx(float(norm), rel=1e-6)
    # measuring the norm multiplies the gradients by exactly 1.0: bit-identical weights
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_step_clips_to_grad_clip():
    model, loss = model_and_loss()
    engine = PlainEngine(
        model, dict(model.named_parameters()), torch.optim.SGD(model.parameters(), lr=0.1), 0.5
    )
    before = engine.step(loss(model))
    assert before > 0.5
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()  # what the optimizer used
    assert float(clipped) == pytest.approx(0.5, rel=1e-4)


def test_a_checkpoint_resumes_only_on_the_same_ranks_and_stage(tmp_path):
    model, loss = model_and_loss()
    engine = PlainEngine(model, dict(model.named_parameters()), torch.optim.AdamW(model.parameters()), 1.0)
    engine.step(loss(model))
    engine.save(tmp_path)
    assert check_layout(tmp_path, 1, 0)["world_size"] == 1
    with pytest.raises(
        ConfigError, match="^resume: .* written without DeepSpeed, this run trains with ZeRO stage 3"
    ):
        check_layout(tmp_path, 2, 3)

    (tmp_path / ENGINE_FILE).write_text(json.dumps({"world_size": 2, "zero_stage": 3}))  # as 2 ZeRO-3 ranks
    with pytest.raises(
        ConfigError,
        match="ZeRO stage 3, this run trains without DeepSpeed; resume it with the same DeepSpeed config",
    ):
        engine.load(tmp_path)
    with pytest.raises(ConfigError, match="written by 2 ranks and this run has 1; .* resume with 2 ranks"):
        check_layout(tmp_path, 1, 3)
