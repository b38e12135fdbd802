import pytest

from ckl_toolkit.core.config import ConfigError, describe, load_recipe, recipe_hash
from ckl_toolkit.metalearn.config import MetaRecipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_build_typed_dataclasses(tmp_path):
    p = write(tmp_path, "steps: 10\nbase:\n  path: /m\nmeta:\n  inner:\n    lr: 0.5\n")
    r = load_recipe(MetaRecipe, p, ["optim.lr=1e-3", "base.lora={r: 4}", "meta.mode=independent"])
    assert r.steps == 10 and r.base.path == "/m"
    assert r.meta.inner.lr == 0.5 and isinstance(r.optim.lr, float) and r.optim.lr == 1e-3
    assert r.base.lora.r == 4 and r.meta.mode == "independent"


def test_unknown_field_names_file_line_and_field(tmp_path):
    p = write(tmp_path, "steps: 10\nbase:\n  path: /m\n  lorra: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:4: base\.lorra: unknown field"):
        load_recipe(MetaRecipe, p)


def test_wrong_type_names_field(tmp_path):
    p = write(tmp_path, "steps: many\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:1: steps: expected an integer"):
        load_recipe(MetaRecipe, p)


def test_validation_names_field(tmp_path):
    p = write(tmp_path, "resume: sometimes\n")
    with pytest.raises(ConfigError, match=r"resume='sometimes': must be one of"):
        load_recipe(MetaRecipe, p)
    with pytest.raises(ConfigError, match="batch_size"):
        load_recipe(MetaRecipe, None, ["batch_size=0"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(MetaRecipe, None, ["steps"])


def test_hash_changes_with_recipe_and_describe_lists_help():
    a = load_recipe(MetaRecipe, None, ["steps=5"])
    b = load_recipe(MetaRecipe, None, ["steps=6"])
    assert recipe_hash(a) != recipe_hash(b) and recipe_hash(a) == recipe_hash(
        load_recipe(MetaRecipe, None, ["steps=5"])
    )
    rows = {name: help_ for name, _, help_ in describe(MetaRecipe)}
    assert "TA optimiser steps" in rows["steps"]
    assert "base.lora.r" in rows and "LoRA rank" in rows["base.lora.r"]
