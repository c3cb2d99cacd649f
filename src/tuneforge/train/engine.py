"""What every recipe needs around its loop: the Accelerator, seeding, the final consolidated save, and the
run's end status when it dies. Engines (DDP, DeepSpeed, FSDP) plug in at `make_accelerator`."""

from __future__ import annotations

import random
import shutil
from pathlib import Path


def mixed_precision(cfg) -> str:
    import torch

    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg):
    import torch

    from tuneforge.train.engines import build_accelerator

    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # step_scheduler_with_optimizer=False: our schedule counts optimizer steps; accelerate would otherwise
    # step it once per process per step (it assumes a dataloader sharded by world size).
    # dynamo_backend: accelerate compiles the model in prepare() and unwraps it for saving.
    # The engine (DDP, DeepSpeed ZeRO, FSDP2) is chosen from train.deepspeed / train.fsdp in train/engines.py.
    return build_accelerator(cfg, mixed_precision(cfg), step_scheduler_with_optimizer=False,
                             dynamo_backend="inductor" if cfg.train.compile else "no")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_final(accel, model, tokenizer, final: Path) -> None:
    """Write a `save_pretrained` folder that plain transformers/peft load. Collective: every process calls it
    (ZeRO-3 / FSDP gather their shards in `get_state_dict`); the main process writes tmp -> rename."""
    state = accel.get_state_dict(model)
    accel.wait_for_everyone()
    if accel.is_main_process:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accel.unwrap_model(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # with its chat template: inference renders like training
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accel.wait_for_everyone()


def record_failure(recipe, exc: BaseException) -> None:
    """Mark the run failed/interrupted with a one-line reason, if this invocation had started it."""
    if not getattr(recipe, "started", False):
        return  # refused before starting (bad config, resume mismatch): the run dir keeps its own status
    accel = getattr(recipe, "accel", None)
    if accel is not None and not accel.is_main_process:
        return
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM/SIGINT handled after a checkpoint (signals.Interrupted)
        recipe.run.interrupt(str(exc) or "interrupted (Ctrl-C)")
    elif isinstance(exc, SystemExit) and not exc.code:
        return
    else:
        recipe.run.fail(exc)
