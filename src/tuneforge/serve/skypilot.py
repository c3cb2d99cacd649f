"""`tuneforge launch CONFIG --on skypilot`: a SkyPilot task that installs tuneforge and runs `tuneforge train`.

Resources come from the planner's memory estimate (the smallest common GPU that holds the peak with 15%
headroom); secrets are declared as SkyPilot `secrets` (values passed at launch from the environment, never
written into the task file). SkyPilot itself does the provisioning, spot recovery and teardown.
"""

from __future__ import annotations

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
    local_files = [s.path for s in (*cfg.data.train, *cfg.data.eval) if s.path and Path(s.path).exists()]
    if Path(cfg.model.path).exists():
        local_files.append(cfg.model.path)
    for i, p in enumerate(local_files):
        # local inputs travel with the task, at the same path the config names (absolute paths keep working)
        task["file_mounts"][str(Path(p).resolve())] = str(Path(p).resolve())
    task["_why"] = why
    return task


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
