"""Paths a recipe names: checked before any work, with the command that creates a missing one.

A model path is a local directory, loaded with local files only; a Hugging Face hub id must be
spelled ``hf://org/name`` (never a silent hub lookup of a mistyped directory, which costs a minute
of retries and ends in a traceback). A missing path fails with the recipe field and, where this
project knows it, the command that writes it: ``make real`` for the converted SmolLM2, the
``ckl meta-train`` recipe (in ``recipes/``) whose ``run_dir`` holds a TA model, ``ckl data ...``
for prepared data.
"""

from __future__ import annotations

import glob
from pathlib import Path

import yaml

from ckl_toolkit.core.config import ConfigError

HUB_PREFIX = "hf://"
# Outputs of the project's own set-up commands (relative to a checkout): path prefix -> command; the
# first matching prefix wins, so a file inside a produced directory comes before that directory.
PRODUCERS = {
    "models/smollm2-135m": "`make real` (SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF)",
    "runs/meta_temporalwiki/ta": (
        "`make temporalwiki-ta` (its data, then `ckl meta-train --recipe recipes/meta_temporalwiki.yaml`)"
    ),
    "runs/temporalwiki_data/known_facts.jsonl": (
        "`ckl data known-facts --facts ../shared/data/lama_ckl/invariant_schematic.jsonl --exclude "
        "../shared/data/lama_ckl/invariant_descriptive.jsonl --model models/smollm2-135m "
        "--out runs/temporalwiki_data/known_facts.jsonl`"
    ),
    "runs/temporalwiki_data": (
        "`ckl data temporalwiki --path ../shared/data/temporalwiki --out runs/temporalwiki_data`"
    ),
    "runs/lama_ckl": "`ckl data lama-ckl --path ../shared/data/lama_ckl --out runs/lama_ckl`",
    "runs/demo": "`ckl demo --quick` (or `make demo`)",
}


def hub_id(path: str) -> str | None:
    """The repo id of an explicit hub reference ``hf://org/name``, else None."""
    return path[len(HUB_PREFIX) :] if path.startswith(HUB_PREFIX) else None


def model_source(path: str) -> tuple[str, bool]:
    """(what ``from_pretrained`` gets, whether it may use the hub): a local dir offline, or an hf:// id."""
    repo = hub_id(path)
    return (repo, False) if repo is not None else (path, True)


def producer_hint(path: str | Path, recipes_dir: str | Path = "recipes") -> str:
    """Which command writes ``path``: a meta-training recipe whose run_dir holds it, or a set-up command."""
    norm = Path(path).as_posix().rstrip("/")
    for prefix, command in PRODUCERS.items():
        if norm == prefix or norm.startswith(prefix + "/"):
            return f"; {command} writes it"
    for recipe in sorted(glob.glob(str(Path(recipes_dir) / "*.yaml"))):
        try:
            data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        run_dir = data.get("run_dir") if isinstance(data, dict) else None
        if run_dir and norm in (f"{Path(run_dir).as_posix()}/ta", f"{Path(run_dir).as_posix()}/export/ta"):
            return f"; `ckl meta-train --recipe {Path(recipe).as_posix()}` writes it"
    return ""


def require_model_dir(path: str, field: str) -> None:
    """A local HF model directory (config.json inside), or an explicit ``hf://`` id.

    Raises:
        ConfigError: naming ``field`` and the command that writes the directory, when known.
    """
    if hub_id(path) is not None:
        return
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"{field}: {path} does not exist{producer_hint(path)} (a model on the Hugging Face hub: "
            f"{field}={HUB_PREFIX}org/name)"
        )
    if not (p / "config.json").is_file():
        raise ConfigError(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    if not any(p.glob("*.safetensors")) and any(p.glob("pytorch_model*.bin")):
        raise ConfigError(
            f"{field}: {path} holds only pickled weights (pytorch_model.bin), which ckl never loads (pickles "
            'runs code). Convert it once where you trust the file: python -c "from transformers import '
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
            f"(and copy the tokenizer), then set {field} to the new directory"
        )


def require_ta_dir(path: str, field: str) -> None:
    """A Train-Attention model directory (``ta_config.json`` inside)."""
    if not Path(path).is_dir():
        raise ConfigError(f"{field}: {path} does not exist{producer_hint(path)}")
    if not (Path(path) / "ta_config.json").is_file():
        raise ConfigError(
            f"{field}: {path} is not a TA model directory (no ta_config.json); "
            f"`ckl meta-train` writes RUN_DIR/ta, `ckl export --run RUN_DIR` the latest checkpoint's"
        )


def require_file(path: str, field: str) -> None:
    """An existing file or directory (a data set)."""
    if not Path(path).exists():
        raise ConfigError(f"{field}: {path} does not exist{producer_hint(path)}")
