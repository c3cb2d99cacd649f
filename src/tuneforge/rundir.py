"""A run directory describes itself: resolved config, versions, data fingerprint, metrics, artifacts.

`merge`, `generate` and `chat` need only the directory.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import UserError

RUN_INFO = "run_info.json"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tuneforge", "torch", "transformers", "peft", "accelerate", "tokenizers"):
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
    return json.loads(path.read_text())


def update_run_info(run_dir: Path, **fields) -> dict:
    path = Path(run_dir) / RUN_INFO
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(path, info)
    return info


def write_config(run_dir: Path, cfg) -> None:
    # Secrets never live in the config (they come from env/.env), so the dump is safe to keep.
    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
