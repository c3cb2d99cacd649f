"""Start N training processes on this machine (`tuneforge train CONFIG --nproc N`), and the steps that must
happen once across processes (data preparation).

The launcher sets the rank variables torchrun would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)
and runs `python -m tuneforge train` in each process. On one machine that is all torchrun does; doing it
here keeps one-line user errors (exit 2) and stops the other ranks as soon as one fails. Multi-node runs use
`torchrun` / `accelerate launch` directly (docs/distributed.md): the processes see the same variables.
(`accelerate launch --num_processes 2 --cpu` silently starts ONE process, so it is not used here.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.errors import UserError

POLL_S = 0.5


def launched() -> bool:
    """True inside a process started by a launcher (ours, torchrun, accelerate launch, deepspeed)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(cfg, nproc: int) -> bool:
    # DeepSpeed needs the rank variables even for one process (ZeRO-3 offload on a single GPU).
    return not launched() and (nproc > 1 or bool(cfg.train.deepspeed) or cfg.train.fsdp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # N processes share the cores: without this each would start one thread per core and they would thrash.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch(nproc: int, args: list[str], log=print) -> int:
    """Run `python -m tuneforge <args>` in `nproc` processes; returns the first failing exit code (or 0)."""
    port = free_port()
    log(f"starting {nproc} training process{'es' if nproc > 1 else ''} (rendezvous 127.0.0.1:{port})")
    procs = [subprocess.Popen([sys.executable, "-m", "tuneforge", *args], env=rank_env(r, nproc, port)) for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)  # a dead rank leaves the others blocked in a collective: end them now
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _stop(procs)  # the children got the Ctrl-C too; make sure none is left behind
        raise


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def train_args(config: Path, overrides: list[str] | None, resume: bool) -> list[str]:
    """The `tuneforge train` command line each process runs (the same config and overrides, no --nproc)."""
    args = ["train", str(config)]
    for o in overrides or []:
        args += ["--set", o]
    return args + (["--resume"] if resume else [])


def prepare_once(accel, data_cfg, tokenizer, log=print):
    """Prepare the data on the main process; the others wait for its cache on disk, not in a collective
    (tokenizing a large dataset can take longer than any collective timeout), then load it.

    Multi-node: data.cache_dir must be on a filesystem every node sees, or run `tuneforge prepare` on each
    node first (then every rank finds the cache at once)."""
    from tuneforge.data.prepare import cache_path, data_fingerprint, prepare

    if accel.is_main_process:
        return prepare(data_cfg, tokenizer)
    done = cache_path(data_cfg, data_fingerprint(data_cfg, tokenizer)) / "report.json"  # written last, atomically
    waited = 0.0
    while not done.is_file():
        if waited and waited % 60 == 0:
            log(f"rank {accel.process_index}: waiting for the main process to prepare the data ({done.parent})")
        time.sleep(POLL_S)
        waited += POLL_S
    return prepare(data_cfg, tokenizer)


def check_launchable(nproc: int) -> None:
    if nproc > 1 and launched():
        raise UserError(f"--nproc {nproc}: this process was already started by a launcher "
                        f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')}); drop --nproc or start it without torchrun")
