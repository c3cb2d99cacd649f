"""Shared test helpers: run the CLI in a subprocess, write configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def run_cli(*args: str, cwd: Path | None = None, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tuneforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=stdin, env=full_env, timeout=600)


def write_config(path: Path, model: Path, train_file: Path, out: Path, **sections) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.1, "cache_dir": str(path.parent / "cache")},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr that mentions each needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_cli_inprocess(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The CLI through its real error boundary, in this process (fast: no interpreter start per case)."""
    import contextlib
    import io

    from tuneforge import cli
    from tuneforge.errors import run_cli as boundary

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = boundary(lambda: cli.app(args=[str(a) for a in args], prog_name="tuneforge", standalone_mode=False), cli.console)
            except Exception:  # an internal bug: the boundary re-raised it after its header
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        sys.stdin = old_stdin
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
