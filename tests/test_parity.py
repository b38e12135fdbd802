"""One training stack: ``ckl eval``'s protocol and a ``ckl update`` run train bit-identical weights.

For the same documents, seed and method, one epoch of the LAMA-ckl protocol (the learner ``ckl eval``
builds for the method) and one nightly update over the same documents (the recipe sections the method
maps onto) must end with the same trained tensors, bit for bit, on CPU in fp32. If the two jobs ever
drift apart again (clipping, windowing, order, weights, optimizer, rehearsal), this fails.
"""

from __future__ import annotations

import json

import pytest
import torch

from ckl_toolkit.core.config import load_recipe
from ckl_toolkit.core.documents import Document
from ckl_toolkit.core.models import LoraSpec
from ckl_toolkit.core.ta_model import build_ta_model, save_ta_model
from ckl_toolkit.evaluation.lama_ckl import run_lama_ckl
from ckl_toolkit.evaluation.methods import method_sections, parse_method
from ckl_toolkit.evaluation.runs import method_learner
from ckl_toolkit.nightly.config import UpdateRecipe
from ckl_toolkit.nightly.contract import ExitCode, current_version
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec, OptimSpec, TargetSpec, WeightSpec
from ckl_toolkit.update import update
from tests.conftest import META_PEOPLE

SEED = 3
BATCHING = BatchSpec(max_length=12, batch_size=3, shuffle=True)  # short rows: long evidence is windowed
OPTIM = OptimSpec(lr=5e-3, grad_clip=1.0, weight_decay=0.01)
OPTIM.recadam.gamma, OPTIM.recadam.t0, OPTIM.recadam.k = 50.0, 2.0, 1.0
MIX = MixReviewSpec(mix_ratio=1.5, mix_decay=0.7, seed=1)


def to_learn_rows() -> list[dict]:
    rows = []
    for i in range(7):
        s, o = META_PEOPLE[i % len(META_PEOPLE)]
        rows.append(
            {
                "uuid": f"fact-{i}",
                "subject": s,
                "object": o,
                "task_descriptive": f"{s} works for {o}",
                "evidence": f"The weather in Paris is mild . {s} works for {o} . The Seine flows ."
                * (1 + i % 2),
            }
        )
    return rows


def pool_documents() -> list[Document]:
    return [
        Document(f"old-{i}", f"Grace Hopper speaks English . old text {i} .", "pool", i + 1) for i in range(9)
    ]


@pytest.fixture(scope="module")
def ta_dir(tiny_lm_dir, tmp_path_factory):
    """A TA model whose weights are far from uniform (a random head), saved with its tokenizer."""
    from transformers import AutoTokenizer

    torch.manual_seed(7)
    ta = build_ta_model(tiny_lm_dir)
    torch.nn.init.normal_(ta.head.weight, std=1.0)
    ta.head.bias.data.fill_(0.0)
    return save_ta_model(ta, tmp_path_factory.mktemp("ta"), AutoTokenizer.from_pretrained(tiny_lm_dir))


def eval_protocol_weights(method: str, tiny_lm_dir, ta_dir) -> dict[str, torch.Tensor]:
    """One epoch of ``ckl eval``'s LAMA-ckl protocol for ``method``; the learner's trained tensors."""
    target = TargetSpec(path=str(tiny_lm_dir), lora=LoraSpec(r=4, alpha=8))
    weights = WeightSpec(ta_path=str(ta_dir), keep_ratio=0.5)
    learner, mix = method_learner(
        parse_method(method), OPTIM.lr, target, weights, OPTIM, MIX, SEED, torch.device("cpu")
    )
    run_lama_ckl(learner, to_learn_rows(), [], 1, BATCHING, mix, SEED, pool_documents(), progress=False)
    return {n: p.detach().clone() for n, p in learner.target.trainable().items()}


def update_weights(method: str, tiny_lm_dir, ta_dir, tmp_path) -> dict[str, torch.Tensor]:
    """One ``ckl update`` over the same documents with the sections the method maps onto."""
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(json.dumps(r) + "\n" for r in to_learn_rows()))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in pool_documents()))
    weights = WeightSpec(ta_path=str(ta_dir))
    s = method_sections(
        parse_method(method), TargetSpec(path=str(tiny_lm_dir)), weights, OPTIM, MIX, OPTIM.lr
    )
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"seed={SEED}",
        f"target.path={tiny_lm_dir}",
        f"target.kind={s.target.kind}",
        "target.lora.r=4",
        "target.lora.alpha=8",
        f"weights.method={s.weights.method}",
        f"weights.ta_path={ta_dir}",
        "weights.keep_ratio=0.5",
        f"optim.name={s.optim.name}",
        f"optim.lr={OPTIM.lr}",
        "optim.weight_decay=0.01",
        "optim.recadam.gamma=50",
        "optim.recadam.t0=2",
        "optim.recadam.k=1",
        f"mix_review.mix_ratio={s.mix_review.mix_ratio}",
        "mix_review.mix_decay=0.7",
        "mix_review.seed=1",
        "batching.max_length=12",
        "batching.batch_size=3",
        "batching.shuffle=true",
        f"data.stream={{paths: [{stream}], text_field: evidence, id_field: uuid, on_error: fatal}}",
        f"data.pool={{paths: [{pool}], on_error: fatal}}",
        "epochs=1",
        "progress=false",
        "save_every=0",
        "threads=1",
    ]
    recipe = load_recipe(UpdateRecipe, None, overrides)
    assert update(recipe).exit_code == ExitCode.OK
    served = recipe.target.build(current_version(recipe.output_dir), SEED)  # the published version, reloaded
    return {n: p.detach().clone() for n, p in served.trainable().items()}


@pytest.mark.parametrize("method", ["taalm", "rho1", "recadam+mix_review", "lora"])
def test_eval_protocol_and_update_train_bit_identical_weights(method, tiny_lm_dir, ta_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    start = {n: p for n, p in AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters()}
    evaluated = eval_protocol_weights(method, tiny_lm_dir, ta_dir)
    updated = update_weights(method, tiny_lm_dir, ta_dir, tmp_path)
    assert set(evaluated) == set(updated) and evaluated
    different = [n for n in evaluated if not torch.equal(evaluated[n], updated[n])]
    assert not different, f"{method}: {len(different)} tensors differ, e.g. {different[:3]}"
    moved = [n for n in evaluated if n in start and not torch.equal(evaluated[n], start[n])]
    assert moved or method == "lora"  # the run trained something (LoRA: only its adapters exist)
