"""Optimizer and learning-rate schedule, built from the train config by name.

Weight decay applies to matrices only: biases and norm weights (1-d parameters) are never decayed.
"""

from __future__ import annotations

import torch

from tuneforge.errors import UserError
from tuneforge.train.core.schedule import lr_lambda, warmup_steps

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "lion", "lion_8bit", "sgd", "adagrad")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, t) -> torch.optim.Optimizer:
    groups = param_groups(model, t.weight_decay)
    name, lr = t.optimizer, t.lr
    if name == "adamw":
        # Built before accelerate moves the model to the GPU: decide by the machine, not by where params are now.
        fused = torch.cuda.is_available() and not getattr(t, "fsdp", False)
        return torch.optim.AdamW(groups, lr=lr, betas=t.betas, eps=t.adam_epsilon, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed lr from our schedule (not Adafactor's own relative-step schedule).
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name in ("adamw_8bit", "paged_adamw_8bit", "lion", "lion_8bit"):
        return _bnb_optimizer(name, groups, t)
    raise UserError(f"train.optimizer: unknown {name!r}; valid: {', '.join(OPTIMIZERS)}")


def _bnb_optimizer(name: str, groups: list[dict], t):
    try:
        import bitsandbytes.optim as bnb
    except ImportError:
        raise UserError(f"train.optimizer: {name} needs bitsandbytes: pip install 'tuneforge[quant]'") from None
    cls = {"adamw_8bit": bnb.AdamW8bit, "paged_adamw_8bit": bnb.PagedAdamW8bit, "lion": bnb.Lion, "lion_8bit": bnb.Lion8bit}[name]
    # Lion's usual betas are (0.9, 0.99); the config's AdamW betas apply to the AdamW variants only.
    betas = t.betas if name.endswith("adamw_8bit") or "betas" in t.chosen() else (0.9, 0.99)
    eps = {"eps": t.adam_epsilon} if name.endswith("adamw_8bit") else {}  # Lion has no epsilon
    return cls(groups, lr=t.lr, betas=betas, **eps)


def build_scheduler(optimizer, t, total_steps: int):
    warm = warmup_steps(t.warmup_steps, t.warmup_ratio, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler, warm, total_steps, t.min_lr_ratio))
