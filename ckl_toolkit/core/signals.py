"""Graceful stops for the long jobs (``ckl update``, ``ckl meta-train``): checkpoint, then exit 6.

Both jobs enter :class:`StopFlag` around their loop and check ``stop.requested`` after each step, so
a SIGTERM from a scheduler loses no finished step (ARCHITECTURE.md, the nightly contract).
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)


class StopFlag:
    """While entered, SIGTERM / SIGINT ask the loop to checkpoint and exit 6 after the current step.

    A second SIGINT stops at once (the last checkpoint still resumes). The previous handlers come
    back on exit, so an in-process caller keeps its own.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: checkpointing at the end of this step, then exiting", signum)

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
