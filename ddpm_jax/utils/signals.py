"""Graceful stop on SIGTERM/SIGINT: the loop finishes its step, saves, and returns."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
    """While active, SIGTERM and SIGINT only set a flag: the loop saves at the next step boundary and returns.

    A second SIGINT restores the default handler and interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        """True when any process got a signal (all processes agree, so they stop at the same step)."""
        flag = self.signum is not None
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag
