"""Micro-batch collation. A micro-batch is a list of rows, a row a list of samples.

- packed: each row becomes one sequence of its samples back to back, position ids restarting at 0 per
  sample (transformers then keeps attention inside each sample); shorter rows are filled with a pad
  segment that has its own positions and no targets, so no attention mask is needed.
- not packed: every sample is its own right-padded row with an attention mask.

Targets are shifted per sample here, so a packed row never trains the first token of one sample from
the last token of another.
"""

from __future__ import annotations

import torch

from tuneforge.data.render import IGNORE


def shifted_targets(labels: list[int]) -> list[int]:
    # targets[t] = the token that position t must predict; the last position predicts nothing.
    return labels[1:] + [IGNORE]


def collate(rows: list[list], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    return pack(rows, pad_id) if packed else pad([s for row in rows for s in row], pad_id)


def pack(rows: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of samples -> (R, T) ids, targets, position ids; T = the longest row."""
    packed = [_pack_row(row) for row in rows]
    width = max(len(ids) for ids, _, _ in packed)
    ids, targets, pos = [], [], []
    for i, t, p in packed:
        fill = width - len(i)
        ids.append(i + [pad_id] * fill)
        targets.append(t + [IGNORE] * fill)
        pos.append(p + list(range(fill)))
    real = sum(len(i) for i, _, _ in packed)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "targets": t(targets), "position_ids": t(pos), "real_tokens": torch.tensor(real)}


def _pack_row(samples) -> tuple[list[int], list[int], list[int]]:
    ids, targets, pos = [], [], []
    for s in samples:
        ids += s.input_ids
        targets += shifted_targets(s.labels)
        pos += range(len(s.input_ids))
    return ids, targets, pos


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
    return {"input_ids": t(ids), "targets": t(targets), "attention_mask": t(mask), "real_tokens": torch.tensor(sum(map(sum, mask)))}
