"""Parameter-subset targets: only the chosen weights move, through ``ckl update`` and eval methods."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ckl_toolkit.core.config import ConfigError
from ckl_toolkit.evaluation.methods import Method, parse_method
from ckl_toolkit.nightly.contract import current_version
from ckl_toolkit.training.sections import TargetSpec
from ckl_toolkit.training.subset import subset_names
from ckl_toolkit.update import update
from tests.nightly.test_update import facts, make_recipe, write_jsonl

# subset -> a predicate on a tiny Llama's parameter names (2 decoder layers)
EXPECTED = {
    "attention": lambda n: ".self_attn." in n,
    "mlp_gate_up": lambda n: ".mlp.gate_proj." in n or ".mlp.up_proj." in n,
    "top_k_layers:1": lambda n: ".layers.1." in n,
    "freeze_bottom_k:1": lambda n: ".layers.0." not in n and "embed_tokens" not in n,
    "q_proj|v_proj": lambda n: "q_proj" in n or "v_proj" in n,
}


@pytest.fixture(scope="module")
def base_tensors(tiny_lm_dir):
    return load_file(str(tiny_lm_dir / "model.safetensors"))


def test_subset_names_on_a_llama(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    names = [n for n, _ in model.named_parameters()]
    for subset, want in EXPECTED.items():
        chosen = subset_names(model, subset)
        assert chosen == [n for n in names if want(n)] and chosen, subset
    assert "lm_head.weight" in subset_names(model, "freeze_bottom_k:1")
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        subset_names(model, "top_k_layers:3")
    with pytest.raises(ConfigError, match="selects no parameter"):
        subset_names(model, "no_such_module")


@pytest.mark.parametrize("subset", list(EXPECTED))
def test_a_subset_update_moves_only_its_weights(tmp_path, tiny_lm_dir, base_tensors, subset):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 6))
    summary = update(make_recipe(tmp_path, tiny_lm_dir, "target.kind=subset", f"target.subset={subset}"))
    assert summary.exit_code == 0
    after = load_file(str(current_version(tmp_path / "out") / "model/model.safetensors"))
    want = EXPECTED[subset]
    assert sorted(after) == sorted(base_tensors)
    for name, before in base_tensors.items():
        if want(name):
            assert not after[name].equal(before), f"{subset}: {name} should have trained"
        else:
            assert after[name].equal(before), f"{subset}: {name} must stay bit-identical"
    assert summary.weights_moved["tensors"] == sum(map(want, base_tensors))


def test_a_subset_version_continues_next_night_and_refuses_another_kind(tmp_path, tiny_lm_dir, base_tensors):
    write_jsonl(tmp_path / "data/a.jsonl", facts("a", 4))
    recipe = make_recipe(tmp_path, tiny_lm_dir, "target.kind=subset", "target.subset=attention")
    assert update(recipe).exit_code == 0
    write_jsonl(tmp_path / "data/b.jsonl", facts("b", 4))
    assert update(recipe).exit_code == 0
    v2 = current_version(tmp_path / "out")
    after = load_file(str(v2 / "model/model.safetensors"))
    assert all(after[n].equal(t) for n, t in base_tensors.items() if ".self_attn." not in n)
    assert "only the base's attention weights" in (v2 / "README.md").read_text()
    write_jsonl(tmp_path / "data/c.jsonl", facts("c", 2))
    with pytest.raises(ConfigError, match="trained as 'subset'"):
        update(make_recipe(tmp_path, tiny_lm_dir, "target.kind=full"))


def test_bad_subsets_are_named():
    with pytest.raises(ConfigError, match=r"subset: 'top_k_layers:x': K must be a positive integer"):
        TargetSpec(path="m", kind="subset", subset="top_k_layers:x")
    with pytest.raises(ConfigError, match="neither attention"):
        TargetSpec(path="m", kind="subset", subset="(unclosed")
    with pytest.raises(ConfigError, match="subset fine-tune has no adapter"):
        TargetSpec(path="m", kind="subset", export="adapter")


def test_subset_method_names():
    m = parse_method("taalm+attn_only")
    assert m == Method("taalm+attn_only", weights="taalm", target="subset", subset="attention")
    assert parse_method("mlp_only").subset == "mlp" and parse_method("mlp_gate_up").subset == "mlp_gate_up"
    assert parse_method("rho1+top4_layers").subset == "top_k_layers:4"
    assert parse_method("taalm+freeze_bottom6+mix_review").subset == "freeze_bottom_k:6"
    with pytest.raises(ConfigError, match="sets the target twice"):
        parse_method("attn_only+lora")
    with pytest.raises(ConfigError, match="attn_only"):
        parse_method("taalm+attn")
