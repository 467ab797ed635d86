"""SIGTERM (pod preemption, eviction, torchrun shutting its workers down) → checkpoint, then exit 143.

The handler only sets a flag; the Trainer polls it at every batch it hands the pipeline and, once any
rank has it, every rank stops at the same step (the pipeline drains; the ranks vote asynchronously, so
that is at most one batch after the signal: recsys.stop_vote), saves and exits. A watchdog ends
the process after train.checkpoint.preempt_grace_s even if that never happens (a hung peer): the
checkpoint is then the previous one, never a half-written one (see recsys.checkpoint).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType, TracebackType

from recsys.errors import PREEMPTED_EXIT


def _say(msg: str) -> None:
    # os.write, not print: a handler may interrupt a print of the main thread (re-entrant call).
    os.write(2, f"recsys: {msg}\n".encode())


class PreemptionGuard:
    """While entered (main thread only): SIGTERM sets `requested`; the process ends after `grace_s`."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested_at: float | None = None
        self._previous: signal.Handlers | object | None = None

    @property
    def requested(self) -> bool:
        """True once SIGTERM arrived."""
        return self.requested_at is not None

    def seconds_since(self) -> float | None:
        """Seconds since SIGTERM arrived here (None: it did not, e.g. only another rank got it)."""
        return None if self.requested_at is None else time.monotonic() - self.requested_at

    def __enter__(self) -> PreemptionGuard:
        # Signal handlers can only be set from the main thread (Spark or notebook callers may differ).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        _say(
            f"SIGTERM: checkpointing at the next step, then exiting {PREEMPTED_EXIT} (grace {self.grace_s:g} s)"
        )
        watchdog = threading.Timer(self.grace_s, self._expire)
        watchdog.daemon = True
        watchdog.start()

    def _expire(self) -> None:
        _say(
            f"the preemption grace of {self.grace_s:g} s (train.checkpoint.preempt_grace_s) ran out before "
            f"the checkpoint was complete; exiting {PREEMPTED_EXIT}: a restart resumes from the previous one"
        )
        os._exit(PREEMPTED_EXIT)
