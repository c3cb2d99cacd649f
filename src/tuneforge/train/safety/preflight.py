"""Checks before a run spends anything: the output folder is writable, the disk holds the checkpoints,
and (on a GPU) the memory plan fits. Each failure is one line that says what to change."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tuneforge.errors import UserError


def nearest_existing(path: Path) -> Path:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(run_dir: Path) -> None:
    """Cheap, before anything heavy: can we create files where the run will live?"""
    where = nearest_existing(run_dir)
    if not where.is_dir():
        raise UserError(f"output.dir {run_dir}: {where} is a file, not a folder (pick another output.dir)")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".tuneforge-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"output.dir {run_dir}: cannot write in {where} ({exc.strerror or exc}): check its permissions "
                        "or pick another output.dir") from None


def checkpoint_bytes(model, optimizer_states: float = 2.0) -> dict[str, int]:
    """Bytes one checkpoint and the final model take: trainable weights + optimizer state (+ the frozen
    weights for a full model's final save)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"checkpoint": int(trainable * (1 + optimizer_states)), "trainable": trainable, "all": every}


def check_disk(run_dir: Path, model, keep: int, saves: bool, full: bool) -> int:
    """Refuse a run whose checkpoints and final model would not fit on the disk. Returns the bytes needed."""
    size = checkpoint_bytes(model)
    # keep_checkpoints complete ones + the one being written + the final model (+ best copy, counted in keep+1)
    need = (size["checkpoint"] * (keep + 2) if saves else 0) + (size["all"] if full else size["trainable"])
    free = shutil.disk_usage(nearest_existing(run_dir)).free
    if need > free:
        raise UserError(f"output.dir {run_dir}: needs ~{need / 2**30:.2f} GiB for {keep} checkpoint(s) and the final model, "
                        f"but only {free / 2**30:.2f} GiB are free (free space, lower train.keep_checkpoints, or pick another disk)")
    return need


def check_plan_on_gpu(cfg, log=print) -> None:
    """On a GPU, refuse a run the memory planner says cannot fit (clearly over: > 1.25 x the device),
    instead of dying of OOM after loading. TUNEFORGE_SKIP_PLAN=1 skips the check."""
    import torch

    if not torch.cuda.is_available() or os.environ.get("TUNEFORGE_SKIP_PLAN") == "1":
        return
    from tuneforge.model import plan as pl

    try:
        shape = pl.shape_from_config(pl.load_model_config(cfg.model.path, cfg.model.trust_remote_code))
    except UserError:
        return  # a GGUF or unreadable config: the load itself will say what is wrong
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = pl.plan(shape, pl.inputs_from_config(cfg, world), cfg.train.grad_accum)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if p.peak > 1.25 * total:
        fixes = "; ".join(label for label, _ in pl.suggestions(shape, pl.inputs_from_config(cfg, world), total)) or "a smaller model"
        raise UserError(f"memory plan: ~{pl.fmt_gib(p.peak)} per GPU needed, the GPU has {pl.fmt_gib(total)} "
                        f"(try: {fixes}; `tuneforge plan CONFIG` shows the parts; TUNEFORGE_SKIP_PLAN=1 skips this check)")
    if p.peak > total:
        log(f"warning: the memory plan (~{pl.fmt_gib(p.peak)}) is above this GPU's {pl.fmt_gib(total)}; it may not fit")
