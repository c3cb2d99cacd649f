"""Run queued jobs as child processes (`tuneforge train JOB_CONFIG`), at most `concurrency` at once.

The database is the queue: a job is claimed with a compare-and-set on its status, so a job never runs twice.
Children get SIGTERM when the server dies (Linux PR_SET_PDEATHSIG): they checkpoint and stop, and the next
server start resumes them with `--resume` (or restarts them when no checkpoint exists; after MAX_ATTEMPTS
the job ends `failed` with the reason). A child that outlives its server (no PDEATHSIG) is watched until it
exits, never started a second time. Credentials are passed in the child's environment only.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from tuneforge.serve.store import (
    CANCELLED, FAILED, FINISHED, NEEDS_CREDENTIALS, QUEUED, RUNNING, Job, Store, config_of,
)

MAX_ATTEMPTS = 3
CANCEL_GRACE_S = 120.0  # a cancelled child has this long to checkpoint before SIGKILL
# Environment a job must not inherit from the server: it would let a request run arbitrary code.
BLOCKED_ENV = ("TUNEFORGE_ALLOW_CODE",)


def default_concurrency() -> int:
    """One job per visible GPU (counted without importing torch), one on CPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))
        except (OSError, subprocess.SubprocessError):
            return 1
    return 1


def gpu_slots(concurrency: int, gpus_per_job: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each job slot: disjoint groups of `gpus_per_job` GPUs (None on CPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"] if visible else []
    if not ids and shutil.which("nvidia-smi"):
        ids = [str(i) for i in range(default_concurrency())]
    groups = [",".join(ids[i:i + gpus_per_job]) for i in range(0, len(ids) - gpus_per_job + 1, gpus_per_job)]
    return [groups[i % len(groups)] if groups else None for i in range(concurrency)]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the server process dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()  # own process group: a Ctrl-C at the server's terminal is not also delivered to the job


def job_dir(store: Store, job_id: str) -> Path:
    return store.data_dir / "jobs" / job_id


def log_path(store: Store, job_id: str) -> Path:
    return job_dir(store, job_id) / "log.txt"


def read_run_info(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "run_info.json").read_text())
    except (OSError, ValueError):
        return {}


def has_checkpoint(run_dir: str | Path) -> bool:
    ckpts = Path(run_dir) / "checkpoints"
    return ckpts.is_dir() and any(p.is_dir() and not p.name.endswith(".tmp") for p in ckpts.iterdir())


def last_error_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error:") or "internal error" in line:
            return line.strip()
    return None


def pid_is_job(pid: int | None, job_id: str) -> bool:
    """Is `pid` alive and still this job's `tuneforge train` (not a reused pid)?"""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid
    return job_id in cmdline and stat.split(") ", 1)[-1][:1] not in ("Z", "X")


class Worker:
    def __init__(self, store: Store, concurrency: int = 1, log: Callable[[str], None] = lambda m: None, gpus_per_job: int = 1):
        self.store, self.concurrency, self.log = store, concurrency, log
        self.slots: list[str | None] = gpu_slots(concurrency, gpus_per_job)
        self.procs: dict[str, tuple[subprocess.Popen, int]] = {}  # job id -> (child, slot index)
        self.credentials: dict[str, dict[str, str]] = {}  # job id -> env; memory only, by design
        self.term_sent: dict[str, float] = {}
        self.recovered = False

    # ---- the loop body -------------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.recovered:
            self.recover()
        self._reap()
        orphans = self._watch_orphans()
        self._cancel_requested()
        if not orphans:  # a child of the previous server still holds its GPU/CPU slot: start nothing until it exits
            self._start_queued()

    def recover(self) -> None:
        """After a (re)start: jobs that wait for credentials this process no longer has must ask again."""
        for job in self.store.jobs(status=QUEUED):
            if job.needs_credentials and job.id not in self.credentials:
                self.store.set(job.id, (QUEUED,), status=NEEDS_CREDENTIALS,
                               reason="credentials were lost with a server restart: send them again to "
                                      f"POST /v1/jobs/{job.id}/credentials")
        self.recovered = True

    def _reap(self) -> None:
        for job_id, (proc, _slot) in list(self.procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.procs[job_id]
            self.term_sent.pop(job_id, None)
            self._finished(job_id, rc)

    def _watch_orphans(self) -> int:
        """Jobs marked running that no child of ours runs: left by a server that died. Returns how many live on."""
        alive = 0
        for job in self.store.jobs(status=RUNNING):
            if job.id in self.procs:
                continue
            if pid_is_job(job.pid, job.id):
                if job.cancel_requested and job.id not in self.term_sent:
                    self._term(job.id, job.pid)
                alive += 1
                continue  # still checkpointing (or running on without PDEATHSIG): never start it twice
            self._finished(job.id, None)
        return alive

    def _cancel_requested(self) -> None:
        for job_id, (proc, _slot) in self.procs.items():
            sent = self.term_sent.get(job_id)
            if sent is None:
                job = self.store.get(job_id)
                if job is not None and job.cancel_requested:
                    self._term(job_id, proc.pid)
            elif time.time() - sent > CANCEL_GRACE_S and proc.poll() is None:
                proc.kill()

    def _term(self, job_id: str, pid: int | None) -> None:
        self.term_sent[job_id] = time.time()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)  # graceful: the run checkpoints, marks itself interrupted, exits
            except OSError:
                pass

    def _start_queued(self) -> None:
        free = [i for i in range(self.concurrency) if i not in {s for _, s in self.procs.values()}]
        if not free:
            return
        for job in self.store.next_queued(set(self.procs)):
            if not free:
                return
            if job.needs_credentials and job.id not in self.credentials:
                self.store.set(job.id, (QUEUED,), status=NEEDS_CREDENTIALS,
                               reason=f"credentials missing: POST /v1/jobs/{job.id}/credentials")
                continue
            slot = free.pop(0)
            if not self.store.set(job.id, (QUEUED,), status=RUNNING, started_at=time.time(), attempts=job.attempts + 1):
                free.insert(0, slot)
                continue  # claimed elsewhere (or cancelled) in the meantime
            try:
                proc = self._spawn(job, slot)
            except OSError as exc:
                self.store.set(job.id, status=FAILED, reason=f"could not start the job: {exc}", ended_at=time.time())
                free.insert(0, slot)
                continue
            self.procs[job.id] = (proc, slot)
            self.store.set(job.id, pid=proc.pid)

    def _spawn(self, job: Job, slot: int) -> subprocess.Popen:
        folder = job_dir(self.store, job.id)
        folder.mkdir(parents=True, exist_ok=True)
        cfg_path = folder / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(config_of(job), sort_keys=False))
        cmd = [sys.executable, "-m", "tuneforge", "train", str(cfg_path)]
        gpus = self.slots[slot].split(",") if self.slots[slot] else []
        if len(gpus) > 1:
            cmd += ["--nproc", str(len(gpus))]  # multi-GPU through the training engine's own launcher
        if job.resume:
            cmd.append("--resume")
        elif Path(job.run_dir).exists():
            cmd += ["--set", "output.overwrite=true"]  # a restart from scratch of this job's own run
        env = {k: v for k, v in os.environ.items() if k not in BLOCKED_ENV}
        env.update(self.credentials.get(job.id, {}))
        env.update({"TUNEFORGE_JOB_ID": job.id, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "120"})
        if (config_of(job).get("tracking") or {}).get("wandb") and not env.get("WANDB_API_KEY"):
            env.setdefault("WANDB_MODE", "offline")  # no key sent: W&B logs into the run, syncable later
        if self.slots[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.slots[slot]
        workspace = self.store.data_dir / "users" / job.user
        workspace.mkdir(parents=True, exist_ok=True)
        with open(log_path(self.store, job.id), "ab") as log:
            log.write(f"--- attempt {job.attempts + 1}: {' '.join(cmd[2:])}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent if os.name == "posix" else None)
        self.log(f"job {job.id} started (pid {proc.pid}{', resume' if job.resume else ''})")
        return proc

    # ---- outcomes ------------------------------------------------------------------------------------
    def _finished(self, job_id: str, rc: int | None) -> None:
        """Decide a job's state after its child exited (rc None: a child of a dead server, code unknown)."""
        job = self.store.get(job_id)
        if job is None or job.status != RUNNING:
            return
        info = read_run_info(job.run_dir)
        step = info.get("step")
        now = time.time()
        if info.get("status") == "finished" and rc in (0, None):
            self.store.set(job_id, (RUNNING,), status=FINISHED, reason=None, ended_at=now, exit_code=rc, pid=None)
            self.credentials.pop(job_id, None)
        elif job.cancel_requested:
            where = f"checkpoint at step {step}" if has_checkpoint(job.run_dir) else "no checkpoint"
            self.store.set(job_id, (RUNNING,), status=CANCELLED, reason=f"cancelled by the user ({where})",
                           ended_at=now, exit_code=rc, pid=None)
            self.credentials.pop(job_id, None)
        elif rc is None or rc == 130 or rc < 0:
            self._requeue(job, info, "the server restarted" if rc is None else f"the job was stopped (exit {rc})")
        else:
            reason = info.get("error") if info.get("status") == "failed" else None
            reason = reason or last_error_line(log_path(self.store, job_id)) or f"tuneforge train exited with code {rc}"
            self.store.set(job_id, (RUNNING,), status=FAILED, reason=reason, ended_at=now, exit_code=rc, pid=None)
            self.credentials.pop(job_id, None)

    def _requeue(self, job: Job, info: dict, why: str) -> None:
        if job.attempts >= MAX_ATTEMPTS:
            self.store.set(job.id, (RUNNING,), status=FAILED, ended_at=time.time(), pid=None,
                           reason=f"{why}; gave up after {job.attempts} attempts")
            return
        resume = has_checkpoint(job.run_dir)
        how = f"resumes from its checkpoint (step {info.get('step')})" if resume else "restarts (no checkpoint yet)"
        self.store.set(job.id, (RUNNING,), status=QUEUED, resume=resume, pid=None, reason=f"{why}: {how}")
        self.log(f"job {job.id}: {why}: {how}")

    def stop(self, grace_s: float = 60.0) -> None:
        """Server shutdown: SIGTERM every child (they checkpoint), wait, requeue them for the next start."""
        for job_id, (proc, _slot) in self.procs.items():
            self._term(job_id, proc.pid)
        deadline = time.time() + grace_s
        for job_id, (proc, _slot) in list(self.procs.items()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._finished(job_id, proc.returncode if proc.returncode != 0 else 0)
        self.procs.clear()
