"""Run queued jobs as child processes (`tuneforge train JOB_CONFIG`), at most `concurrency` at once.

The database is the queue: a job is claimed with a compare-and-set on its status, so a job never runs twice.
Children get SIGTERM when the server dies (Linux PR_SET_PDEATHSIG): they checkpoint and stop, and the next
server start resumes them with `--resume` (or restarts them when no checkpoint exists; after MAX_ATTEMPTS
the job ends `failed` with the reason). A child that outlives its server (no PDEATHSIG) is watched until it
exits, never started a second time. Credentials are passed in the child's environment only.

A job is a guest: the child's environment is an allowlist (never the server's environment minus a blocklist),
HOME and TMPDIR are the user's workspace, the child re-checks its paths itself (TUNEFORGE_JOB=1: no `.env`,
no expansion), `serve --sandbox` runs it under bubblewrap, and a user past the disk quota has their runs
stopped (checkpointed) with the reason.
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

from tuneforge.rundir import RunDir
from tuneforge.serve.paths import GuestPolicy, wandb_url
from tuneforge.serve.store import (
    CANCELLED, FAILED, FINISHED, NEEDS_CREDENTIALS, QUEUED, RUNNING, Job, Store, config_of,
)

MAX_ATTEMPTS = 3
CANCEL_GRACE_S = 120.0  # a cancelled child has this long to checkpoint before SIGKILL
QUOTA_EVERY_S = 2.0  # how often a running user's disk use is measured (a walk of their folders: cheap)
# The only server variables a job sees: how to run programs, the language, GPUs, hub caches and thread counts.
# Anything else (tokens, cloud keys, TUNEFORGE_ALLOW_CODE, proxies) stays with the server.
ENV_ALLOW = ("PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "CUDA_HOME", "CUDA_PATH",
             "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_EXTENSIONS_DIR",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
             "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY",
             "TUNEFORGE_FAULT", "TUNEFORGE_SKIP_PLAN", "TUNEFORGE_PEAK_TFLOPS")
ENV_ALLOW_PREFIXES = ("LC_", "NCCL_")


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
        return json.loads(RunDir(run_dir).info_path.read_text())
    except (OSError, ValueError):
        return {}


def has_checkpoint(run_dir: str | Path) -> bool:
    ckpts = RunDir(run_dir).checkpoints
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
        self.guest = GuestPolicy()  # set by `serve` options: trackers, sandbox, disk quota
        self.over_quota: dict[str, str] = {}  # job id -> why it was stopped
        self.quota_checked = 0.0

    # ---- the loop body -------------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.recovered:
            self.recover()
        self._reap()
        orphans = self._watch_orphans()
        self._cancel_requested()
        self._enforce_quota()
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
                os.kill(job_process(pid), signal.SIGTERM)  # graceful: the run checkpoints, marks itself interrupted, exits
            except OSError:
                pass

    # ---- disk quota ----------------------------------------------------------------------------------
    def _enforce_quota(self) -> None:
        """A user past the quota (workspace + data cache, checkpoints included): their running jobs checkpoint and stop."""
        quota = self.guest.disk_quota
        if not quota or not self.procs or time.time() - self.quota_checked < QUOTA_EVERY_S:
            return
        self.quota_checked = time.time()
        jobs = [j for j in (self.store.get(i) for i in self.procs) if j is not None and j.id not in self.over_quota]
        for user in {j.user for j in jobs}:
            over = self._quota_exceeded(user)
            if not over:
                continue
            for job in (j for j in jobs if j.user == user):
                self.over_quota[job.id] = f"{over} (serve --disk-quota; checkpoints count): the run was stopped"
                self.log(f"job {job.id}: {self.over_quota[job.id]}")
                self._term(job.id, self.procs[job.id][0].pid)

    def _quota_exceeded(self, user: str) -> str | None:
        """'disk quota exceeded: USER uses X of Y' when the user is past the disk quota, else None."""
        quota = self.guest.disk_quota
        used = user_disk_use(self.store.data_dir, user) if quota else 0
        return f"disk quota exceeded: {user!r} uses {_gib(used)} of {_gib(quota)}" if quota and used > quota else None

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
            full = self._quota_exceeded(job.user)
            if full:
                self.store.set(job.id, (QUEUED,), status=FAILED, reason=f"{full} (serve --disk-quota): free space, then submit again",
                               ended_at=time.time())
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
        workspace = self.store.data_dir / "users" / job.user
        rooms = self.guest.rooms(self.store.data_dir, job.user)
        for folder_ in (workspace / ".tmp", *rooms.writable):
            folder_.mkdir(parents=True, exist_ok=True)
        env = job_env(workspace, folder, self.credentials.get(job.id, {}), rooms)
        env["TUNEFORGE_JOB_ID"] = job.id
        tracking = config_of(job).get("tracking") or {}
        if tracking.get("wandb") and not env.get("WANDB_API_KEY"):
            env["WANDB_MODE"] = "offline"  # no key sent: W&B logs into the run, syncable later
        elif tracking.get("wandb"):
            env["WANDB_BASE_URL"] = wandb_url()  # the one the server checked against --allow-tracker
        if self.slots[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.slots[slot]
        if self.guest.sandbox:
            cmd = sandbox_command(cmd, rooms, folder, self.store.data_dir, share_net=bool(self.guest.trackers))
        with open(log_path(self.store, job.id), "ab") as log:
            log.write(f"--- attempt {job.attempts + 1}: {' '.join(cmd[cmd.index('-m') + 1:])}\n".encode())
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
        elif job_id in self.over_quota:
            where = f"its checkpoint at step {step} is kept" if has_checkpoint(job.run_dir) else "no checkpoint was written"
            self.store.set(job_id, (RUNNING,), status=FAILED, reason=f"{self.over_quota.pop(job_id)} ({where})",
                           ended_at=now, exit_code=rc, pid=None)
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


# ---- the guest's environment, sandbox and disk -----------------------------------------------------------
def job_env(workspace: Path, job_folder: Path, credentials: dict[str, str], rooms) -> dict[str, str]:
    """The child's whole environment: the allowlist, the job's own credentials, the workspace as its home, and
    its rooms (config/confine.py Rooms: the child checks its own paths against them)."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES)}
    env.update(credentials)
    env.update({
        "HOME": str(workspace), "TMPDIR": str(workspace / ".tmp"),  # no files shared with other users' jobs
        # Downloads go to the user's own cache: a private model fetched with one user's token is no one else's.
        "HF_HUB_CACHE": str(rooms.writable[0] / "hub"),
        "HF_TOKEN_PATH": str(job_folder / "no-hf-token"),  # never the operator's `huggingface-cli login` token
        "TUNEFORGE_JOB": "1", "TUNEFORGE_JOB_ROOMS": rooms.to_json(),
        "PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "120",
    })
    return env


def _python_roots() -> list[Path]:
    """What the child's interpreter and tuneforge need to run: read-only inside the sandbox."""
    import tuneforge

    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(os.path.realpath(sys.executable)).parent.parent,
             Path(tuneforge.__file__).resolve().parent.parent}
    # Installed packages only: a bare sys.path entry may be the server's working directory (the operator's home).
    roots |= {Path(p) for p in sys.path if p and os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p)}
    return sorted(r for r in roots if r.exists() and str(r) != "/")


SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/sys")
ETC_FILES = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "ssl", "ca-certificates", "localtime",
             "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "mime.types", "os-release", "fonts")


def sandbox_command(cmd: list[str], rooms, job_folder: Path, data_dir: Path, share_net: bool) -> list[str]:
    """`cmd` under bubblewrap: own namespaces (no network unless trackers are allowed), the system and Python
    read-only, the model cache read-only, the job's config folder read-only, its workspace and data cache
    read-write, and nothing else of the server: no data folder, no jobs.db, no other user, no home."""
    args = ["bwrap", "--die-with-parent", "--unshare-all", *(["--share-net"] if share_net else []),
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for d in SYSTEM_DIRS:
        args += ["--ro-bind-try", d, d]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for dev in sorted(Path("/dev").glob("nvidia*")) + [Path("/dev/dri")]:
        args += ["--dev-bind-try", str(dev), str(dev)]
    for root in _python_roots():
        if root == data_dir or root in data_dir.parents:
            continue  # e.g. the server's working directory on sys.path: it would show DATA whole
        args += ["--ro-bind", str(root), str(root)]
    args += ["--ro-bind-try", str(rooms.read_only[0]), str(rooms.read_only[0])] if rooms.read_only else []
    args += ["--ro-bind", str(job_folder), str(job_folder)]
    for rw in (rooms.workspace, *rooms.writable):
        args += ["--bind", str(rw), str(rw)]
    return [*args, "--chdir", str(rooms.workspace), *cmd]


def sandbox_problem() -> str | None:
    """Why `serve --sandbox` cannot work here (None: it can)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "--sandbox needs bubblewrap, which is not installed (apt install bubblewrap), or run without --sandbox"
    try:
        out = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-all", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"--sandbox: bubblewrap does not start here ({exc})"
    if out.returncode != 0:
        return f"--sandbox: bubblewrap cannot create namespaces here ({(out.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


def job_process(pid: int) -> int:
    """The process to signal for a job: the child itself, or under bubblewrap the job inside it (bwrap does not
    pass SIGTERM on; killing bwrap would SIGKILL the job before it checkpoints)."""
    try:
        if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"bwrap"):
            return pid
    except OSError:
        return pid
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                children.setdefault(int((p / "stat").read_text().rsplit(") ", 1)[1].split()[1]), []).append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    todo = [pid]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            try:
                if not Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"bwrap"):
                    return child
            except OSError:
                continue
            todo.append(child)
    return pid


def user_disk_use(data_dir: Path, user: str) -> int:
    """Bytes on disk of a user's workspace and data cache (each inode once; links not followed)."""
    seen, total = set(), 0
    for root in (data_dir / "users" / user, data_dir / "cache" / user):
        for folder, _dirs, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"
