"""Time budgets: a deadline on the main thread (SIGALRM) that interrupts a long SymPy computation."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# ----------------------------------------------------------------------------------------------
# Time budgets


class Timeout(BaseException):
    """Raised inside SymPy when the symbolic time budget is spent (BaseException: not swallowed)."""


@contextmanager
def deadline(seconds: float | None):
    """Interrupt the block after ``seconds`` (SIGALRM, main thread only; otherwise no limit)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


