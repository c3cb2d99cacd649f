"""What one user of a shared server may ask for: quotas checked at submit, before anything is stored or run.

Defaults protect a small server; `tuneforge serve` options change them. Each refusal is one line that names
the field (422) or the quota (429). Paths shown back to a user are made relative to their workspace.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.serve.paths import DEFAULT_DISK_QUOTA
from tuneforge.serve.schema import refuse

MAX_JSON_DEPTH = 32  # a real config nests about 6 deep; 400+ crashed the worker's YAML/JSON writers
PAGE_MAX = 200
LINE_FILES = (".jsonl", ".json", ".csv", ".tsv", ".txt")  # row count = line count (an upper bound for .json)


@dataclass
class Limits:
    max_jobs: int = 20  # unfinished jobs (queued, waiting for credentials, running) per user
    max_checkpoints: int = 200  # checkpoints one job may write over its whole run
    max_num_proc: int = field(default_factory=lambda: os.cpu_count() or 1)
    page_size: int = 50  # GET /v1/jobs without ?limit=
    disk_quota: int | None = DEFAULT_DISK_QUOTA  # bytes per user (enforced by the worker); None: no quota


def check_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """413 when a request nests deeper than `limit` (iterative: a deep body cannot overflow this check)."""
    stack = [(obj, 1, ())]
    while stack:
        node, depth, where = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            if not isinstance(child, (dict, list)):
                continue
            if depth + 1 > limit:
                loc = ".".join(str(k) for k in (*where, key)[:4]) + (".…" if len(where) >= 4 else "")
                raise refuse(413, loc, f"nested deeper than {limit} levels: a job config is a few levels deep (flatten it)")
            stack.append((child, depth + 1, (*where, key)))


def check_job(cfg: dict[str, Any], limits: Limits, data_dir: Path) -> None:
    """Quotas on a confined, validated job config (absolute paths under `data_dir`); 422 naming the field."""
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    num_proc = data.get("num_proc") or 1
    if num_proc > limits.max_num_proc:
        raise refuse(422, "config.data.num_proc", f"{num_proc} worker processes: this server allows at most "
                     f"{limits.max_num_proc} (its cores): lower data.num_proc")
    _check_checkpoints(train, data, limits.max_checkpoints)
    _check_path_lengths(cfg, data_dir)


def _check_checkpoints(train: dict, data: dict, limit: int) -> None:
    """Checkpoints a job writes over its run: save_every over its steps, or saves_per_epoch over its epochs."""
    every, per_epoch, steps = train.get("save_every"), train.get("saves_per_epoch"), train.get("max_steps")
    if every:
        if steps:
            how = f"train.max_steps {steps} / train.save_every {every}"
        else:
            rows = _row_bound(data)
            if rows is None:
                raise refuse(422, "config.train.save_every", "train.save_every with train.epochs and a dataset the server "
                             f"cannot count: set train.max_steps too, so the job writes at most {limit} checkpoints")
            steps = math.ceil((train.get("epochs") or 1.0) * rows / _rows_per_step(train))
            how = f"up to {steps} steps ({rows} rows x train.epochs) / train.save_every {every}"
        fix = f"raise save_every to {math.ceil(steps / limit)} or more"
        _over(steps // every, limit, "config.train.save_every", how, fix)
    elif per_epoch:
        epochs = math.ceil(train.get("epochs") or 1.0)
        rows = _row_bound(data) if steps else None
        if steps and rows:  # max_steps decides how many epochs run
            epochs = math.ceil(steps / max(1, math.ceil(rows / _rows_per_step(train))))
        count = min(steps, per_epoch * epochs) if steps else per_epoch * epochs
        how = f"train.saves_per_epoch {per_epoch} x {epochs} epochs" + (f", at most one a step of {steps}" if steps else "")
        _over(count, limit, "config.train.saves_per_epoch", how, "lower saves_per_epoch, or use train.save_every")


def _over(count: int, limit: int, loc: str, how: str, fix: str) -> None:
    if count > limit:
        raise refuse(422, loc, f"{how} = {count} checkpoints: this server allows at most {limit} per job ({fix})")


def _rows_per_step(train: dict) -> int:
    return (1 if train.get("micro_batch_tokens") else train.get("micro_batch_size") or 4) * (train.get("grad_accum") or 1)


def _row_bound(data: dict) -> int | None:
    """An upper bound on the training rows, from line counts of local files; None when one cannot be counted."""
    total = 0
    for spec in data.get("train") or []:
        path = Path(spec.get("path") or "")
        if spec.get("samples"):
            total += spec["samples"]
            continue
        if not spec.get("path") or not path.is_file() or not path.name.lower().endswith(LINE_FILES):
            return None
        total += math.ceil(_lines(path) * (spec.get("weight") or 1.0))
    return total


def _lines(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            count, last = count + block.count(b"\n"), block[-1:]
    return count + (last != b"\n")  # a last line without its newline counts too


def _check_path_lengths(cfg: dict[str, Any], data_dir: Path) -> None:
    """Paths the server made (inside DATA) must fit the file system: else the job and its pages fail later."""
    root = str(data_dir)
    name_max, path_max = os.pathconf(root, "PC_NAME_MAX"), os.pathconf(root, "PC_PATH_MAX")
    for loc, value in _strings(cfg, ("config",)):
        start = value.find(root)
        if start < 0:
            continue
        path = value[start:]
        longest = max(len(part.encode()) for part in path.split("/"))
        if len(path.encode()) >= path_max or longest > name_max:
            raise refuse(422, loc, f"the path is longer than the file system allows ({name_max} bytes a name, "
                         f"{path_max} in all): shorten it")


def _strings(node: Any, where: tuple):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, (*where, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, (*where, i))
    elif isinstance(node, str):
        yield ".".join(str(p) for p in where), node


def check_artifact_path(path: str) -> None:
    """An artifact path that no file system could hold is a 400, not an OSError (500)."""
    if len(path.encode()) > 1024 or any(len(part.encode()) > 255 for part in path.split("/")):
        raise refuse(400, "path", "longer than the file system allows (255 bytes a name): no such artifact")


# ---- what the server shows back --------------------------------------------------------------------
class Redactor:
    """Rewrites absolute server paths in text returned to `user`: their workspace becomes relative."""

    def __init__(self, data_dir: Path, user: str, job_id: str | None = None):
        data = str(data_dir)
        pairs = [(str(data_dir / "users" / user) + "/", ""), (str(data_dir / "users" / user), "."),
                 (str(data_dir / "cache" / user), "<cache>")]
        if job_id:
            pairs.append((str(data_dir / "jobs" / job_id), "<job>"))
        pairs.append((data, "<server>"))
        if sys.prefix not in ("/", "/usr", "/usr/local"):  # a venv's site-packages in tracebacks; never a system dir
            pairs.append((sys.prefix, "<python>"))
        self.pairs = pairs

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return text
        for old, new in self.pairs:
            text = text.replace(old, new)
        return text


# ---- parsing serve options -------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_SPAN = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$", re.I)


def parse_size(text: str, option: str = "--disk-quota") -> int:
    """'50G', '500M', '1.5T' or bytes -> bytes (powers of 1024)."""
    m = _SIZE.match(text or "")
    if not m:
        raise UserError(f"{option} {text!r}: give a size like 50G, 500M or 1T")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def parse_expires(text: str, now: float | None = None) -> float:
    """'30d', '12h', '2w', '90m' from now, or an ISO date/time (UTC when no zone) -> a Unix time in the future."""
    now = time.time() if now is None else now
    m = _SPAN.match(text or "")
    if m:
        at = now + int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    else:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise UserError(f"--expires {text!r}: give a duration like 30d, 12h, 2w or a date like 2027-01-31") from None
        at = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    if at <= now:
        raise UserError(f"--expires {text!r}: that is not in the future")
    return at
