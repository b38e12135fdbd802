"""Every click command lives in ckl_toolkit/cli.py; library code never imports click."""

from __future__ import annotations

import ast
from pathlib import Path

import ckl_toolkit
from ckl_toolkit.cli import main

PACKAGE = Path(ckl_toolkit.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_cli_imports_click():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p != PACKAGE / "cli.py" and "click" in _imports(p)
    ]
    assert offenders == []


def test_every_command_is_registered():
    assert {"report", "weights", "convert-smollm2", "data", "export", "eval", "update"} <= set(main.commands)
    assert {"synth", "lama-ckl"} <= set(main.commands["data"].commands)


def test_validate_tells_each_shipped_recipe_s_job():
    """Eval recipes embed a ``target`` section like update recipes; validate must still read them as eval."""
    from ckl_toolkit.cli import _guess_job

    recipes = PACKAGE.parent / "recipes"
    jobs = {p.name: _guess_job(p) for p in sorted(recipes.glob("*.yaml"))}
    assert jobs["lama_ckl_synthetic.yaml"] == jobs["temporalwiki_nights.yaml"] == "eval"
    assert jobs["temporalwiki.yaml"] == jobs["update_synthetic.yaml"] == "update"
    assert jobs["meta_smollm2.yaml"] == jobs["meta_temporalwiki.yaml"] == "meta"
