"""The recipe protocol: what a training method gives the shared loop (train/core/loop.py).

A recipe is a small object. The loop owns everything around it: the run directory, the guard (lock,
signals, watchdog), the Accelerator, the model, optimizer and schedule, checkpoints, eval scheduling and
tracking. The loop calls the recipe in this order:

    batcher = recipe.batcher(ctx)      # data prepared, no model yet: check the data fits the method, keep ctx,
                                       # return the Batcher that deals its items out to steps and processes
    recipe.setup(ctx)                  # model/optimizer prepared, checkpoint restored (ctx.start_step):
                                       # reference models, caches, an eval before training
    recipe.load_state_dict(state)      # on resume, when the checkpoint holds recipe state (optional)
    for each step:
        batches = recipe.batches(sb)   # this process's micro-batches of the step (StepBatch sb), on device;
                                       # may generate online with ctx.model, and compute step constants
        loss(model, batch)             # (summed loss, {name: summed metric}) per micro-batch, under accumulate()
        count(batch)                   # the units the sums are divided by (over all micro-batches and processes)
    recipe.evaluate()                  # {"eval_loss": ..., ...} over the held-out split; {} when there is none

`ctx` is the loop (train/core/loop.py Trainer). A recipe reads: ctx.cfg, ctx.log, ctx.run (RunDir), ctx.eval_batch_size, ctx.plain_model (unwrapped),
ctx.accel, ctx.tokenizer, ctx.source (base model dir), ctx.data (PreparedData), ctx.model (after
`batcher`), ctx.start_step, ctx.total_steps. It never writes run files, saves checkpoints or steps the
optimizer: the loop does.

Optional members (the loop checks with getattr):
    prepare_data(ctx) -> data          the recipe's own prepared items instead of data/prepare.py's (grpo: prompt
                                       rows); called where the loop would prepare, before `batcher`
    tokens(batch) -> int               real (non-padding) tokens, for tokens/s; default batch["real_tokens"]
    step_metrics(m) -> dict            reshape one step's reduced metrics before they are logged
    summary(last) -> dict              extra keys for the run's final summary
    run_info() -> dict                 extra keys recorded in run_info.json when the run finishes
    parity_samples() -> list[list[int]]  token ids `merge` checks parity on; default the SFT samples
    state_dict() -> dict / load_state_dict(state)   this process's recipe state (e.g. a sampling RNG), saved in
                                       every checkpoint (torch.save; tensors, numbers, strings, lists, dicts)

Recipes are registered in train/recipes/__init__.py (RECIPES, keyed by train.method). No recipe subclasses
another: shared pieces are plain functions (train/recipes/pairs.py) or small objects (train/recipes/reference.py).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Recipe(Protocol):
    name: str  # train.method
    unit: str  # what count() counts, logged per step: "target_tokens", "pairs", "examples", ...

    def batcher(self, ctx: Any) -> Any: ...

    def setup(self, ctx: Any) -> None: ...

    def batches(self, sb: Any) -> list[dict]: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]": ...

    def count(self, batch: dict) -> int: ...

    def evaluate(self) -> dict: ...


def hook(recipe, name: str):
    """An optional member of the protocol, or None."""
    return getattr(recipe, name, None)
