"""DeepSpeed configs filled from flat arguments; every refusal names the caller's recipe field."""

import json

import pytest

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.distributed.ds_config import PRESETS, DsFields, model_hidden_size, resolve_ds_config
from ckl_toolkit.metalearn.config import META_DS_FIELDS
from ckl_toolkit.training.engine import update_ds_config

FIELDS = DsFields(ds_config="job.ds", batch="job.b", clip="job.clip", precision="job.bf16", optimizer="job.o")


def resolve(ds_config: str = "zero3", **overrides) -> dict:
    args = dict(world=2, batch_size=4, grad_clip=1.0, precision="fp32", optimizer="adamw", jvp=False,
                partition_base=False, hidden_size=32, fields=FIELDS)  # fmt: skip
    return resolve_ds_config(ds_config, **{**args, **overrides})


def user_config(tmp_path, **sections) -> str:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **sections}))
    return str(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve_every_auto_field(preset):
    cfg = resolve(preset, grad_clip=0.5)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # CPU: fp32
    assert cfg["zero_optimization"]["memory_efficient_linear"] is False  # no process-wide F.linear patch
    assert resolve(preset, precision="bf16")["bf16"]["enabled"] is True


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"world": 3}, "job.b"),  # 4 rows do not split over 3 ranks
        ({"optimizer": "sgd"}, "job.o"),  # ZeRO has not tested it
        ({"ds_config": "zero9"}, "job.ds"),  # neither a file nor a preset
        ({"ds_config": "zero2", "partition_base": True}, "job.ds"),  # a partitioned base needs ZeRO-3
    ],
)
def test_bad_arguments_name_the_callers_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}"):
        resolve(**overrides)


def test_user_config_conflicts_name_the_field(tmp_path):
    cases = [  # (your ds_config, arguments, the field the message names, what it says)
        ({"optimizer": {"type": "AdamW"}}, {}, "job.ds", "'optimizer' section.*job.o"),
        ({"scheduler": {"type": "WarmupLR"}}, {}, "job.ds", "'scheduler' section"),
        ({"gradient_clipping": 0.5}, {}, "job.clip", "gradient_clipping=0.5"),
        ({"bf16": {"enabled": True}}, {}, "job.bf16", "enabled=True"),
        ({"train_batch_size": 8}, {}, "job.b", "train_batch_size=8"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, {}, "job.ds",
         "zero_force_ds_cpu_optimizer"),
        ({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}, {"jvp": True}, "job.ds",
         "memory_efficient_linear"),
    ]  # fmt: skip
    for sections, overrides, field, says in cases:
        with pytest.raises(ConfigError, match=rf"^{field}: .*{says}"):
            resolve(user_config(tmp_path, **sections), **overrides)


def test_concrete_values_that_agree_are_kept_and_the_rest_filled(tmp_path):
    mine = user_config(tmp_path, train_batch_size=4, gradient_clipping=1.0)
    cfg = resolve(mine, jvp=True)
    assert cfg["train_batch_size"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["zero_optimization"]["memory_efficient_linear"] is False  # set for the JVP
    # memory_efficient_linear on is only refused where a JVP runs through the model
    linear = user_config(tmp_path, zero_optimization={"stage": 3, "memory_efficient_linear": True})
    assert resolve(linear)["zero_optimization"]["memory_efficient_linear"] is True


def test_optimizers_zero_has_not_tested():
    assert resolve(optimizer="recadam")["zero_allow_untested_optimizer"] is True  # ours, ZeRO-aware
    with pytest.raises(ConfigError, match='"zero_allow_untested_optimizer": true'):
        resolve(optimizer="sgd")


def test_each_job_names_its_own_fields(tmp_path):
    with pytest.raises(ConfigError, match="^batching.batch_size"):
        update_ds_config("zero3", 3, 4, 1.0, "float32", "adamw", 32)
    with pytest.raises(ConfigError, match="^batch_size"):
        resolve(world=3, fields=META_DS_FIELDS)
    with pytest.raises(ConfigError, match="^engine.ds_config: .*'optimizer' section.*optim.name"):
        update_ds_config(user_config(tmp_path, optimizer={}), 2, 4, 1.0, "float32", "adamw", 32)
    with pytest.raises(ConfigError, match="^target.dtype: "):
        update_ds_config(user_config(tmp_path, bf16={"enabled": True}), 2, 4, 1.0, "float32", "adamw", 32)
    assert update_ds_config("zero3", 2, 4, 1.0, "bfloat16", "recadam", 32)["bf16"]["enabled"] is True


def test_model_hidden_size_names_the_field(tiny_lm_dir, tmp_path):
    assert model_hidden_size(str(tiny_lm_dir), "base.path") == 32
    with pytest.raises(ConfigError, match="^target.path: .* not a readable model directory"):
        model_hidden_size(str(tmp_path / "nothing"), "target.path")
    with pytest.raises(ConfigError, match="^base.path: a model directory is required"):
        model_hidden_size("", "base.path")
