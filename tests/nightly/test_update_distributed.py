"""``ckl update --launcher torchrun --nproc 2``: a 2-rank ZeRO-3 LoRA update on gloo, end to end.

The exported adapter is real and loads, and rows split over 2 ranks with averaged gradients give
the same update as one process on the whole batch. The recipe is checked before anything spawns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ckl_toolkit.cli import main as cli
from ckl_toolkit.core.config import to_yaml
from ckl_toolkit.nightly.contract import current_version
from ckl_toolkit.nightly.run import read_metrics
from ckl_toolkit.update import update
from tests.nightly.test_update import facts, make_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[2]
COMMON = ["target.kind=lora", "target.lora.r=4", "target.export=merged", "optim.name=recadam",
          "optim.recadam.gamma=50", "optim.recadam.t0=2", "save_every=2"]  # fmt: skip
ZERO3 = ["engine.backend=deepspeed", "engine.ds_config=zero3"]


def write_recipe(tmp_path: Path, lm: Path, data: Path, *extra: str) -> Path:
    path = tmp_path / "zero3.yaml"
    path.write_text(to_yaml(make_recipe(tmp_path / "ds", lm, *COMMON, *ZERO3, *extra, data=data)))
    return path


def test_the_recipe_is_checked_before_spawning(tmp_path, tiny_lm_dir):
    data = write_jsonl(tmp_path / "data/a.jsonl", facts("d", 2)).parent
    recipe, runner = write_recipe(tmp_path, tiny_lm_dir, data), CliRunner()
    cases = [  # (arguments, what the message says)
        (["--nproc", "2"], "--nproc 2 needs --launcher"),
        (["--launcher", "torchrun", "--nproc", "3"], "batching.batch_size: 4 rows do not split over 3 ranks"),
        (["--launcher", "torchrun", "--nproc", "2", "engine.backend=single"], "engine.backend: 2 ranks"),
    ]
    for args, says in cases:
        res = runner.invoke(cli, ["update", "--recipe", str(recipe), *args])
        assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / "ds" / "out").exists()  # nothing ran
    dry = runner.invoke(cli, ["update", "--recipe", str(recipe), "--launcher", "torchrun", "--nproc", "2",
                              "--dry-run"])  # fmt: skip
    assert dry.exit_code == 0 and "ds_config: zero3" in dry.output


@pytest.mark.distributed
def test_two_rank_zero3_lora_update_exports_an_adapter_that_loads(tmp_path, tiny_lm_dir):
    from peft import PeftModel

    data = write_jsonl(tmp_path / "data/a.jsonl", facts("d", 10)).parent  # 20 rows (2 windows each)
    path = write_recipe(tmp_path, tiny_lm_dir, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "ckl_toolkit.cli", "update", "--recipe", str(path),
           "--launcher", "torchrun", "--nproc", "2"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])  # rank 0 prints the run summary
    assert summary["exit_code"] == 0 and summary["documents"] == 10 and summary["steps"] == 5  # 20 rows / 4

    # The adapter: every LoRA matrix, trained (B starts at zero), loadable by peft, equal to the merge.
    version = current_version(tmp_path / "ds/out")
    tensors = load_file(str(version / "adapter/adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2 and all("lora_" in k for k in tensors)  # 7 linears x 2 layers x (A, B)
    assert all(t.numel() > 0 for t in tensors.values())
    assert sum(float(t.abs().sum()) for k, t in tensors.items() if "lora_B" in k) > 0
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), version / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(version / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)

    # RecAdam anchored the ZeRO-3 partitions and pulled; the ledger holds every document.
    drift = [m["drift"] for m in read_metrics(tmp_path / "ds/out") if m["event"] == "step"]
    assert all(d is not None and d > 0 for d in drift)
    assert len(json.loads((version / "ledger.json").read_text())["ids"]) == 10

    # Rows split over 2 ranks with averaged gradients = the same update as one process on the batch.
    single = update(make_recipe(tmp_path / "one", tiny_lm_dir, *COMMON, data=data))
    mine = load_file(str(current_version(tmp_path / "one/out") / "adapter/adapter_model.safetensors"))
    for name, t in tensors.items():
        assert torch.allclose(t, mine[name], atol=1e-5), name
    assert single.steps == summary["steps"]


@pytest.mark.distributed
def test_two_rank_zero3_update_is_gated_on_rank_0_and_every_rank_stops(tmp_path, tiny_lm_dir):
    """The gate scores the exported version once the ZeRO-3 gather is over; a refusal stops both ranks."""
    data = write_jsonl(tmp_path / "data/a.jsonl", facts("d", 4)).parent
    probes = [{"id": f"p{i}", "probe": f"{r['text'].split(' .')[0]}", "object": r["object"]}
              for i, r in enumerate(facts("d", 4))]  # fmt: skip
    to_learn = write_jsonl(tmp_path / "gate/to_learn.jsonl", probes)
    path = write_recipe(tmp_path, tiny_lm_dir, data, f"gate.to_learn={to_learn}", "gate.min_learned=1.0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "ckl_toolkit.cli", "update", "--recipe", str(path),
           "--launcher", "torchrun", "--nproc", "2"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode != 0  # torchrun reports the ranks' exit 8 as a failure of its own
    out = tmp_path / "ds/out"
    log = (out / "logs/update.log").read_text()
    assert log.count("update stopped (exit 8 GATE_REJECTED)") == 2  # both ranks, none left waiting
    version = out / "versions/v000001"
    report = json.loads((version / "gate.json").read_text())
    assert report["failed"] == ["to_learn"] and report["to_learn"]["n"] == 4
    assert (version / "rejected.json").exists() and current_version(out) is None
    assert (version / "adapter/adapter_model.safetensors").exists()  # the candidate, kept for a look
