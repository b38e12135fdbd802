"""Does φ tell the asked new fact from the distractors? (the hard world, ``ckl data synth --hard``)

For each TO-LEARN evidence document of a bench_surprise_hard.py run: φ's mean weight on the asked
object's tokens against each distractor object's; counts the documents where the asked object is
above both, and the asked object's share of φ's total weight. Prints one line per TA model.

    python benchmarks/asked_vs_distractors.py RUN [TA_DIR ...]     # RUN holds world/ and base/

``--fit-mask STEPS``: instead, fit a fresh φ (the base's trunk, ``--echo`` or causal) to the asked
object's tokens of RUN's meta pairs by binary cross-entropy for STEPS steps -- supervised, not
label-free -- and measure it the same way: whether φ can represent the rule from those pairs at all
(``--save DIR`` keeps that φ for ``ckl eval``).

``--picked-world DIR``: RUN's world with each TO-LEARN row's ``picked``, the new object φ weighs most;
``ckl eval --recipe RUN/eval_all_new/recipe.yaml run_dir=... data.dir=DIR weights.object_field=picked``
then trains on that object alone: what φ's ranking is worth as a hard choice (the spans of the new
objects come from the world's labels, so this is an upper bound on using the ranking, not a method).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckl_toolkit.core.io import write_jsonl_atomic  # noqa: E402
from ckl_toolkit.core.losses import token_nll  # noqa: E402
from ckl_toolkit.core.ta_model import TrainAttentionModel, build_ta_model, load_ta_model, save_ta_model  # noqa: E402
from ckl_toolkit.core.text import char_spans, encode, token_mask_for_spans  # noqa: E402
from ckl_toolkit.metalearn.episodes import make_episode_batch  # noqa: E402


@torch.no_grad()
def measure(ta: TrainAttentionModel, base, tok, rows: list[dict]) -> tuple[dict, list[str]]:
    """The counts above, and per document the new object φ weighs most (its hard choice)."""
    wins, share, picked = 0, [], []
    for r in rows:
        enc = encode(tok, [r["evidence"]], 4096)
        nll = token_nll(base, enc.input_ids, enc.attention_mask) if ta.surprise else None
        w = ta(enc.input_ids, enc.attention_mask, None, nll)[0]  # (T,)
        asked, *distractors = [  # (T,) bool: the tokens of each new object's first occurrence
            token_mask_for_spans(enc.offsets[0], enc.attention_mask[0], char_spans(r["evidence"], o)[:1])
            for o in r["new_objects"]
        ]
        means = [w[m].mean() for m in (asked, *distractors)]
        wins += int(all(means[0] > m for m in means[1:]))
        share.append((w[asked].sum() / w[1:].sum()).item())
        picked.append(r["new_objects"][int(torch.stack(means).argmax())])
    report = {
        "asked_above_distractors": wins,
        "asked_picked": sum(p == r["new_objects"][0] for p, r in zip(picked, rows)),  # ties go to the asked
        "documents": len(rows),
        "asked_share": sum(share) / len(share),
    }
    return report, picked


def write_picked_world(run: Path, out: Path, rows: list[dict], picked: list[str]) -> None:
    """RUN's world with each TO-LEARN row's ``picked``: train on it with ``ckl eval ... methods=[oracle]
    weights.object_field=picked`` (φ's ranking as a hard choice among the new objects, whose spans
    come from the world's labels: what the ranking alone is worth)."""
    shutil.copytree(run / "world", out, dirs_exist_ok=True)
    write_jsonl_atomic(out / "to_learn.jsonl", [{**r, "picked": p} for r, p in zip(rows, picked)])


def fit_mask(run: Path, tok, echo: bool, steps: int, seed: int) -> TrainAttentionModel:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    ta = build_ta_model(run / "base", echo=echo).train()
    with torch.no_grad():
        ta.head.bias.zero_()
    opt = torch.optim.AdamW(ta.parameters(), lr=1e-3)
    pairs = [json.loads(x) for x in (run / "world" / "meta_train.jsonl").read_text().splitlines()]
    for _ in range(steps):
        b = make_episode_batch(tok, rng.sample(pairs, 16), 256, 64)
        w = ta(b.doc_ids, b.doc_mask)[:, 1:]  # (B, T-1)
        real, y = b.doc_mask[:, 1:].bool(), b.doc_obj.float()
        loss = F.binary_cross_entropy(w[real], y[real], weight=1 + 20 * y[real])  # objects are rare
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ta.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("ta_dirs", nargs="*", type=Path)
    parser.add_argument("--fit-mask", type=int, default=0, metavar="STEPS")
    parser.add_argument("--echo", action="store_true", help="with --fit-mask: φ reads each document twice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save", type=Path, help="with --fit-mask: save the fitted φ here (a TA directory for ckl eval)"
    )
    parser.add_argument(
        "--picked-world",
        type=Path,
        help="write RUN's world here with each TO-LEARN row's 'picked': the new object the last TA "
        "model weighs most",
    )
    args = parser.parse_args()
    if args.picked_world and not (args.ta_dirs or args.fit_mask):
        parser.error("--picked-world needs a TA model (TA_DIR or --fit-mask) to pick with")
    tok = AutoTokenizer.from_pretrained(args.run / "base")
    base = AutoModelForCausalLM.from_pretrained(args.run / "base").eval()
    rows = [json.loads(x) for x in (args.run / "world" / "to_learn.jsonl").read_text().splitlines()]
    if "new_objects" not in rows[0]:
        raise SystemExit(
            f"{args.run / 'world' / 'to_learn.jsonl'}: no field 'new_objects' (a world without distractors)"
        )
    models = {str(d): load_ta_model(d).eval() for d in args.ta_dirs}
    if args.fit_mask:
        fitted = fit_mask(args.run, tok, args.echo, args.fit_mask, args.seed)
        models[f"fit-mask {'echo' if args.echo else 'causal'}"] = fitted
        if args.save:
            save_ta_model(fitted, args.save, tok)
    for name, ta in models.items():
        report, picked = measure(ta, base, tok, rows)
        print(json.dumps({"ta": name, **report}))
    if args.picked_world:  # the last model's choices
        write_picked_world(args.run, args.picked_world, rows, picked)


if __name__ == "__main__":
    main()
