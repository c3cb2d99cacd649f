"""Distributed engines, all through accelerate: DDP (default), DeepSpeed ZeRO 1/2/3 (+ CPU offload), FSDP2.

One config key picks the engine (`train.deepspeed: zero3` or `train.fsdp: true`); everything else (the
step, checkpoints, the consolidated final model) is the same code for every engine, because accelerate's
`backward`, `accumulate`, `save_state`/`load_state` and `get_state_dict` are collective and engine-aware.

DeepSpeed configs are JSON files: five presets ship in `train/deepspeed/` (selected by name) and a user's
own file is accepted. tuneforge's `train:` section stays the one source for batch size, accumulation,
clipping and precision: those keys are filled in from it, and a file that sets them differently is refused.

A JSON may bring DeepSpeed's own `optimizer` and `scheduler` sections (the HF-Trainer style, with "auto"
values): they are honoured through accelerate's DummyOptim / DummyScheduler, with "auto" resolved from
`train:` (lr, betas, adam_epsilon, weight_decay, warmup, total steps). Setting train.optimizer or
train.lr_scheduler as well is refused (two choices for one thing).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from tuneforge.config.schema import DEEPSPEED_PRESETS
from tuneforge.errors import UserError

PRESET_DIR = Path(__file__).parent / "deepspeed"
# Ranks wait for each other in collectives (e.g. while the main process saves a large checkpoint); the
# default 10-30 min NCCL timeout kills long saves on slow disks. Data preparation does not rely on it.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
DS_OPTIMIZERS_CPU = ("adam", "adamw")  # DeepSpeed optimizer types that run without a GPU (as torch's Adam/AdamW)
DS_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")
FSDP_NEEDS_GPU = ("train.fsdp: accelerate runs FSDP on GPUs only (on CPU it would silently fall back to DDP); "
                  "use train.deepspeed: zero3 to shard on CPU, or run on GPUs")


def describe(train_cfg) -> str:
    """A short name for run_info / logs: ddp, deepspeed:zero3, fsdp2."""
    if train_cfg.deepspeed:
        return f"deepspeed:{Path(train_cfg.deepspeed).stem if train_cfg.deepspeed.endswith('.json') else train_cfg.deepspeed}"
    return "fsdp2" if train_cfg.fsdp else "ddp"


def load_deepspeed_json(name_or_path: str) -> dict:
    """A preset by name (zero1 ... zero3_offload) or a user JSON file."""
    path = PRESET_DIR / f"{name_or_path}.json" if name_or_path in DEEPSPEED_PRESETS else Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"train.deepspeed: {name_or_path} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) nor an existing JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"train.deepspeed: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def deepspeed_config(train_cfg, mixed_precision: str, cuda: bool) -> dict:
    """The DeepSpeed dict with the keys tuneforge owns filled from `train:` (world size is added by accelerate)."""
    ds = load_deepspeed_json(train_cfg.deepspeed)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2, 3):
        raise UserError(f"train.deepspeed: zero_optimization.stage must be 1, 2 or 3 (got {zero.get('stage')!r})")
    ours = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        # No clipping = 0 in DeepSpeed; tuneforge's update() clips through accelerate, which defers to DeepSpeed.
        "gradient_clipping": train_cfg.max_grad_norm or 0.0,
    }
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise UserError(f"train.deepspeed: the JSON sets {key}={ds[key]} but the tuneforge config gives {value} "
                            f"(set it in train: and use \"auto\" in the JSON)")
        ds[key] = value
    ds.pop("train_batch_size", None)  # accelerate derives it: micro batch x accumulation x processes
    for flag, on in (("bf16", mixed_precision == "bf16"), ("fp16", mixed_precision == "fp16")):
        ds.setdefault(flag, {})["enabled"] = on
    # Any torch optimizer (ours) also with offload; DeepSpeedCPUAdam would need a JIT C++ build.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if not cuda:  # pinned memory needs a GPU driver
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(key), dict):
                zero[key]["pin_memory"] = False
    if zero.get("stage") == 3:
        # Without it a ZeRO-3 model saves empty tensors: get_state_dict must gather the full weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    _own_sections(ds, train_cfg, cuda)
    return ds


def _own_sections(ds: dict, t, cuda: bool) -> None:
    """The JSON's optimizer / scheduler sections: checked, "auto" resolved from `train:` (steps at prepare)."""
    opt, sched = ds.get("optimizer"), ds.get("scheduler")
    if sched is not None and opt is None:
        raise UserError("train.deepspeed: the JSON has a scheduler section but no optimizer section; accelerate runs "
                        "DeepSpeed's scheduler only with DeepSpeed's optimizer (add an optimizer section, or remove the scheduler)")
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        if "optimizer" in t.chosen():
            raise UserError(f"train.deepspeed: the JSON's optimizer section ({opt.get('type')}) and train.optimizer both "
                            "choose the optimizer: remove one")
        if not cuda and kind not in DS_OPTIMIZERS_CPU:
            raise UserError(f"train.deepspeed: optimizer type {opt.get('type')!r} needs a GPU; on CPU use Adam or AdamW")
        params = opt.setdefault("params", {})
        _fill(params, "optimizer", {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_epsilon, "weight_decay": t.weight_decay},
              t, {"lr": "lr", "betas": "betas", "eps": "adam_epsilon", "weight_decay": "weight_decay"})
        if not cuda:  # DeepSpeed's CPU/fused Adam are C++ builds; torch's AdamW is the same update
            params.setdefault("torch_adam", True)
    if sched is not None:
        if sched.get("type") not in DS_SCHEDULERS:
            raise UserError(f"train.deepspeed: scheduler type {sched.get('type')!r} is not one of DeepSpeed's ({', '.join(DS_SCHEDULERS)})")
        if "lr_scheduler" in t.chosen():
            raise UserError(f"train.deepspeed: the JSON's scheduler section ({sched['type']}) and train.lr_scheduler both "
                            "choose the schedule: remove one")
        params = sched.setdefault("params", {})
        for key, value in (("warmup_min_lr", 0.0), ("warmup_max_lr", t.lr), ("warmup_min_ratio", 0.0), ("cos_min_ratio", 0.0001)):
            if params.get(key) == "auto":
                params[key] = value  # warmup_num_steps / total_num_steps: known once the data is (deepspeed_steps)


def _fill(params: dict, section: str, ours: dict, t, fields: dict) -> None:
    for key, value in ours.items():
        given = params.get(key, "auto")
        if given == "auto":
            params[key] = value
        elif fields[key] in t.chosen() and given != value:
            raise UserError(f"train.deepspeed: the JSON's {section}.params.{key} is {given} but train.{fields[key]} is {value} "
                            f"(keep one: \"auto\" in the JSON takes train.{fields[key]})")


def deepspeed_sections(accel) -> dict:
    """The optimizer / scheduler sections of the run's DeepSpeed config ({} without DeepSpeed)."""
    plugin = getattr(accel.state, "deepspeed_plugin", None)
    ds = plugin.deepspeed_config if plugin is not None else {}
    return {k: ds[k] for k in ("optimizer", "scheduler") if k in ds}


def engine_optimizer(accel, groups: list[dict], t, total_steps: int, warmup: int):
    """(DummyOptim, DummyScheduler or a schedule callable) for a JSON with its own sections: DeepSpeed builds and
    steps them inside its engine. Total steps fill the scheduler's "auto" here (accelerate would divide them by
    the process count)."""
    from accelerate.utils import DummyOptim, DummyScheduler

    sections = deepspeed_sections(accel)
    optimizer = DummyOptim(groups, lr=t.lr, weight_decay=t.weight_decay)
    if "scheduler" in sections:
        params = sections["scheduler"].setdefault("params", {})
        if params.get("total_num_steps", "auto") == "auto" and sections["scheduler"]["type"] in ("WarmupDecayLR", "WarmupCosineLR"):
            params["total_num_steps"] = total_steps
        return optimizer, DummyScheduler(optimizer, total_num_steps=None, warmup_num_steps=warmup)

    def our_schedule(opt):  # the JSON chose the optimizer only: tuneforge's schedule on DeepSpeed's optimizer
        from tuneforge.train.core.optim import build_scheduler

        return build_scheduler(opt, t, total_steps)

    return optimizer, DummyScheduler(optimizer, lr_scheduler_callable=our_schedule)


def build_accelerator(cfg, mixed_precision: str, **kwargs):
    """The Accelerator for this run's engine. kwargs go to Accelerator (e.g. step_scheduler_with_optimizer)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    t, cuda = cfg.train, torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)]
    # Accelerate counts micro-batches: backward divides by this and accumulate() syncs on the last one.
    kwargs["gradient_accumulation_steps"] = t.grad_accum
    if t.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if not cuda:
            # accelerate ignores DeepSpeed with cpu=True and finds no backend without a GPU: name gloo.
            handlers = [InitProcessGroupKwargs(backend="gloo", timeout=COLLECTIVE_TIMEOUT)]
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(t, mixed_precision, cuda))
        return Accelerator(mixed_precision=mixed_precision, deepspeed_plugin=plugin, kwargs_handlers=handlers, **kwargs)
    if t.fsdp:
        if not cuda:
            raise UserError(FSDP_NEEDS_GPU)
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one shard group per decoder layer (model._no_split_modules)
            reshard_after_forward=True,  # ZeRO-3-like: parameters are gathered per layer, freed after use
            state_dict_type="SHARDED_STATE_DICT",  # checkpoints: every rank writes its shard (torch DCP)
            cpu_ram_efficient_loading=False,
        )
        return Accelerator(mixed_precision=mixed_precision, fsdp_plugin=plugin, kwargs_handlers=handlers, **kwargs)
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda, kwargs_handlers=handlers, **kwargs)



def check(train_cfg) -> None:
    """The engine's one-line errors, before any process starts: deepspeed installed, its JSON valid, FSDP on GPUs."""
    import importlib.util

    if train_cfg.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("train.deepspeed: DeepSpeed is not installed (pip install 'tuneforge[deepspeed]')")
        import torch

        deepspeed_config(train_cfg, train_cfg.mixed_precision, cuda=torch.cuda.is_available())
    if train_cfg.fsdp:
        import torch

        if not torch.cuda.is_available():
            raise UserError(FSDP_NEEDS_GPU)
