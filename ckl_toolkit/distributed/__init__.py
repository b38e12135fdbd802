"""Running a job on several ranks: the process group and launchers, DeepSpeed configs, ZeRO state.

    process.py      DistContext, init_distributed / shutdown, barrier, broadcast, launch_command
    ds_config.py    the ds_configs/ presets and their "auto" fields, filled from a job's recipe
    zero_state.py   a ZeRO optimizer's per-rank state without pickles (checkpoints of both jobs)

Nothing here imports deepspeed at module level, so a single plain process never loads it.
"""
