"""The demo over several seeds: mean ± sd of each row instead of one seed's figures.

Each seed is a whole ``ckl demo`` (its own world, base, TA model and protocol; ``run_demo`` with that
seed, outputs under ``--out/seed<S>``, reused when a seed's stages already ran). Writes one JSON under
benchmarks/results/ with every seed's rows and the mean ± sd (sample sd, n - 1) of Top EM, NOT-TO-FORGET
EM and TAALM / oracle.

    flock /tmp/ckl/cpu.lock env OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE \\
        python benchmarks/bench_demo_seeds.py --quick --seeds 0 1 2 3 4    # ~80 s a seed on 2 cores
    ... python benchmarks/bench_demo_seeds.py --seeds 0 1 2                 # the full demo, ~12 min a seed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckl_toolkit.core.io import write_json_atomic  # noqa: E402
from ckl_toolkit.demo import METHODS, run_demo  # noqa: E402


def mean_sd(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize(per_seed: dict[int, dict]) -> dict:
    """Mean ± sd over seeds of each row's Top EM and NF EM, and of TAALM / oracle (a ratio per seed)."""
    out = {}
    for name in METHODS:
        out[name] = {
            "top_em": mean_sd([r["methods"][name]["top_em"] for r in per_seed.values()]),
            "nf_em": mean_sd([r["methods"][name]["nf_em"] for r in per_seed.values()]),
        }
    rows = [r["methods"] for r in per_seed.values()]
    ratios = [m["taalm"]["top_em"] / max(m["oracle"]["top_em"], 1e-9) for m in rows]
    out["taalm_over_oracle"] = mean_sd(ratios)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the quick demo (make demo-quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="default runs/demo_seeds[_quick]")
    parser.add_argument("--result", default=None, help="default benchmarks/results/demo_seeds[_quick].json")
    args = parser.parse_args()
    tag = "_quick" if args.quick else ""
    out = Path(args.out or f"runs/demo_seeds{tag}")
    result = Path(args.result or ROOT / "benchmarks" / "results" / f"demo_seeds{tag}.json")
    load, start = os.getloadavg(), time.perf_counter()

    per_seed, seconds = {}, {}
    for seed in args.seeds:  # the JSON is rewritten after every seed: a long run keeps what finished
        t = time.perf_counter()
        per_seed[seed] = run_demo(out / f"seed{seed}", quick=args.quick, seed=seed, progress=False)
        seconds[seed] = time.perf_counter() - t
        summary = summarize(per_seed)
        write_json_atomic(result, {
            "demo": "quick" if args.quick else "full",
            "seeds": list(per_seed),
            "summary": summary,
            "per_seed": {
                s: {m: {k: r["methods"][m][k] for k in ("top_em", "em_epoch", "nf_em")} for m in METHODS}
                for s, r in per_seed.items()
            },
            "seconds_per_seed": seconds,
            "seconds": time.perf_counter() - start,
            "loadavg_at_start": load,
            "loadavg_at_end": os.getloadavg(),
        })  # fmt: skip
    for name in METHODS:
        top, nf = summary[name]["top_em"], summary[name]["nf_em"]
        print(f"{name:<8} Top EM {top['mean']:.3f} ± {top['sd']:.3f}", end="   ")
        print(f"NF EM {nf['mean']:.3f} ± {nf['sd']:.3f}")
    r = summary["taalm_over_oracle"]
    print(f"TAALM / oracle {r['mean']:.2f} ± {r['sd']:.2f} over seeds {args.seeds} -> {result}")


if __name__ == "__main__":
    main()
