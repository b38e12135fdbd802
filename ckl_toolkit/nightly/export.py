"""Published versions after the fact: find one, load it for serving or scoring, export it merged or in bf16.

    ckl export --version runs/temporalwiki/current --merge --dtype bfloat16
    ckl export --recipe recipes/temporalwiki.yaml --version v2 --merge

A version holds ``model/`` (full fine-tune, or a LoRA trained with ``target.export: merged``) and/or
``adapter/`` (peft LoRA with an absolute base path, or K-Adapter). A LoRA version merges into an
ordinary HF model at any time; a K-Adapter is extra layers, not a weight delta, so it never merges.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.core.io import atomic_dir
from ckl_toolkit.core.models import DTYPES, ModelSpec, load_causal_lm, load_tokenizer, quiet_transformers
from ckl_toolkit.nightly.contract import VERSION_DIR, current_version

MODEL_DIR, ADAPTER_DIR = "model", "adapter"


def find_version(spec: str, output_dir: str | Path | None = None) -> Path:
    """A version directory from a path (a version, or an update output dir: its current) or a name.

    ``v3`` / ``v000003`` / ``current`` are looked up in ``output_dir``.

    Raises:
        ConfigError: nothing there is a published version.
    """
    path = Path(spec)
    if (path / "version.json").is_file():
        return path
    if path.is_dir() and current_version(path) is not None:
        return current_version(path)
    if output_dir is not None:
        out = Path(output_dir)
        if spec == "current" and current_version(out) is not None:
            return current_version(out)
        name = f"v{int(spec.lstrip('v')):06d}" if spec.lstrip("v").isdigit() else spec
        if VERSION_DIR.match(name) and (out / "versions" / name / "version.json").is_file():
            return out / "versions" / name
    where = f" in {output_dir}/versions" if output_dir is not None else ""
    raise ConfigError(
        f"--version: {spec} is not a published version{where} (a versions/vNNNNNN directory, "
        "an update output_dir, or vN with --recipe)"
    )


def version_kind(version: Path) -> tuple[str, dict]:
    """(target kind, the version's recipe as a dict)."""
    meta = json.loads((version / "version.json").read_text(encoding="utf-8"))
    recipe = (
        yaml.safe_load((version / "recipe.yaml").read_text(encoding="utf-8"))
        if (version / "recipe.yaml").is_file()
        else {}
    )
    return meta.get("target_kind", "full"), recipe or {}


def base_path(version: Path, recipe: dict) -> str:
    """The base model of an adapter version: the adapter's recorded base path, else the recipe's target.path.

    Raises:
        ConfigError: the base directory is gone (naming where it was recorded).
    """
    config = version / ADAPTER_DIR / "adapter_config.json"
    recorded = json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None
    path = recorded or (recipe.get("target") or {}).get("path")
    if not path:
        raise ConfigError(f"{version}: neither adapter_config.json nor recipe.yaml names the base model")
    if not path.startswith("hf://") and not Path(path).is_dir():
        raise ConfigError(
            f"{version}: its base model {path} does not exist (recorded in "
            f"{config.name if recorded else 'recipe.yaml'})"
        )
    return path


def load_model(path: str | Path, dtype: str = "float32") -> tuple[nn.Module, object, str]:
    """A model to serve or score from an HF directory, a version, or an update output dir (its current).

    Returns:
        (model in eval mode, tokenizer, a description of what was loaded).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        model = load_causal_lm(ModelSpec(str(path), dtype, "sdpa"), "--model")
        return model.eval(), load_tokenizer(str(path), "--model"), f"HF model {path}"
    version = find_version(str(path))
    if (version / MODEL_DIR / "config.json").is_file():
        model = load_causal_lm(ModelSpec(str(version / MODEL_DIR), dtype, "sdpa"), "--model")
        return model.eval(), load_tokenizer(str(version / MODEL_DIR), "--model"), f"{version} (model/)"
    return load_adapter_version(version, dtype)


def load_adapter_version(version: Path, dtype: str = "float32") -> tuple[nn.Module, object, str]:
    """The base model with the version's adapter (peft LoRA or K-Adapter), in eval mode."""
    kind, recipe = version_kind(version)
    base = base_path(version, recipe)
    model = load_causal_lm(ModelSpec(base, dtype, "sdpa"), "base model")
    if kind == "kadapter":
        from ckl_toolkit.training.kadapter import load_adapter

        model = load_adapter(model, version / ADAPTER_DIR)
    else:
        from peft import PeftModel

        with quiet_transformers():
            model = PeftModel.from_pretrained(model, str(version / ADAPTER_DIR))
    return model.eval(), load_tokenizer(base, "base model"), f"{version} ({kind} adapter on {base})"


def export_version(version: Path, out: Path | None, merge: bool, dtype: str | None) -> tuple[Path, str]:
    """Write the version as an HF model (merged LoRA, or the full model) or its adapter, in ``dtype``.

    Returns:
        (the directory written, what it holds).

    Raises:
        ConfigError: --merge of a K-Adapter, or of a full model (nothing to merge).
    """
    kind, recipe = version_kind(version)
    if merge and kind == "kadapter":
        raise ConfigError(
            "--merge: a K-Adapter adds layers to the base, it is not a weight delta to merge; "
            "serve base + adapter/ (training.kadapter.load_adapter)"
        )
    if merge and kind in ("full", "subset"):
        raise ConfigError("--merge: a full or subset fine-tune has no adapter; export it with --dtype only")
    suffix = ("merged" if merge else kind) + (f"-{dtype}" if dtype else "")
    out = out or version.parent.parent / "exports" / f"{version.name}-{suffix}"
    torch_dtype = DTYPES[dtype] if dtype else None
    with atomic_dir(out) as tmp:
        if merge or kind in ("full", "subset"):
            if merge and not (version / MODEL_DIR).is_dir():  # merged at training time: model/ is it
                model, tokenizer, _ = load_adapter_version(version)
                model = model.merge_and_unload()
            else:
                model, tokenizer, _ = load_model(version)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            merged = f"LoRA merged into {base_path(version, recipe)}"
            what = f"HF model ({merged if merge else 'full fine-tune'})"
        else:
            shutil.copytree(version / ADAPTER_DIR, tmp, dirs_exist_ok=True)
            if torch_dtype is not None:
                _cast_safetensors(tmp, torch_dtype)
            what = f"{kind} adapter"
        for name in ("README.md", "summary.json", "version.json"):
            if (version / name).is_file():
                shutil.copy2(version / name, tmp / f"source_{name}")
    return out, what + (f", {dtype}" if dtype else "")


def _cast_safetensors(directory: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    for path in directory.glob("*.safetensors"):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
