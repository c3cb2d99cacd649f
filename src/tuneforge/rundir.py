"""A run directory describes itself: resolved config, versions, data fingerprint, metrics, artifacts.

`RunDir` owns every path inside a run directory and the run's status:

    running -> finished | failed (with the one-line error) | interrupted (with the reason)

`merge`, `generate` and `chat` need only the directory. No other module builds a path inside a run dir.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import UserError

# The file names of a run directory: only this module knows them (everything else asks RunDir).
RUN_INFO = "run_info.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
DATA_REPORT = "data_report.json"
REPORT = "report.html"
FINAL = "final"
CHECKPOINTS = "checkpoints"
TRAINER_META = "trainer.json"  # inside a checkpoint folder, written last: its presence means the checkpoint is complete
STATUSES = ("running", "finished", "failed", "interrupted")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tuneforge", "torch", "transformers", "peft", "accelerate", "tokenizers", "bitsandbytes", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: readers never see a half-written file


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        raise UserError(f"{run_dir}: not a tuneforge run directory (no {RUN_INFO}); pass the output.dir of a `tuneforge train` run")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # a file cut short by a full disk or edited by hand
        raise UserError(f"{path}: not valid JSON ({exc}); restore it from the run's last checkpoint folder or retrain") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: holds {type(info).__name__}, not a JSON object; restore it or retrain")
    return info


def update_run_info(run_dir: Path, **fields) -> dict:
    path = Path(run_dir) / RUN_INFO
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(path, info)
    return info


def saved_data_config(run_dir: Path):
    """The data section of a run's saved config.yaml (to rebuild the same split), or None when there is none."""
    from tuneforge.config.schema import DataConfig

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    return DataConfig(**(yaml.safe_load(path.read_text()) or {})["data"])


def write_config(run_dir: Path, cfg) -> None:
    # Secrets never live in the config (they come from env/.env), so the dump is safe to keep.
    (Path(run_dir) / CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def one_line(exc: BaseException) -> str:
    """The error as one line: the user message when it is a user error, else `Type: first line`."""
    from tuneforge.errors import user_message

    msg = user_message(exc)
    if msg is None:
        first = (str(exc).strip().splitlines() or [""])[0]
        msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg[:500]


def fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself, so a rename after it publishes complete data."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    """Every path of one run directory, and its status transitions. Only the main process writes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- paths ---------------------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.root / RUN_INFO

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def data_report(self) -> Path:
        return self.root / DATA_REPORT

    @property
    def parity_samples(self) -> Path:
        return self.root / "parity_samples.json"

    @property
    def samples(self) -> Path:
        """Completions generated while training (grpo): prompt, completion, rewards per line; the report shows the last."""
        return self.root / "samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def best(self) -> Path:
        """The copy of the best checkpoint (train.keep_best)."""
        return self.root / "best"

    @property
    def tracking_ids(self) -> Path:
        """W&B / MLflow run ids, so a resumed run continues the same tracked run."""
        return self.root / "tracking.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    def generate_eval(self, tag: str) -> Path:
        return self.root / f"generate_eval_{tag}.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def checkpoint_tmp(self, step: int) -> Path:
        return self.checkpoints / f".step-{step:07d}.tmp"

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints whose save finished (trainer.json is written last, then the folder renamed)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / TRAINER_META).is_file())

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    # ---- info and status -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.info_path.is_file()

    def info(self) -> dict:
        return read_run_info(self.root)

    @property
    def status(self) -> str | None:
        return self.info().get("status") if self.exists() else None

    def update(self, **fields) -> dict:
        return update_run_info(self.root, **fields)

    def start(self, **fields) -> dict:
        return self.update(status="running", error=None, started=time.strftime("%Y-%m-%dT%H:%M:%S"), **fields)

    def finish(self, **fields) -> dict:
        return self.update(status="finished", error=None, **fields)

    def fail(self, exc: BaseException | str) -> dict:
        return self.update(status="failed", error=exc if isinstance(exc, str) else one_line(exc))

    def interrupt(self, reason: str = "interrupted") -> dict:
        return self.update(status="interrupted", error=reason)

    # ---- files ---------------------------------------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> None:
        write_json(path, obj)

    def write_config(self, cfg) -> None:
        write_config(self.root, cfg)

    def check_new(self, cfg) -> None:
        """Before a fresh (not --resume) run: refuse a directory holding another run or anything not ours."""
        from tuneforge.outputs import check_output_dir

        if self.exists() and not cfg.output.overwrite:
            status = self.status
            fix = "add --resume to continue it" if status != "finished" else "choose another output.dir"
            raise UserError(f"{self.root} already holds a {status} run: {fix}, or --set output.overwrite=true")
        # Only ever replace a directory that is a tuneforge run (never '.', a parent, or a user's folder).
        check_output_dir(self.root, "run", cfg.output.overwrite, "output.overwrite=true", cfg.config_path)
