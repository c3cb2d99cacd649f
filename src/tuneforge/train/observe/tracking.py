"""Metrics: JSONL (the source of truth), TensorBoard, opt-in W&B / MLflow, a loss PNG, a live progress bar.

metrics.jsonl is strict JSON (a non-finite number is written as null with the key listed under
"nonfinite"), appended line by line, and cut back on resume by writing a new file and renaming it,
so a kill at any instant leaves either the old or the new history, never an empty one. A torn last
line (a kill mid-append) is ignored when reading.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge.rundir import METRICS, RunDir


def strict(values: dict) -> dict:
    """Replace NaN/inf by null (JSON has no NaN) and say which keys were non-finite."""
    out, bad = {}, []
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            bad.append(k)
        else:
            out[k] = v
    if bad:
        out["nonfinite"] = {k: repr(values[k]) for k in bad}
    return out


def dumps(obj) -> str:
    return json.dumps(obj, allow_nan=False, default=str)


def fsync_write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically and durably: tmp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Tracker:
    """Everything a run logs goes through here (rank 0 only: pass enabled=False on other ranks)."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True, tracking=None, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.enabled, self.use_tb = enabled, tensorboard
        self.tb = None
        self.purge_step: int | None = None
        self.tracking, self.config = tracking, config
        self.wandb = self.mlflow = None
        self._started = False

    def truncate_after(self, step: int) -> None:
        """On resume, keep only lines up to the checkpoint's step, so the curve has no duplicate steps."""
        self.purge_step = step + 1  # TensorBoard drops events at or after this step from earlier attempts
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.run_dir) if r["step"] <= step]
        fsync_write(self.path, "".join(dumps(r) + "\n" for r in keep))

    def _start(self) -> None:
        """Open the sinks on first use (after truncate_after, so TensorBoard knows where a resume starts)."""
        self._started = True
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(RunDir(self.run_dir).tensorboard), purge_step=self.purge_step)
        if self.tracking is not None and getattr(self.tracking, "wandb", None):
            self.wandb = _start_wandb(self.tracking.wandb, self.run_dir, self.config or {})
        if self.tracking is not None and getattr(self.tracking, "mlflow", None):
            self.mlflow = _start_mlflow(self.tracking.mlflow, self.run_dir, self.config or {})

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        if not self._started:
            self._start()
        row = strict({"step": step, **values})
        with self.path.open("a") as fh:
            fh.write(dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in numbers.items()}, step=step)

    def close(self, status: str = "finished") -> None:
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if status == "finished" else 1)
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow.end_run({"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
            self.mlflow = None


def _tracking_ids(run_dir: Path) -> dict:
    path = RunDir(run_dir).tracking_ids
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_tracking_id(run_dir: Path, key: str, value: str) -> None:
    ids = {**_tracking_ids(run_dir), key: value}
    fsync_write(RunDir(run_dir).tracking_ids, json.dumps(ids))


def _start_wandb(cfg, run_dir: Path, config: dict):
    try:
        import wandb
    except ImportError:
        from tuneforge.errors import UserError

        raise UserError("tracking.wandb: the wandb package is not installed (pip install 'tuneforge[tracking]')") from None
    # One W&B run per run directory: a resumed run continues it instead of starting a second one.
    run_id = _tracking_ids(run_dir).get("wandb") or uuid.uuid4().hex[:12]
    _save_tracking_id(run_dir, "wandb", run_id)
    kwargs = dict(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, resume="allow", dir=str(run_dir),
                  config=config)
    try:
        return wandb.init(id=run_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the tracker's own error type differs by wandb version
        if "in use" not in str(exc):
            raise
    # A killed run's W&B process can still hold its id; the resumed run goes on under a new id, linked by name,
    # rather than losing the training run over its tracker.
    new_id = f"{run_id[:8]}-{uuid.uuid4().hex[:4]}"
    _save_tracking_id(run_dir, "wandb", new_id)
    print(f"warning: W&B run {run_id} is still held by a killed process; continuing as {new_id}", flush=True)
    return wandb.init(id=new_id, **kwargs)


def _start_mlflow(cfg, run_dir: Path, config: dict):
    try:
        import mlflow
    except ImportError:
        from tuneforge.errors import UserError

        raise UserError("tracking.mlflow: the mlflow package is not installed (pip install 'tuneforge[tracking]')") from None
    if cfg.uri.startswith("file:"):
        # mlflow 3 refuses its file store unless told; a local folder is what a file: uri asks for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_experiment(cfg.experiment)
    run_id = _tracking_ids(run_dir).get("mlflow")
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
    if run_id is None:
        _save_tracking_id(run_dir, "mlflow", run.info.run_id)
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})
    return mlflow


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """All complete rows of metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process (GPU), or its peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def plot_loss(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.legend()
    ax.grid(alpha=0.3)
    out = RunDir(run_dir).loss_png
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def progress_bar(total: int, start: int) -> Progress:
    """Loss, lr, tokens/s and ETA on a terminal (disabled when stderr is not a TTY; the recipe logs lines then)."""
    bar = Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
    )
    bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
    return bar
