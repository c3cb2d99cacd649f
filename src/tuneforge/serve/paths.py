"""A job is a guest: every path it names stays in its user's workspace, and it reaches only what the operator allows.

The rule for paths (config/confine.py) finds them from the schema's `PathField` markers, so a field added later
is covered without a change here: resolved (symlinks followed, `file:` URIs percent-decoded) each must lie in
DATA/users/USER, or in the server's model cache (read-only). A name that is no file in the workspace stays as
given: a hub id. The server, not the request, decides where runs and the data cache go. Nothing in a job is
expanded (`${` anywhere is refused) and tracker URLs must be ones `serve --allow-tracker` names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tuneforge.config.confine import GuestError, Rooms, confine_config, refuse_variables
from tuneforge.serve.schema import NAME, refuse, validate_config

DEFAULT_DISK_QUOTA = 20 << 30  # bytes per user (workspace + data cache, checkpoints included)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.load runs code from these
WANDB_DEFAULT_URL = "https://api.wandb.ai"


@dataclass
class GuestPolicy:
    """What the operator lets a job do (serve options): trackers it may contact, a bubblewrap sandbox, disk per user."""

    trackers: tuple[str, ...] = ()
    sandbox: bool = False
    disk_quota: int = DEFAULT_DISK_QUOTA

    def __post_init__(self):
        from tuneforge.errors import UserError

        for url in self.trackers:
            if not re.match(r"^https?://[^/@\s]+", url):
                raise UserError(f"--allow-tracker {url!r}: give the tracker's http(s) URL, e.g. https://mlflow.example.com")

    def rooms(self, data_dir: Path, user: str) -> Rooms:
        return Rooms(workspace=data_dir / "users" / user, read_only=(model_cache(),),
                     writable=(data_dir / "cache" / user,), trackers=self.trackers)


def model_cache() -> Path:
    """The server's own hub cache (the operator's downloads): jobs may read models in it through a link in their
    workspace, never write it. A job's downloads go to its user's cache (DATA/cache/USER/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL


def check_relative(value: str, loc: str) -> PurePosixPath:
    if not isinstance(value, str) or not value.strip():
        raise refuse(400, loc, "expected a non-empty relative path")
    p = PurePosixPath(value.replace("\\", "/"))
    if value.startswith(("/", "~")) or p.is_absolute() or re.match(r"^[A-Za-z]:", value):
        raise refuse(400, loc, f"{value!r}: absolute paths are not allowed; give a path relative to your workspace")
    if ".." in p.parts:
        raise refuse(400, loc, f"{value!r}: '..' is not allowed; paths stay inside your workspace")
    return p


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def confine(cfg: dict[str, Any], user: str, run_id: str, data_dir: Path, policy: GuestPolicy | None = None,
            credentials: dict[str, str] | None = None) -> tuple[dict[str, Any], Path]:
    """Check a job's config against its user's workspace; returns it with the paths it runs with, and its run dir."""
    policy = policy or GuestPolicy()
    if not re.match(NAME, run_id or ""):
        raise refuse(400, "run_id", f"{run_id!r}: use 1-64 letters, digits, '.', '_' or '-' (no '/' or '..')")
    workspace = data_dir / "users" / user
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        refuse_variables(cfg)
    except GuestError as exc:
        raise refuse(exc.status, exc.loc, exc.msg) from None
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    if (model.get("trust_remote_code") if isinstance(model, dict) else False):
        raise refuse(400, "model.trust_remote_code", "this server does not run code shipped with a model")
    if isinstance(data, dict) and data.get("allow_code"):
        raise refuse(400, "data.allow_code", "this server does not import code named by a request")
    for split in ("train", "eval"):
        specs = data.get(split) if isinstance(data, dict) else None
        for i, spec in enumerate(specs if isinstance(specs, list) else []):
            if isinstance(spec, dict) and ":" in str(spec.get("custom") or ""):
                raise refuse(400, f"data.{split}.{i}.custom", "this server does not import code named by a request (module:attr); "
                                                       "use a path to a data file in your workspace")
    grpo = cfg.get("grpo")
    for i, reward in enumerate((grpo.get("rewards") if isinstance(grpo, dict) else None) or []):
        if isinstance(reward, dict) and reward.get("type") == "function":
            raise refuse(400, f"grpo.rewards.{i}.function", "this server does not import code named by a request (module:function); "
                                                     "use a built-in reward (exact_match, regex, json, json_schema, math, length)")
    run_dir = _server_places(cfg, user, run_id, data_dir, workspace)
    checked = validate_config(cfg, "config")
    rooms = policy.rooms(data_dir, user)
    try:
        resolved = confine_config(checked, rooms)
    except GuestError as exc:
        raise refuse(exc.status, exc.loc, exc.msg) from None
    for slot, value in resolved:
        if slot.marker.role == "read":
            refuse_pickle(slot.dotted, value)
        _set_in(cfg, slot.loc, value)
    if checked.tracking.wandb is not None and (credentials or {}).get("WANDB_API_KEY") and wandb_url() not in policy.trackers:
        raise refuse(422, "tracking.wandb", f"a W&B key was given, so the job would contact {wandb_url()}; this server contacts "
                                     "only trackers its operator allows (serve --allow-tracker), or drop the key to log offline")
    return cfg, run_dir


def _server_places(cfg: dict[str, Any], user: str, run_id: str, data_dir: Path, workspace: Path) -> Path:
    """The run directory (DATA/users/USER/runs/RUN_ID/<output.dir>) and the data cache (DATA/cache/USER)."""
    data = cfg.get("data")
    if isinstance(data, dict):
        if "cache_dir" in data:
            check_relative(str(data["cache_dir"]), "data.cache_dir")
        data["cache_dir"] = str(data_dir / "cache" / user)
    output = cfg.setdefault("output", {})
    if not isinstance(output, dict):
        raise refuse(400, "output", "expected a mapping")
    sub = check_relative(str(output.get("dir") or "run"), "output.dir")
    run_dir = (workspace / "runs" / run_id / sub).resolve()
    if not inside(run_dir, workspace):
        raise refuse(400, "output.dir", "the run directory must stay inside your workspace")
    output["dir"] = str(run_dir)
    return run_dir


def refuse_pickle(name: str, value: str) -> None:
    """Pickled weights run code when loaded (torch.load): a job may bring safetensors only."""
    p = Path(value)
    if not p.is_absolute():
        return  # no such file in the workspace: a hub id
    if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES):
        raise refuse(422, name, f"{p.name} is a pickle file, which runs code when loaded: this server takes weights as "
                         ".safetensors only (convert it, e.g. save_pretrained(safe_serialization=True))")
    if p.is_dir():
        names = [c.name for c in p.iterdir() if c.is_file()]
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES) and not n.startswith("training_args")]
        if pickles and not any(n.endswith(".safetensors") for n in names):
            raise refuse(422, name, f"{pickles[0]} is a pickle file, which runs code when loaded, and there are no .safetensors "
                             "weights: this server takes weights as .safetensors only (convert them with "
                             "save_pretrained(safe_serialization=True))")


def _set_in(cfg: dict[str, Any], loc: tuple, value: str) -> None:
    node: Any = cfg
    for part in loc[:-1]:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node[loc[-1]] = value
