"""Micro-batch collation: padding-free packing or right padding. Targets are shifted per sample here,
so a packed row never trains the first token of one sample from the last token of another."""

from __future__ import annotations

import torch

from tuneforge.data.render import IGNORE


def shifted_targets(labels: list[int]) -> list[int]:
    # targets[t] = the token that position t must predict; the last position predicts nothing.
    return labels[1:] + [IGNORE]


def collate(samples, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """packed: one row without padding (data.packing padding_free or bins), else right padding."""
    return pack(samples) if packed else pad(samples, pad_id)


def pack(samples) -> dict[str, torch.Tensor]:
    """All samples -> one row (1, T) with position ids restarting at 0 per sample (no padding)."""
    ids, targets, pos = [], [], []
    for s in samples:
        ids += s.input_ids
        targets += shifted_targets(s.labels)
        pos += range(len(s.input_ids))
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "targets": t(targets), "position_ids": t(pos)}


def pad(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: (B, T) ids, targets and attention mask."""
    width = max(len(s.input_ids) for s in samples)
    ids, targets, mask = [], [], []
    for s in samples:
        n = len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * (width - n))
        targets.append(shifted_targets(s.labels) + [IGNORE] * (width - n))
        mask.append([1] * n + [0] * (width - n))
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "targets": t(targets), "attention_mask": t(mask)}
