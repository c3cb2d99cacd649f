"""Fault injection for the run-safety tests: kill or poison a run at an exact point.

Inactive unless TUNEFORGE_FAULT is set, e.g. `kill@step:7` (SIGKILL this process right after optimizer
step 7), `kill@ckpt:6` (SIGKILL in the middle of writing checkpoint 6: state saved, not yet renamed),
`kill@final` (after the last step, before the final save), `nan@step:5` (a NaN weight before step 5),
`pause@step:3` (after step 3, wait up to 60 s for a signal: lets a test send SIGTERM at an exact step).
Several faults can be given comma-separated. Used by tests/test_kill_resume.py and tests/test_runs_*.py.
"""

from __future__ import annotations

import os
import signal
import time


def _faults() -> set[str]:
    return {f.strip() for f in os.environ.get("TUNEFORGE_FAULT", "").split(",") if f.strip()}


def fault_point(where: str, step: int | None = None) -> None:
    """Die here with SIGKILL if the environment asks for it (no cleanup runs, as with `kill -9`)."""
    faults = _faults()
    if not faults:
        return
    if f"kill@{where}:{step}" in faults or f"kill@{where}" in faults:
        os.kill(os.getpid(), signal.SIGKILL)
    if f"pause@{where}:{step}" in faults:
        from tuneforge.train.safety import signals

        print(f"paused at {where} {step}", flush=True)
        deadline = time.time() + 60
        while signals.LAST_SIGNAL is None and time.time() < deadline:
            time.sleep(0.05)


def poison(step: int) -> bool:
    """True when the tests ask for this step's loss to be NaN."""
    return f"nan@step:{step}" in _faults()
