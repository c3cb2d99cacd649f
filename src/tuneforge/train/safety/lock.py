"""One process trains into a run directory at a time.

RUN_DIR/run.lock holds the owner's pid, host and a heartbeat time refreshed by a daemon thread.
A second process is refused while the owner lives; a lock whose owner is dead (same host: the pid is
gone; other host: no heartbeat for `stale_after` seconds) is stale and `--resume` takes it over.
The lock is created with O_EXCL, so two processes racing for a free directory cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import UserError

LOCK = "run.lock"


@dataclass
class Owner:
    pid: int
    host: str
    heartbeat: float
    started: float

    def alive(self, stale_after: float) -> bool:
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return time.time() - self.heartbeat < stale_after  # another machine: trust the heartbeat

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, last heartbeat {time.time() - self.heartbeat:.0f}s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(run_dir: Path) -> Owner | None:
    try:
        raw = json.loads((Path(run_dir) / LOCK).read_text())
        return Owner(int(raw["pid"]), str(raw["host"]), float(raw["heartbeat"]), float(raw.get("started", 0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # torn or foreign content: treat as a dead owner
        return Owner(-1, "?", 0.0, 0.0)


def refuse_if_live(run_dir: Path, stale_after: float = 120.0) -> None:
    """Before touching a run directory (resume, overwrite): refuse while another live process trains there."""
    owner = read_owner(run_dir)
    if owner is not None and owner.pid != os.getpid() and owner.alive(stale_after):
        raise UserError(f"{run_dir}: a run is already training here ({owner.describe()}); "
                        "wait for it or stop it before starting another")


class RunLock:
    """Hold RUN_DIR/run.lock for the life of a run (a context manager, or acquire()/release())."""

    def __init__(self, run_dir: Path, resume: bool, heartbeat_s: float = 10.0, stale_after: float = 120.0, log=print):
        self.path = Path(run_dir) / LOCK
        self.resume, self.heartbeat_s, self.stale_after, self.log = resume, heartbeat_s, stale_after, log
        self.took_over: Owner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # retry once after clearing a stale lock (another process may race us)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(self._record(started=time.time()))
            self._thread = threading.Thread(target=self._beat, name="tuneforge-run-lock", daemon=True)
            self._thread.start()
            return self
        raise UserError(f"{self.path.parent}: another process keeps taking the run lock; make sure only one run uses this directory")

    def _handle_existing(self) -> None:
        owner = read_owner(self.path.parent)
        if owner is None:
            return  # released between our open and read: try again
        if owner.alive(self.stale_after):
            raise UserError(f"{self.path.parent}: a run is already training here ({owner.describe()}); "
                            "wait for it or stop it before starting another")
        if not self.resume:
            raise UserError(f"{self.path.parent}: holds a stale lock from a run that died ({owner.describe()}); "
                            "add --resume to continue it")
        self.log(f"taking over the stale lock of a dead run ({owner.describe()})")
        self.took_over = owner
        self.path.unlink(missing_ok=True)

    def _record(self, started: float) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(), "started": started})

    def _beat(self) -> None:
        started = time.time()
        while not self._stop.wait(self.heartbeat_s):
            try:
                tmp = self.path.with_name(LOCK + f".{os.getpid()}.tmp")
                tmp.write_text(self._record(started))
                tmp.replace(self.path)
            except OSError:  # a full disk must not kill training from a side thread; the next beat retries
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        owner = read_owner(self.path.parent)
        if owner is not None and owner.pid == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
