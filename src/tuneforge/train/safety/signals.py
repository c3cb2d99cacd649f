"""SIGINT/SIGTERM (Ctrl-C, a scheduler, a spot instance going away) end a run cleanly.

The first signal only sets a flag: the loop finishes the current optimizer step, writes a checkpoint,
sets status `interrupted` and exits non-zero, so `--resume` continues exactly. A second SIGINT
restores the default behaviour (raise KeyboardInterrupt at once) for a user who really wants out.
"""

from __future__ import annotations

import signal
import threading

INTERRUPTED_EXIT = 130
LAST_SIGNAL: str | None = None  # the last signal a StopFlag caught in this process (read by train/faults.py)


class Interrupted(KeyboardInterrupt):
    """Raised by the recipe after the checkpoint was written; the CLI maps it to exit 130 like Ctrl-C."""

    exit_code = INTERRUPTED_EXIT


class StopFlag:
    """Install handlers for SIGINT/SIGTERM; `requested` names the signal once one arrived."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. under a job server)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        global LAST_SIGNAL
        name = signal.Signals(signum).name
        LAST_SIGNAL = name
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
