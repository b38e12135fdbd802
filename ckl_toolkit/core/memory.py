"""Give freed tensor memory back to the OS, so a process's resident set follows its live tensors.

PyTorch on the CPU allocates tensors with glibc's malloc. glibc serves a block of at least its mmap
threshold with mmap (unmapped, i.e. returned, on free), but raises that threshold to the size of
every such block freed, up to 32 MB: afterwards a training step's activations (a few MB each) come
from the heap, and their freed space stays resident. Measured on SmolLM2-135M with gradient
checkpointing, one forward over 8 x 256 tokens left 2.5 GB resident of which 1.1 GB was live
(``benchmarks/bench_update_memory.py``). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which
also stops the adjustment) returns blocks of at least that size when they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 4 * 2**20  # 4 MB: every activation of a 16 x 256 batch; small blocks stay pooled
ENV = "CKL_MMAP_THRESHOLD"


def return_freed_memory(threshold: int | None = None) -> bool:
    """Make freed blocks of at least ``threshold`` bytes go back to the OS (glibc only; else a no-op).

    Args:
        threshold: bytes; default ``$CKL_MMAP_THRESHOLD`` or 4 MB; 0 leaves glibc as it is. A user's
            own ``MALLOC_MMAP_THRESHOLD_`` is respected.

    Returns:
        Whether the allocator was changed.
    """
    if threshold is None:
        threshold = int(os.environ.get(ENV, DEFAULT_THRESHOLD))
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        changed = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to do
        return False
    logger.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", threshold, changed)
    return changed
