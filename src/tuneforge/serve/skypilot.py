"""`tuneforge launch CONFIG --on skypilot`: a SkyPilot task that installs tuneforge and runs `tuneforge train`.

Resources come from the planner's memory estimate (the smallest common GPU that holds the peak with 15%
headroom); secrets are declared as SkyPilot `secrets` (values passed at launch from the environment, never
written into the task file). SkyPilot itself does the provisioning, spot recovery and teardown.

The config is mounted as written, and SkyPilot runs a task from the home folder when it has no workdir, so
each local input is mounted where that config finds it there: a relative path under `~/` (as relative paths
start at the working directory), an absolute (or `~/`) path at the same place.
"""

from __future__ import annotations

import posixpath
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import yaml

from tuneforge.errors import UserError

# (accelerator name, memory GiB), smallest first: what SkyPilot's catalogs call them.
GPUS = [("L4", 24), ("L40S", 48), ("A100", 40), ("A100-80GB", 80), ("H100", 80)]
HEADROOM = 1.15
REMOTE_CONFIG = "~/tuneforge-task/config.yaml"


def pick_accelerator(peak_bytes: float) -> tuple[str, str]:
    """'NAME:COUNT' for a planned peak (per device), and a note saying why."""
    need = peak_bytes * HEADROOM / 2**30
    for name, gib in sorted(GPUS, key=lambda g: g[1]):
        if gib >= need:
            return f"{name}:1", f"planned peak {peak_bytes / 2**30:.1f} GiB (+15%) fits one {name} ({gib} GiB)"
    return "H100:8", (f"planned peak {peak_bytes / 2**30:.1f} GiB exceeds one 80 GiB GPU: 8 x H100; set train.deepspeed: zero3 "
                      "or train.fsdp so the model is sharded across them")


def plan_accelerator(cfg) -> tuple[str, str]:
    try:
        from tuneforge.model.plan import inputs_from_config, load_model_config, plan, shape_from_config

        shape = shape_from_config(load_model_config(cfg.model.path, cfg.model.trust_remote_code))
        return pick_accelerator(plan(shape, inputs_from_config(cfg, assume_gpu=True)).peak)
    except (UserError, ImportError, OSError, ValueError) as exc:
        return "A100:1", f"no plan ({str(exc).splitlines()[0][:120]}): defaulting to A100:1 (override with --gpus)"


def build_task(cfg, config_path: Path, gpus: str | None = None) -> dict:
    accel, why = (gpus, "from --gpus") if gpus else plan_accelerator(cfg)
    count = int(accel.split(":")[1]) if ":" in accel else 1
    try:
        pin = f"tuneforge[gpu]=={version('tuneforge')}"
    except PackageNotFoundError:
        pin = "tuneforge[gpu]"
    train = f"tuneforge train {REMOTE_CONFIG}" + (f" --nproc {count}" if count > 1 else "")
    task = {
        "name": f"tuneforge-{Path(cfg.output.dir).name}".replace("_", "-")[:60],
        "resources": {"accelerators": accel, "disk_size": 256},
        "file_mounts": {REMOTE_CONFIG: str(Path(config_path).resolve())},
        "secrets": {"HF_TOKEN": None, "WANDB_API_KEY": None},
        "envs": {"HF_HUB_ENABLE_HF_TRANSFER": "0", "TOKENIZERS_PARALLELISM": "false"},
        "setup": f"pip install '{pin}'",
        "run": train,
    }
    task["file_mounts"].update(input_mounts(cfg, config_path))
    task["_why"] = why
    return task


def input_mounts(cfg, config_path: Path) -> dict[str, str]:
    """{remote path: local path} of every local input, placed where the mounted config finds it on the machine."""
    from tuneforge.config.load import _input_paths, read_config_file

    raw = read_config_file(config_path)  # as written: `~` and `${VAR}` are still unexpanded here
    mounts = {}
    for place, path in _input_paths(cfg):
        if path and Path(path).exists():
            written = _written(raw, place)
            mounts[remote_path(place, written if isinstance(written, str) else path)] = str(Path(path).resolve())
    return mounts


def _written(raw: dict, place: str):
    node = raw
    for key in place.split("."):
        node = node[int(key)] if isinstance(node, list) and key.isdigit() and int(key) < len(node) else (
            node.get(key) if isinstance(node, dict) else None)
    return node


def remote_path(place: str, written: str) -> str:
    """Where the config's `written` path points on the cloud machine, running from the home folder."""
    if "$" in written:
        raise UserError(f"{place}: {written!r} uses an environment variable, which the cloud machine would expand "
                        "differently: write the path out for `tuneforge launch`")
    if written.startswith(("/", "~/")):
        return written  # the same absolute (or home-relative) place on the machine
    rel = posixpath.normpath(written.replace("\\", "/"))
    if rel == ".." or rel.startswith("../"):
        raise UserError(f"{place}: {written!r} leads above the home folder of the cloud machine: give an absolute "
                        "path or one under the folder you launch from")
    return "~/" + rel


def write_task(cfg, config_path: Path, out: Path | None = None, gpus: str | None = None) -> Path:
    task = build_task(cfg, config_path, gpus)
    why = task.pop("_why")
    out = out or Path(config_path).with_suffix(".sky.yaml")
    header = (f"# SkyPilot task written by `tuneforge launch {config_path} --on skypilot`\n# resources: {why}\n"
              f"# start: sky launch {out} --secret HF_TOKEN --secret WANDB_API_KEY\n")
    out.write_text(header + yaml.safe_dump(task, sort_keys=False))
    return out


def launch_task(path: Path, log: Callable[[str], None]) -> None:
    sky = shutil.which("sky")
    if sky is None:
        raise UserError(f"SkyPilot is not installed: pip install 'tuneforge[skypilot]' (or skypilot), run `sky check`, "
                        f"then `sky launch {path}`; the task file is written")
    log(f"sky launch {path}")
    rc = subprocess.call([sky, "launch", "--yes", str(path), "--secret", "HF_TOKEN", "--secret", "WANDB_API_KEY"])
    if rc != 0:
        raise UserError(f"`sky launch {path}` failed (exit {rc}); run `sky check` to see which clouds are configured")
