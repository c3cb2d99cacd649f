"""Masked cross-entropy, summed (not averaged): the caller divides by the true target count of the
whole optimizer step, so accumulation splits and packing do not change the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.render import IGNORE


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # use_cache=False: with a cache, packed rows (restarting position_ids) attend across samples.
    return model(**inputs, use_cache=False).logits  # (B, T, V)


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose target != IGNORE. targets are pre-shifted."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens (counted by collate): what throughput is measured in."""
    return int(batch["real_tokens"])
