"""Freed tensor memory goes back to the OS (glibc's mmap threshold fixed), unless switched off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckl_toolkit.core.memory import return_freed_memory

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import gc, sys, torch
from ckl_toolkit.core.memory import return_freed_memory
changed = return_freed_memory() if sys.argv[1] == "on" else False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
keep, big = [], []
torch.zeros(1)
base = rss()
big.append(torch.ones(2**20 * 2))  # 8 MB, freed: glibc would raise its threshold to this size
del big[:]
for i in range(40):  # 40 x 6 MB activations with small survivors between them, then freed
    big.append(torch.ones(2**20 * 3 // 2))
    keep.append(torch.ones(256))
peak = rss()
del big[:]
gc.collect()
print(changed, round(peak - base), round(rss() - base))
"""


def run(mode: str, **env: str) -> tuple[bool, int, int]:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=environ, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    changed, peak, after = out.stdout.split()
    return changed == "True", int(peak), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_leave_the_resident_set():
    changed, peak, after = run("on")
    assert changed and peak > 200  # 240 MB were live
    assert after < 30, (peak, after)  # and went back to the OS when freed
    assert run("off")[2] > 100  # glibc's own policy keeps them resident (why core.memory exists)
    assert run("on", CKL_MMAP_THRESHOLD="0")[0] is False  # the knob turns it off
    assert run("on", MALLOC_MMAP_THRESHOLD_="65536")[0] is False  # a user's own glibc setting wins


def test_a_zero_threshold_changes_nothing():
    assert return_freed_memory(0) is False
