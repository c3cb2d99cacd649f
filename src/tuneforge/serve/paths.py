"""Keep every path of a job inside the server's data directory.

A user's relative paths are read from their workspace (DATA/users/USER); absolute paths, `..` and symlinks
that lead outside DATA are refused (400). The server, not the request, decides where runs and caches go.
A name that is not a file in the workspace stays as given: it is a hub id (org/name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from tuneforge.serve.schema import NAME, RequestError

# (dotted key, only when the value ends with one of these suffixes)
PATH_KEYS = [("model.path", None), ("model.tokenizer", None), ("model.chat_template", (".jinja", ".j2")),
             ("lora.init_from", None), ("train.deepspeed", (".json",))]


def _bad(loc: str, msg: str) -> RequestError:
    return RequestError(400, [{"loc": loc, "msg": msg}])


def check_relative(value: str, loc: str) -> PurePosixPath:
    if not isinstance(value, str) or not value.strip():
        raise _bad(loc, "expected a non-empty relative path")
    p = PurePosixPath(value.replace("\\", "/"))
    if value.startswith(("/", "~")) or p.is_absolute() or re.match(r"^[A-Za-z]:", value):
        raise _bad(loc, f"{value!r}: absolute paths are not allowed; give a path relative to your workspace")
    if ".." in p.parts:
        raise _bad(loc, f"{value!r}: '..' is not allowed; paths stay inside your workspace")
    return p


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def resolve_input(value: str, loc: str, workspace: Path, data_dir: Path) -> str:
    """A file the job reads: confined to DATA; returns the absolute path, or the value unchanged for a hub id."""
    rel = check_relative(value, loc)
    candidate = workspace / rel
    if os.path.lexists(candidate):
        if not inside(candidate, data_dir):
            raise _bad(loc, f"{value!r} is a link that leads outside the server's data directory")
        return str(candidate.resolve())
    return value


def confine(cfg: dict[str, Any], user: str, run_id: str, data_dir: Path) -> tuple[dict[str, Any], Path]:
    """Rewrite a job's config so it reads only inside DATA and writes only into its own run directory."""
    if not re.match(NAME, run_id or ""):
        raise _bad("run_id", f"{run_id!r}: use 1-64 letters, digits, '.', '_' or '-' (no '/' or '..')")
    workspace = data_dir / "users" / user
    workspace.mkdir(parents=True, exist_ok=True)
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    if (model.get("trust_remote_code") if isinstance(model, dict) else False):
        raise _bad("model.trust_remote_code", "this server does not run code shipped with a model")
    if isinstance(data, dict) and data.get("allow_code"):
        raise _bad("data.allow_code", "this server does not import code named by a request")
    for key, suffixes in PATH_KEYS:
        section, _, name = key.partition(".")
        node = cfg.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str):
            if suffixes is None or node[name].endswith(suffixes):
                node[name] = resolve_input(node[name], key, workspace, data_dir)
    if isinstance(data, dict):
        for split in ("train", "eval"):
            for i, spec in enumerate(data.get(split) or []):
                if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                    spec["path"] = resolve_input(spec["path"], f"data.{split}.{i}.path", workspace, data_dir)
        if "cache_dir" in data:
            check_relative(str(data["cache_dir"]), "data.cache_dir")
        data["cache_dir"] = str(data_dir / "cache" / user)
    output = cfg.setdefault("output", {})
    if not isinstance(output, dict):
        raise _bad("output", "expected a mapping")
    sub = check_relative(str(output.get("dir") or "run"), "output.dir")
    run_dir = (workspace / "runs" / run_id / sub).resolve()
    if not inside(run_dir, workspace):
        raise _bad("output.dir", "the run directory must stay inside your workspace")
    output["dir"] = str(run_dir)
    tracking = cfg.get("tracking")
    mlflow = tracking.get("mlflow") if isinstance(tracking, dict) else None
    if isinstance(mlflow, dict) and str(mlflow.get("uri", "")).startswith("file:"):
        local = check_relative(str(mlflow["uri"])[5:], "tracking.mlflow.uri")
        mlflow["uri"] = f"file:{workspace / local}"
    return cfg, run_dir
