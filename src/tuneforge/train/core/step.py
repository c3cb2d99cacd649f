"""The step every recipe shares: forward/backward over one optimizer step's micro-batches, then the update.

A recipe supplies two functions:

    count(batch) -> int            how many units this micro-batch normalises over (target tokens for SFT,
                                   pairs for DPO); counted for all micro-batches of all processes first
    loss(model, batch) -> Tensor   the loss SUMMED over those units (a 0-d tensor), or (sum, {name: summed
                                   metric tensor}) for extra metrics that are averaged the same way

The gradient is d(sum over the whole step / total count), whatever the split into micro-batches and
processes: batch 8 x accum 1 == batch 2 x accum 4 == 2 processes x batch 4.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

LossFn = Callable[[torch.nn.Module, dict], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`, nested batches too (KTO's "kl" sequences); other values as they are."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def accumulate(accel, model, batches: list[dict], loss: LossFn, count: Callable[[dict], int],
               tokens: Callable[[dict], int] | None = None) -> dict:
    """Forward + backward over `batches` (this process's micro-batches of one step, already on device).

    Gradient sync (DDP all-reduce, ZeRO reduce) happens on the last micro-batch only. Returns the step's mean loss over
    all processes, the totals it was normalised by, and any extra metrics (same normalisation)."""
    device = accel.device
    local = torch.tensor([sum(count(b) for b in batches), sum(tokens(b) for b in batches) if tokens else 0],
                         device=device, dtype=torch.float64)
    n_count, n_tokens = accel.reduce(local, reduction="sum").tolist()
    if n_count == 0:
        raise ValueError("this optimizer step has nothing to learn from (0 target units on every process)")
    # DDP/ZeRO/FSDP average gradients over processes and accelerate (or DeepSpeed) divides each backward by
    # the accumulation steps; scaling by both turns that back into a sum.
    if len(batches) != accel.gradient_accumulation_steps:
        raise ValueError(f"{len(batches)} micro-batches but the Accelerator accumulates {accel.gradient_accumulation_steps}")
    scale = accel.num_processes * accel.gradient_accumulation_steps / n_count
    total = torch.zeros((), device=device, dtype=torch.float64)
    extra: dict[str, torch.Tensor] = {}
    for batch in batches:
        # accumulate(): no gradient sync but on the last micro-batch (DDP no_sync, FSDP2 requires_gradient_sync,
        # DeepSpeed's accumulation boundary, where its engine also steps the optimizer).
        with accel.accumulate(model):
            with accel.autocast():
                out = loss(model, batch)
            loss_sum, metrics = out if isinstance(out, tuple) else (out, {})
            accel.backward(loss_sum * scale)
        total += loss_sum.detach().double()
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0) + v.detach().double()
    summed = accel.reduce(torch.stack([total, *extra.values()]), reduction="sum").tolist() if extra else \
        [accel.reduce(total, reduction="sum").item()]
    result = {"loss": summed[0] / n_count, "target_tokens": int(n_count), "tokens": int(n_tokens)}
    result.update({k: v / n_count for k, v in zip(extra, summed[1:])})
    return result


def update(accel, model, optimizer, scheduler, max_grad_norm: float | None) -> dict:
    """Clip, step the optimizer and the schedule, clear grads. -> {grad_norm, lr} (lr used by this step)."""
    lr = scheduler.get_last_lr()[0]
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm is None:
        norm = accel.clip_grad_norm_(params, float("inf"))
    else:
        norm = accel.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}


@torch.no_grad()
def evaluate(accel, model, batches: list[tuple[dict, bool]], loss: LossFn, count: Callable[[dict], int]) -> float:
    """Mean loss over this rank's eval micro-batches, reduced over ranks: sum of losses / sum of counts.
    `batches` are (batch, dummy) pairs; a dummy batch runs (sharded models need every rank) but is not counted."""
    acc = torch.zeros(2, device=accel.device, dtype=torch.float64)
    with eval_mode(model):
        for batch, dummy in batches:
            with accel.autocast():
                out = loss(model, batch)
            loss_sum = out[0] if isinstance(out, tuple) else out
            if not dummy:
                acc += torch.stack([loss_sum.detach().double(), torch.tensor(float(count(batch)), device=accel.device, dtype=torch.float64)])
    total, n = accel.reduce(acc, reduction="sum").tolist()
    return total / n if n else float("nan")


def is_cpu_4bit(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and module.weight.device.type == "cpu"


@contextmanager
def eval_mode(model):
    """model.eval() (no dropout) for a forward - except bitsandbytes 4-bit layers on CPU, which stay in train
    mode: an eval-mode forward repacks their weights for CPU inference, and LoRA training on them is wrong
    afterwards (see STACK-NOTES; tested in test_core_qlora.py)."""
    was_training = model.training
    model.eval()
    for m in model.modules():
        if is_cpu_4bit(m):
            m.train(True)
    try:
        yield model
    finally:
        model.train(was_training)
