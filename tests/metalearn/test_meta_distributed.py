"""Meta-training on 2 gloo ranks with real DeepSpeed ZeRO-3, against one plain process (ARCHITECTURE.md §3).

The 2-rank runs are subprocesses of ``python -m torch.distributed.run --standalone --nproc_per_node 2``
(about 15-25 s each on 2 cores; there are four, plus one single-rank run that must refuse to
resume them). The comparison with one process uses ``meta.mode=independent``:
each episode's dL/dw is then the same whichever rank runs it, so the two runs differ only by
floating-point rounding (φ's forward on 2 rows instead of 4 and on gathered shards, the order of
the gradient sum, the partitioned base's gathered weights). AdamW turns rounding in near-zero
gradient entries into differences of up to lr per step, so the tolerance is on the whole update:
||φ_2 − φ_1|| ≤ 1e-2 · ||φ_1 − φ_0|| (observed: ~4e-4 replicated, ~1e-3 partitioned base).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckl_toolkit.core.checkpoint import load_state
from ckl_toolkit.core.config import ConfigError, load_recipe, to_yaml
from ckl_toolkit.core.io import write_jsonl_atomic
from ckl_toolkit.core.ta_model import build_ta_model, load_ta_model
from ckl_toolkit.meta import check_recipe, meta_train
from ckl_toolkit.metalearn.config import MetaRecipe
from tests.conftest import meta_pairs as pairs

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "metalearn" / "distributed_worker.py"
TOLERANCE = 1e-2  # relative to the distance φ moved; see the module docstring
# the retention term (KL on known facts after each inner step) on a partitioned base with LoRA
RETAIN = [
    "base.lora={r: 4}",
    "data.retain={data}/known.jsonl",
    "data.retain_batch_size=3",
    "meta.retain_weight=5",
]


def recipe_args(tiny_lm_dir, data: Path, run_dir: Path, *extra: str) -> list[str]:
    extra = tuple(e.replace("{data}", str(data)) for e in extra)
    return [
        f"run_dir={run_dir}",
        f"base.path={tiny_lm_dir}",
        f"data.train={data / 'train.jsonl'}",
        "data.val=null",
        "steps=3",
        "batch_size=4",
        "log_every=1",
        "save_every=1",
        "keep_checkpoints=5",
        "progress=false",
        "optim.lr=1e-2",
        "meta.mode=independent",
        "meta.fd_eps=1e-2",
        *extra,
    ]


def env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(cmd: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env(), capture_output=True, text=True, timeout=timeout)


def two_ranks(script: Path, *args) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        script,
        *args,
    ]


def write_recipe(path: Path, setup: dict, run_name: str, *extra: str) -> Path:
    recipe = load_recipe(
        MetaRecipe, None, recipe_args(setup["lm"], setup["tmp"], setup["tmp"] / run_name, *extra)
    )
    path.write_text(to_yaml(recipe))
    return path


def relative_gap(a: dict, b: dict, start: dict) -> float:
    """||a − b|| / ||b − start|| over all tensors."""
    gap = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    moved = sum(((b[k] - start[k]) ** 2).sum() for k in b) ** 0.5
    return float(gap / moved)


def state_of(ta_dir: Path) -> dict:
    return load_ta_model(ta_dir).state_dict()


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    """Data, the initial φ and the single-process reference runs (plain torch, no DeepSpeed)."""
    tmp = tmp_path_factory.mktemp("dist")
    write_jsonl_atomic(tmp / "train.jsonl", pairs(8))
    write_jsonl_atomic(tmp / "known.jsonl", [{"task": r["task"], "object": r["object"]} for r in pairs(4)])
    refs = {}
    for name, extra in (("replicated", []), ("lora", ["base.lora={r: 4}"]), ("retain", RETAIN)):
        recipe = load_recipe(MetaRecipe, None, recipe_args(tiny_lm_dir, tmp, tmp / f"ref_{name}", *extra))
        refs[name] = state_of(meta_train(recipe))
    return {"tmp": tmp, "lm": tiny_lm_dir, "refs": refs, "start": build_ta_model(tiny_lm_dir).state_dict()}


@pytest.fixture(scope="module")
def replicated_run(setup):
    """2 ranks, replicated base, launched by ``ckl meta-train --launcher torchrun --nproc 2``."""
    recipe = write_recipe(setup["tmp"] / "zero3.yaml", setup, "two_ranks", "distributed.ds_config=zero3")
    cli = [sys.executable, "-m", "ckl_toolkit.cli", "meta-train", "--recipe", recipe]
    res = run([*cli, "--launcher", "torchrun", "--nproc", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    return setup["tmp"] / "two_ranks", recipe


@pytest.mark.distributed
def test_two_ranks_replicated_base_match_one_process_and_export(setup, replicated_run):
    run_dir, _ = replicated_run
    assert relative_gap(state_of(run_dir / "ta"), setup["refs"]["replicated"], setup["start"]) < TOLERANCE

    # the effective config: every "auto" filled from the recipe, saved in the run directory
    cfg = json.loads((run_dir / "ds_config.json").read_text())
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_clipping"] == 1.0 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"] is False

    # the partition is real: each rank's checkpoint holds about half of φ's fp32 master weights
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    n_phi = sum(t.numel() for t in setup["start"].values())
    for r in range(2):
        held = sum(t.numel() for t in load_state(ckpt / f"optimizer_rank{r:05d}")["fp32_flat_groups"])
        assert 0.45 * n_phi < held < 0.55 * n_phi, (r, held, n_phi)

    # export: consolidated safetensors + sidecar that one process loads
    out = run([sys.executable, "-m", "ckl_toolkit.cli", "export", "--run", run_dir, "--out", run_dir / "exp"])
    assert out.returncode == 0, out.stderr[-2000:]
    exported = state_of(run_dir / "exp")
    assert all(torch.equal(exported[k], v) for k, v in state_of(run_dir / "ta").items())


@pytest.mark.distributed
def test_two_ranks_partitioned_base_match_one_process_and_reduce_nothing(setup):
    tmp = setup["tmp"]
    partitioned = ["distributed.ds_config=zero3", "distributed.partition_base=true", "base.lora={r: 4}"]
    recipe = write_recipe(tmp / "partitioned.yaml", setup, "partitioned", *partitioned)
    res = run(two_ranks(WORKER, "--report", tmp / "report_p", "--recipe", recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    gap = relative_gap(state_of(tmp / "partitioned" / "ta"), setup["refs"]["lora"], setup["start"])
    assert gap < TOLERANCE

    for r in range(2):
        report = json.loads((tmp / "report_p" / f"rank{r}.json").read_text())
        calls = report["collectives_in_metagrad"]
        # the meta-gradient only gathers the base's shards (+ DeepSpeed's fetch consistency checks,
        # broadcasts of parameter ids); nothing is reduced across ranks
        assert set(calls) <= {"all_gather_into_tensor", "all_gather", "broadcast"}, calls
        assert calls.get("all_gather_into_tensor", 0) + calls.get("all_gather", 0) > 0
        for part in ("base", "ta"):  # each rank holds about half of the frozen base and of φ
            held, full = report[part]
            assert 0.45 * full < held < 0.55 * full, (part, held, full)
        assert report["lora"] > 0
        # and the meta-gradient gathers one layer at a time: the largest module here is the embedding
        assert report["base_peak_gathered"] < 0.5, report["base_peak_gathered"]


@pytest.mark.distributed
def test_two_ranks_partitioned_base_with_the_retention_term_match_one_process(setup):
    """The KL teacher forward and the known facts' forward/backward gather shards on every rank alike."""
    tmp = setup["tmp"]
    partitioned = ["distributed.ds_config=zero3", "distributed.partition_base=true", *RETAIN]
    recipe = write_recipe(tmp / "partitioned_retain.yaml", setup, "partitioned_retain", *partitioned)
    res = run(two_ranks(WORKER, "--report", tmp / "report_r", "--recipe", recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    ref = setup["refs"]["retain"]
    assert relative_gap(state_of(tmp / "partitioned_retain" / "ta"), ref, setup["start"]) < TOLERANCE
    assert relative_gap(setup["refs"]["lora"], ref, setup["start"]) > 10 * TOLERANCE  # the term mattered
    records = [
        json.loads(line) for line in (tmp / "partitioned_retain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["retain_loss"] > 0 for r in records)


@pytest.mark.distributed
def test_killed_mid_checkpoint_then_resumed_equals_uninterrupted(setup, replicated_run):
    straight_dir, recipe = replicated_run
    tmp, run_dir = setup["tmp"], setup["tmp"] / "killed"
    args = ["--recipe", recipe, f"run_dir={run_dir}"]
    # rank 1 is SIGKILLed after writing its part of step 2's checkpoint, before the step is complete
    killed = run(two_ranks(WORKER, "--report", tmp / "report_k", "--kill-at", "2", *args))
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (run_dir / "checkpoints" / "step_00000002").exists() and not (run_dir / "ta").exists()
    script = ROOT / "ckl_toolkit" / "meta.py"
    # one rank cannot take over the 2 ranks' partitioned optimizer state: a clear refusal
    alone = run([sys.executable, script, *args])
    assert alone.returncode != 0 and "resume with 2 ranks" in alone.stderr, alone.stderr[-2000:]
    # the script itself under torchrun, resume: auto
    resumed = run(two_ranks(script, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 1" in resumed.stdout
    a, b = state_of(straight_dir / "ta"), state_of(run_dir / "ta")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# One process, no ranks: checks that must fail before any work, config filling, episode split


def make(tiny_lm_dir, *overrides) -> MetaRecipe:
    return load_recipe(MetaRecipe, None, [f"base.path={tiny_lm_dir}", "batch_size=4", *overrides])


@pytest.mark.parametrize(
    "overrides, world, field",
    [
        (["distributed.ds_config=zero3"], 3, "batch_size"),
        ([], 2, "distributed.ds_config"),
        (["distributed.ds_config=zero3", "optim.name=sgd"], 2, "optim.name"),
        (
            [
                "distributed.ds_config=zero2",
                "distributed.partition_base=true",
                "base.lora={r: 4}",
                "data.val=null",
            ],
            2,
            "distributed.ds_config",
        ),
        (["distributed.ds_config=zero9"], 2, "distributed.ds_config"),
    ],
)
def test_bad_combinations_name_the_field(tiny_lm_dir, overrides, world, field):
    with pytest.raises(ConfigError, match=rf"^{field}"):
        check_recipe(make(tiny_lm_dir, *overrides), world=world)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["distributed.ds_config=zero3", "distributed.partition_base=true", "data.val=null"], "base.lora"),
        (
            [
                "distributed.ds_config=zero3",
                "distributed.partition_base=true",
                "base.lora={r: 4}",
                "meta.method=jvp",
            ],
            "meta.method",
        ),
        (["distributed.partition_base=true", "base.lora={r: 4}"], "distributed.partition_base"),
    ],
)
def test_bad_recipes_fail_when_loaded(tiny_lm_dir, overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}"):
        make(tiny_lm_dir, *overrides)


def test_user_config_conflicts_name_the_field(tiny_lm_dir, tmp_path):
    cases = [  # (your ds_config, the field the message names, what it says)
        ({"optimizer": {"type": "AdamW"}}, "distributed.ds_config", "'optimizer' section"),
        ({"gradient_clipping": 0.5}, "optim.grad_clip", "gradient_clipping=0.5"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "distributed.ds_config",
         "zero_force_ds_cpu_optimizer"),
        ({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}, "distributed.ds_config",
         "memory_efficient_linear"),
    ]  # fmt: skip
    for i, (cfg, field, says) in enumerate(cases):
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **cfg}))
        with pytest.raises(ConfigError, match=rf"^{field}: .*{says}"):
            check_recipe(make(tiny_lm_dir, f"distributed.ds_config={path}", "meta.method=jvp"), world=2)
    # a config of your own without those problems is filled like a preset
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = check_recipe(make(tiny_lm_dir, f"distributed.ds_config={path}", "meta.method=jvp"), world=2)
    assert (
        cfg["train_micro_batch_size_per_gpu"] == 2
        and cfg["zero_optimization"]["memory_efficient_linear"] is False
    )


def test_meta_train_fails_before_any_work(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as if a launcher had started 3 ranks
    recipe = make(tiny_lm_dir, f"run_dir={tmp_path / 'run'}", "distributed.ds_config=zero3")
    with pytest.raises(ConfigError, match="^batch_size"):
        meta_train(recipe)
    assert not (tmp_path / "run").exists()


def test_script_runs_as_a_file_without_shadowing(tiny_lm_dir):
    res = run(
        [
            sys.executable,
            ROOT / "ckl_toolkit" / "meta.py",
            "--recipe",
            ROOT / "recipes" / "meta_synthetic_zero3.yaml",
            "--dry-run",
            f"base.path={tiny_lm_dir}",
        ]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ds_config: zero3" in res.stdout
