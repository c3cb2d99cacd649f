"""RunPod serverless: the same request the job API takes, in the `runpod` SDK's handler shape.

    handler({"id": "...", "input": {"user_id", "model_id", "run_id", "credentials": {...}, "args": {...}}})

Runs `tuneforge train` as a child process (credentials only in its environment), reports progress through
`runpod.serverless.progress_update` when the SDK is installed, and returns the run's summary or `{"error": ...}`.
Runs live under $TUNEFORGE_DATA_DIR (default: /runpod-volume/tuneforge on a network volume, else ./tuneforge-data);
a retried request with the same run_id resumes from its last checkpoint.

Start a worker with: python -m tuneforge.serve.runpod   (needs `pip install 'tuneforge[runpod]'`)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from tuneforge.rundir import RunDir
from tuneforge.serve.limits import Limits, check_depth, check_job
from tuneforge.serve.paths import GuestPolicy, confine
from tuneforge.serve.schema import NAME, RequestError, parse_request, validate_config
from tuneforge.serve.worker import _die_with_parent, has_checkpoint, job_env, last_error_line, read_run_info


def data_dir() -> Path:
    if os.environ.get("TUNEFORGE_DATA_DIR"):
        return Path(os.environ["TUNEFORGE_DATA_DIR"])
    volume = Path("/runpod-volume")
    return volume / "tuneforge" if volume.is_dir() else Path("tuneforge-data")


def _progress(job: dict, update: dict) -> None:
    try:
        import runpod
    except ImportError:
        return
    runpod.serverless.progress_update(job, update)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    root = data_dir().resolve()
    inp = job.get("input") if isinstance(job, dict) else None
    user = str((inp or {}).get("user_id") or "runpod") if isinstance(inp, dict) else "runpod"
    if not re.match(NAME, user):  # it names the workspace folder: no '/', no '..'
        return {"error": f"input.user_id: {user[:80]!r}: use 1-64 letters, digits, '.', '_' or '-'"}
    try:
        check_depth(inp)
        spec = parse_request({"input": inp}, user)
        run_id = spec.run_id or str(job.get("id") or uuid.uuid4().hex[:12])
        cfg, run_dir = confine(spec.config, user, run_id, root)
        validate_config(cfg, "config")
        check_job(cfg, Limits(), root)  # the same per-job limits as `tuneforge serve` (checkpoints, num_proc, paths)
    except RequestError as exc:
        return {"error": f"{exc.errors[0]['loc']}: {exc.errors[0]['msg']}", "detail": exc.errors}
    folder = root / "jobs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "tuneforge", "train", str(cfg_path)]
    if has_checkpoint(run_dir) and read_run_info(run_dir).get("status") != "finished":
        cmd.append("--resume")  # RunPod retried this request: continue where the last attempt stopped
    # the same guest environment as a `tuneforge serve` job: an allowlist, the request's credentials, its rooms
    workspace, rooms = root / "users" / user, GuestPolicy().rooms(root, user)
    for room in (workspace / ".tmp", *rooms.writable):
        room.mkdir(parents=True, exist_ok=True)
    env = job_env(workspace, folder, spec.credentials, rooms)
    if (cfg.get("tracking") or {}).get("wandb") and not env.get("WANDB_API_KEY"):
        env.setdefault("WANDB_MODE", "offline")
    log = folder / "log.txt"
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent if os.name == "posix" else None)
        last = None
        while proc.poll() is None:
            time.sleep(2)
            info = read_run_info(run_dir)
            now = (info.get("step"), info.get("total_steps"))
            if now != last and now[1]:
                _progress(job, {"step": now[0], "total_steps": now[1]})
                last = now
    info = read_run_info(run_dir)
    not_mapped = [r for r in spec.report if r["status"] == "not mapped"]
    if proc.returncode != 0 or info.get("status") != "finished":
        reason = info.get("error") or last_error_line(log) or f"tuneforge train exited with code {proc.returncode}"
        return {"error": reason, "run_id": run_id, "run_dir": str(run_dir), "log": str(log)}
    final = Path(info.get("final_dir") or RunDir(run_dir).final)
    return {"status": "finished", "run_id": run_id, "model_id": spec.model_id, "run_dir": str(run_dir),
            "final_dir": str(final), "summary": info.get("summary"), "not_mapped": not_mapped,
            "artifacts": sorted(str(p.relative_to(run_dir)) for p in final.rglob("*") if p.is_file())}


if __name__ == "__main__":
    import runpod

    runpod.serverless.start({"handler": handler})


__all__ = ["handler", "data_dir"]
