"""Published versions outside the run: an adapter loads from any directory, a LoRA merges after the fact,
``ckl score`` reads any version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckl_toolkit.cli import main as cli
from ckl_toolkit.nightly.contract import current_version
from ckl_toolkit.update import update
from tests.nightly.test_update import facts, make_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 12, 40, 7]])


def lora_version(tmp_path: Path, tiny_lm_dir: Path, *extra: str) -> Path:
    """A LoRA update whose recipe names the model by a *relative* path, as the shipped recipes do."""
    shutil.copytree(tiny_lm_dir, tmp_path / "models/tiny")
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 6))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = make_recipe(tmp_path, Path("models/tiny"), "target.kind=lora", "target.lora.r=4", *extra)
        assert update(r).exit_code == 0
    finally:
        os.chdir(cwd)
    return current_version(tmp_path / "out")


def test_the_adapter_loads_from_another_directory_with_peft_alone(tmp_path, tiny_lm_dir):
    version = lora_version(tmp_path, tiny_lm_dir)
    config = json.loads((version / "adapter/adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, torch; from peft import AutoPeftModelForCausalLM; "
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(version / 'adapter')!r}); "
        "print(float(m(torch.tensor([[1, 5, 9]])).logits.abs().sum()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a relative base would be looked up on the hub and fail
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    card = (version / "adapter/README.md").read_text()
    assert config["base_model_name_or_path"] in card and "LoRA r=4" in card and "6 new documents" in card


def test_export_merges_a_lora_version_after_the_fact_and_casts_to_bf16(tmp_path, tiny_lm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    version = lora_version(tmp_path, tiny_lm_dir)  # target.export: adapter, never merged while training
    assert not (version / "model").exists()
    runner = CliRunner()
    res = runner.invoke(
        cli, ["export", "--version", str(tmp_path / "out"), "--merge", "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), version / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, peft(IDS).logits, atol=1e-5)
        assert not torch.allclose(merged(IDS).logits, base(IDS).logits, atol=1e-4)  # the update is in it
    res = runner.invoke(
        cli,
        [
            "export",
            "--version",
            str(version),
            "--merge",
            "--dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "bf16"),
        ],
    )
    assert res.exit_code == 0, res.output
    tensors = load_file(str(tmp_path / "bf16/model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    torch.testing.assert_close(
        tensors["model.norm.weight"], merged.model.norm.weight.detach().to(torch.bfloat16)
    )
    res = runner.invoke(cli, ["export", "--version", "v9", "--merge"])
    assert res.exit_code == 2 and "not a published version" in res.output


def test_kadapter_versions_refuse_to_merge(tmp_path, tiny_lm_dir):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 4))
    update(make_recipe(tmp_path, tiny_lm_dir, "target.kind=kadapter", "target.kadapter.adapter_hidden=16"))
    res = CliRunner().invoke(cli, ["export", "--version", str(tmp_path / "out"), "--merge"])
    assert res.exit_code == 2 and "not a weight delta" in res.output


def test_score_compares_a_version_with_its_base_on_probe_files(tmp_path, tiny_lm_dir):
    version = lora_version(tmp_path, tiny_lm_dir, "epochs=3")
    probes = write_jsonl(
        tmp_path / "probes.jsonl",
        [
            {"subject": "Ada Lovelace", "relation": "works for", "object": "London"},
            {"subject": "Alan Turing", "relation": "works for", "object": "Paris"},
        ],
    )
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(
        cli,
        [
            "score",
            "--model",
            str(tiny_lm_dir),
            "--model",
            str(version),
            "--probes",
            str(probes),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    base, new = (result["models"][m]["scores"]["probes"] for m in (str(tiny_lm_dir), str(version)))
    assert result["probes"] == {"probes": 2} and base["n"] == new["n"] == 2
    assert new["nll"] < base["nll"]  # it learned "works for London/Paris" from the documents
    assert "lora adapter" in result["models"][str(version)]["loaded"]
    assert "NLL (n=2)" in res.output and f"({new['nll'] - base['nll']:+.3f})" in res.output
