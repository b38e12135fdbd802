"""The process helpers in a world of one, and the launch commands both jobs use."""

import sys
from pathlib import Path

import pytest

from ckl_toolkit.distributed.process import (
    DistContext,
    broadcast_object,
    init_distributed,
    launch_command,
    mean_over_ranks,
)

SCRIPT = Path(__file__).resolve().parents[2] / "ckl_toolkit" / "update.py"


def test_launch_commands_run_the_given_script_with_its_arguments():
    torchrun = launch_command(SCRIPT, "torchrun", 2, ["--recipe", "r.yaml", "steps=3"])
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in torchrun and "--standalone" in torchrun
    assert torchrun[-4:] == [str(SCRIPT), "--recipe", "r.yaml", "steps=3"]
    ds = launch_command(SCRIPT, "deepspeed", 3, ("--recipe", "r.yaml"))
    assert ds[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and "--num_gpus=3" in ds
    assert any(a.startswith("--master_port=") for a in ds) and ds[-3:] == [str(SCRIPT), "--recipe", "r.yaml"]
    with pytest.raises(ValueError, match="unknown launcher"):
        launch_command(SCRIPT, "mpirun", 2, [])


def test_a_world_of_one_without_deepspeed_needs_no_process_group():
    ctx = init_distributed(None)
    assert ctx == DistContext() and ctx.is_main and not ctx.deepspeed and ctx.zero_stage == 0
    assert broadcast_object(ctx, {"a": 1}) == {"a": 1}
    assert mean_over_ranks(ctx, {"loss": 2.5}) == {"loss": 2.5}
    assert DistContext(ds_config={"zero_optimization": {"stage": 3}}).zero_stage == 3
