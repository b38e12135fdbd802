import torch

from ckl_toolkit.evaluation.lama_ckl import ProtocolResult, run_lama_ckl
from ckl_toolkit.training.learner import build_learner
from ckl_toolkit.training.sections import BatchSpec, MixReviewSpec, OptimSpec, TargetSpec, WeightSpec


def learner(tiny_lm_dir, weights: str, lr: float = 1e-2):
    target = TargetSpec(path=str(tiny_lm_dir))
    return build_learner(target, WeightSpec(method=weights), OptimSpec(lr=lr), None, 0, torch.device("cpu"))


def test_headline_numbers_follow_the_paper_definitions():
    r = ProtocolResult(
        to_learn=[0.1, 0.5, 0.7, 0.7, 0.6],
        to_learn_em=[0.0, 0.2, 0.4, 0.5, 0.5],
        not_to_forget=[1.0, 0.95, 0.9, 0.8, 0.7],
        not_to_forget_em=[1.0, 0.9, 0.85, 0.8, 0.6],
    )
    s = r.summary()
    assert s["top_acc"] == 0.7 and s["epoch"] == 2  # first argmax
    assert s["nf_acc"] == 0.9 and abs(s["total"] - 1.6) < 1e-12  # NF at Top Acc's epoch
    assert s["top_em"] == 0.5 and s["em_epoch"] == 3 and s["nf_em"] == 0.8


ROWS = [
    {
        "evidence": "Ada Lovelace works for Babbage Engines .",
        "task_descriptive": "Ada Lovelace works for Babbage Engines",
        "object": "Babbage Engines",
    },
    {
        "evidence": "Alan Turing was born in Maida Vale .",
        "task_descriptive": "Alan Turing was born in Maida Vale",
        "object": "Maida Vale",
    },
]


def test_protocol_learns_and_evaluates_each_epoch(tiny_lm_dir):
    res = run_lama_ckl(
        learner(tiny_lm_dir, "oracle"),
        ROWS,
        ROWS[:1],
        8,
        BatchSpec(batch_size=2),
        MixReviewSpec(),
        progress=False,
    )
    assert len(res.to_learn) == len(res.not_to_forget) == 9  # epoch 0 + 8 epochs
    # a random tiny model starts at 0 and picks up most object tokens of two documents
    assert res.to_learn[0] == 0.0 and res.summary()["top_acc"] > 0.4
    assert res.train_loss[-1] < res.train_loss[0]


def test_oracle_trains_only_object_tokens(tiny_lm_dir):
    """With oracle weights the non-object tokens get no gradient signal: their loss barely moves."""
    losses = {}
    for name in ("oracle", "uniform"):
        batching = BatchSpec(batch_size=2)
        run = run_lama_ckl(learner(tiny_lm_dir, name), ROWS, [], 3, batching, MixReviewSpec(), progress=False)
        losses[name] = run.to_learn
    # both learn the object tokens, but the curves differ: the weights changed what was learned
    assert losses["oracle"] != losses["uniform"]
