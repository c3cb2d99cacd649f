"""`--resume` continues the same run, so it refuses every config change that would alter it.

The run's saved config.yaml is compared key by key with the config given to `--resume`. Only keys
that cannot change the weights a run produces may differ: how often it logs, evaluates and saves,
where it reports, and a longer run (max_steps / epochs may grow, never shrink below the checkpoint).
Everything else (lr, seed, base model, LoRA rank, method, data, batching, ...) is listed in one error.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tuneforge.errors import UserError
from tuneforge.rundir import RunDir

# Keys (dotted prefixes) that may change on resume: they change what is recorded, not what is trained.
HARMLESS = (
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.keep_best",
    "train.generate_eval", "train.loss_watchdog_threshold", "train.loss_watchdog_patience",
    "train.early_stopping_patience", "train.saves_per_epoch", "train.evals_per_epoch", "train.eval_micro_batch_size", "tracking.", "output.", "data.num_proc", "data.cache_dir", "data.allow_code",
)
LONGER = ("train.max_steps", "train.epochs")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(saved: dict, current: dict) -> dict[str, tuple]:
    """Every dotted key whose value differs (keys absent from an older saved config are not compared)."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k in a and a.get(k) != b.get(k)}


def _harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) or key.startswith(h + ".") for h in HARMLESS)


def check_resume_config(run_dir: Path, current: dict, resumed_step: int | None = None) -> list[str]:
    """Raise UserError listing every key that may not change; return the harmless keys that changed."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return []
    saved = yaml.safe_load(path.read_text()) or {}
    diff = changed_keys(saved, current)
    refused = []
    for key, (old, new) in diff.items():
        if _harmless(key):
            continue
        if key in LONGER and _longer(key, old, new, saved, resumed_step):
            continue
        refused.append(f"{key} {old!r} -> {new!r}")
    if refused:
        raise UserError(f"--resume: the config changed in ways that alter the run: {'; '.join(refused)} "
                        "(restore those values, or start a new run in another output.dir)")
    return [k for k in diff if k not in refused]


def _longer(key: str, old, new, saved: dict, resumed_step: int | None) -> bool:
    if key == "train.max_steps":
        if new is None or old is None:
            return False  # switching between epochs and max_steps changes the schedule's length unpredictably
        return new >= old and (resumed_step is None or new >= resumed_step)
    # epochs only decides the length when max_steps is unset
    return (saved.get("train") or {}).get("max_steps") is None and new is not None and old is not None and new >= old
