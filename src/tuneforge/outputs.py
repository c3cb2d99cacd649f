"""One rule for every command that writes a directory (train, prepare, merge, quantize, export, predict).

A command may write into a directory that is missing or empty, or that holds an artifact of its own
kind (then only with overwrite). It never removes the working directory, one of its parents, the home
directory, a filesystem root, the folder holding the config, or a folder tuneforge did not create.
Every directory tuneforge creates holds a marker file naming what it is, so "ours" is a fact on disk,
not a guess from file names.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.rundir import CHECKPOINTS, FINAL, RUN_INFO

MARKER = ".tuneforge.json"
# Files that identify artifacts written before markers existed (kept so old run dirs still count as ours).
LEGACY_MARKERS = {"run": RUN_INFO, "merged": "merge_report.json"}
# A run folder without these never trained (only `prepare`, or a run that failed in its checks, wrote
# there): it is a run to be, not a run to protect, and needs no overwrite.
RUN_PRODUCTS = (RUN_INFO, CHECKPOINTS, FINAL)


def artifact_kind(path: Path) -> str | None:
    """The kind of tuneforge artifact at `path` ('run', 'merged', 'gguf', ...), or None if it is not ours."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("kind"))
        except (OSError, ValueError):
            return None
    for kind, name in LEGACY_MARKERS.items():
        if (path / name).is_file():
            return kind
    return None


def protected_dirs(config_path: Path | None = None) -> set[Path]:
    """Directories no command may ever remove or take over: cwd and its parents, home, roots, the config's folder."""
    cwd = Path.cwd().resolve()
    out = {cwd, *cwd.parents, Path.home().resolve(), Path(cwd.anchor)}
    if config_path is not None:
        out.add(Path(config_path).resolve().parent)
    return out


def check_output_dir(path: str | Path, kind: str, overwrite: bool, flag: str, config_path: Path | None = None,
                     allow_existing_kind: bool = False) -> Path:
    """Validate where a command will write, before any heavy work. Returns the path.

    `flag` names the option a user sets to overwrite (e.g. 'output.overwrite=true' or '--overwrite');
    `allow_existing_kind` lets a command reuse its own artifact without overwrite (e.g. `prepare` into a run dir).
    """
    if str(path).strip() == "":
        raise UserError(f"empty output directory for {kind}: give a folder name, e.g. runs/my-run")
    p = Path(path)
    resolved = p.resolve()
    if resolved in protected_dirs(config_path):
        raise UserError(f"{p}: refusing to write a {kind} into the working directory, one of its parents, home or the "
                        "config's folder (pick a new sub-folder, e.g. runs/my-run)")
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: exists and is not a directory (pick another output path)")
    if not p.exists() or not [c for c in p.iterdir() if c.name != MARKER]:
        return p  # missing, empty, or only our marker (a command that failed before writing anything)
    found = artifact_kind(p)
    if found is None:
        raise UserError(f"{p}: folder is not empty and was not written by tuneforge; refusing to write a {kind} into it "
                        "(pick a new or empty folder)")
    if found != kind:
        raise UserError(f"{p}: holds a tuneforge {found}, not a {kind}; refusing to replace it (pick another output folder)")
    if not overwrite and not allow_existing_kind and not (kind == "run" and _never_trained(p)):
        raise UserError(f"{p}: already holds a {kind} (set {flag} to replace it, or pick another folder)")
    return p


def _never_trained(p: Path) -> bool:
    return not any((p / name).exists() for name in RUN_PRODUCTS)


def check_prepare_dir(path: str | Path, config_path: Path | None = None, overwrite: bool = False) -> Path:
    """`prepare` writes its data report into the run folder: a new, empty or prepared one, or an
    unfinished run; never a finished run (its report would no longer describe its model) unless overwriting."""
    p = check_output_dir(path, "run", False, "output.overwrite=true", config_path, allow_existing_kind=True)
    info = p / LEGACY_MARKERS["run"]
    if info.is_file() and not overwrite:
        try:
            status = json.loads(info.read_text()).get("status")
        except (OSError, ValueError):
            status = "unreadable"
        if status == "finished":
            raise UserError(f"{p}: holds a finished run; prepare would replace its data report (choose another output.dir, "
                            "or set output.overwrite=true to retrain there)")
    return p


def clear_output_dir(path: Path, kind: str, config_path: Path | None = None) -> None:
    """Remove an existing artifact of `kind` at `path` after re-checking it is ours (never anything else)."""
    p = Path(path)
    if not p.exists():
        return
    if p.resolve() in protected_dirs(config_path) or artifact_kind(p) != kind:
        raise UserError(f"{p}: not a tuneforge {kind}; refusing to remove it")
    shutil.rmtree(p)


def mark_output_dir(path: Path, kind: str, **about) -> None:
    """Create `path` (if needed) and record what it is, so later commands recognise it as ours."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    marker = p / MARKER
    if not marker.is_file():
        tmp = marker.with_name(MARKER + ".tmp")
        tmp.write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), **about}))
        tmp.replace(marker)
