"""Checkpoints that resume exactly, through accelerate's collective `save_state` / `load_state`.

Every process takes part (DeepSpeed ZeRO and FSDP save their own shards; DDP saves on the main process),
so the same code saves under every engine. A checkpoint folder `RUN/checkpoints/step-NNNNNNN/` holds:

    model.safetensors        trainable weights only (plain DDP / one process: LoRA = adapter tensors only)
                             - or the engine's own files (pytorch_model/ for DeepSpeed, FSDP shards)
    optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (accelerate; loaded with weights_only=True)
    recipe_state_<rank>.pt   the recipe's own state, when it has one (e.g. a sampling RNG; torch.save)
    trainer.json             step, data fingerprint, batching signature: written last

It is written to `.step-NNNNNNN.tmp`, fsynced, then renamed: a crash mid-save never leaves a folder that
looks complete. The data position needs no state: the batcher derives it from (seed, step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.rundir import TRAINER_META, RunDir, fsync_tree, write_json
from tuneforge.train.safety.faults import fault_point

MODEL_FILE = "model.safetensors"


def plain(name: str) -> str:
    """A parameter name without torch.compile's wrapper prefix, so train.compile on/off share checkpoints."""
    return name.replace("_orig_mod.", "")


def install_trainable_only_hooks(accel) -> None:
    """Save and load only the parameters that train (a LoRA checkpoint is MBs, not the whole base model).

    Hooks only apply where accelerate saves a plain state dict (one process, DDP); DeepSpeed and FSDP
    save through their engines and never call them with weights."""

    def save_hook(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in list(state):
                value = state.pop(key)
                if key in keep:
                    state[plain(key)] = value

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        path = Path(input_dir) / MODEL_FILE
        if not models or not path.is_file():
            return
        for model in list(models):
            params = {plain(n): p for n, p in model.named_parameters() if p.requires_grad}
            copy_trainable(params, load_file(path), f"--resume: {input_dir} holds other trainable weights than this run",
                           "resume needs the same train/lora settings")
            models.remove(model)  # loaded here: accelerate must not load it again

    accel.register_save_state_pre_hook(save_hook)
    accel.register_load_state_pre_hook(load_hook)


def copy_trainable(params: dict, saved: dict, what: str, fix: str) -> None:
    """Copy a checkpoint's trainable tensors into `params` (name -> parameter); names that differ are one line."""
    import torch

    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise UserError(f"{what} (missing {missing[:3]}, unexpected {extra[:3]}); {fix}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def save(accel, run: RunDir, step: int, meta: dict, keep: int, recipe_state: dict | None = None) -> Path:
    """Collective: call on every process. Returns the checkpoint folder. `recipe_state`: this process's."""
    out, tmp = run.checkpoint(step), run.checkpoint_tmp(step)
    if accel.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accel.wait_for_everyone()
    accel.save_state(str(tmp))
    if recipe_state is not None:
        import torch

        torch.save(recipe_state, recipe_state_path(tmp, accel.process_index))
    accel.wait_for_everyone()
    fault_point("ckpt", step)  # tests: kill -9 with the state written but the checkpoint not yet complete
    if accel.is_main_process:
        write_json(tmp / TRAINER_META, {"step": step, **meta})
        fsync_tree(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        for old in run.complete_checkpoints()[:-keep]:
            shutil.rmtree(old)
    accel.wait_for_everyone()
    return out


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_META).read_text())


def check_compatible(path: Path, fingerprint: str, batching: str) -> dict:
    """Refuse a resume that would not continue the same run. Cheap: reads trainer.json only."""
    meta = read_meta(path)
    if meta.get("data_fingerprint") != fingerprint:
        raise UserError(f"--resume: the data changed since {path.name} (fingerprint differs); resume needs the same data")
    if meta.get("batching", batching) != batching:
        raise UserError(f"--resume: {path.name} was saved with {meta['batching']} (data.packing, data.pack_length, "
                        "train.micro_batch_size, train.grad_accum, processes); resume needs the same batching")
    return meta


def load(accel, path: Path) -> None:
    """Collective: restores model (trainable weights), optimizer, scheduler and every process's RNG.
    accelerate loads optimizer/scheduler/RNG files with torch.load(weights_only=True)."""
    accel.load_state(str(path))


def recipe_state_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"recipe_state_{rank}.pt"


def load_recipe_state(path: Path, rank: int) -> dict | None:
    """This process's recipe state saved with the checkpoint, or None when the recipe keeps none."""
    import torch

    f = recipe_state_path(path, rank)
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None
