"""Optimizer and learning-rate schedule, built from the train config by name."""

from __future__ import annotations

import torch

from tuneforge.train.schedule import lr_lambda, warmup_steps


def build_optimizer(model, t) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def build_scheduler(optimizer, t, total_steps: int):
    warm = warmup_steps(t.warmup_steps, t.warmup_ratio, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler, warm, total_steps))
