"""One rank of an instrumented ``ckl_toolkit/meta.py`` run, for tests/metalearn/test_meta_distributed.py.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/metalearn/distributed_worker.py
--report DIR [--kill-at K] --recipe R [key=value ...]``. It runs the real ``meta.main`` and

- counts every torch.distributed collective issued while ``meta_gradient`` runs (the inner step,
  the directions and dL/dw must not reduce anything across ranks: only gathers of a partitioned
  base's shards may appear there);
- records how many parameter elements of φ and of the base this rank holds (the partition), and
  the largest fraction of the base ever gathered at once (a partition that gathers everything
  during the meta-gradient would save nothing at peak);
- with ``--kill-at K``: SIGKILLs rank 1 in the middle of writing the checkpoint of step K (its
  engine state written into the staging directory, the step directory not yet complete) while
  rank 0 waits for it: a crash at the worst moment; torchrun then takes down the other rank;

and writes DIR/rank{r}.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as tdist

COLLECTIVES = (
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "all_reduce_coalesced",
)
counts: collections.Counter = collections.Counter()
inside_metagrad = [False]


def count_collectives() -> None:
    """Wrap torch.distributed's collectives before DeepSpeed binds them."""
    for name in COLLECTIVES:
        fn = getattr(tdist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            if inside_metagrad[0]:
                counts[_name] += 1
            return _fn(*args, **kwargs)

        setattr(tdist, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    args, rest = parser.parse_known_args()
    count_collectives()

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import ckl_toolkit.meta as meta
    import ckl_toolkit.metalearn.step as step
    from ckl_toolkit.metalearn.zero import local_numel

    held: dict = {}
    rank = int(os.environ.get("RANK", "0"))

    def metagrad(*a, **k):
        inside_metagrad[0] = True
        try:
            return real_metagrad(*a, **k)
        finally:
            inside_metagrad[0] = False

    def engine(*a, **k):
        e = real_engine(*a, **k)
        held["ta"] = local_numel(e.module)
        save = e.save

        def save_then_die(out: Path) -> None:  # out: checkpoints/.staging_{step:08d}
            save(out)
            if rank == 1 and int(out.name.rsplit("_", 1)[1]) == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        e.save = save_then_die
        return e

    def base(spec, ds_config, seed):
        model, params = real_base(spec, ds_config, seed)
        frozen = [p for n, p in model.named_parameters() if n not in params]
        held["base"] = (
            sum(p.ds_tensor.numel() for p in frozen if hasattr(p, "ds_tensor")),
            sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in frozen),
        )
        held["lora"] = sum(p.numel() for p in params.values())
        watch_gathered(frozen)
        return model, params

    def watch_gathered(frozen: list) -> None:
        """Record the most base elements ever gathered at once (after each layer's forward/backward)."""
        from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        full = sum(p.ds_numel for p in frozen)
        held["base_peak_gathered"] = 0.0

        def probe() -> None:
            live = sum(p.ds_numel for p in frozen if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
            held["base_peak_gathered"] = max(held["base_peak_gathered"], live / full)

        release = coordinator.PartitionedParameterCoordinator.release_sub_module

        def probing_release(self, *a, **k):
            probe()  # called after every layer's forward and backward, just before it frees the layer
            return release(self, *a, **k)

        coordinator.PartitionedParameterCoordinator.release_sub_module = probing_release

    real_metagrad, step.meta_gradient = step.meta_gradient, metagrad
    real_engine, meta.build_engine = meta.build_engine, engine
    real_base, meta.load_partitioned_base = meta.load_partitioned_base, base
    meta.main(rest)
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"collectives_in_metagrad": dict(counts), **held}))


if __name__ == "__main__":
    main()
