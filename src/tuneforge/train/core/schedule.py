"""Learning-rate schedules as multipliers of the peak lr, one formula each (step = optimizer steps done).

    warmup (all but constant):  f(s) = (s + 1) / (W + 1)                for s < W
    after warmup, p = (s - W) / max(1, T - W):
      cosine                    0.5 * (1 + cos(pi * p))
      cosine_with_min_lr        m + (1 - m) * 0.5 * (1 + cos(pi * p))    (m = min_lr_ratio)
      linear                    max(0, 1 - p)
      constant_with_warmup      1
      constant                  1 (no warmup)
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup")


def lr_lambda(kind: str, warmup: int, total: int, min_lr_ratio: float = 0.0):
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if kind == "constant":
        warmup = 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1 - progress)
        cos = 0.5 * (1 + math.cos(math.pi * progress))
        return min_lr_ratio + (1 - min_lr_ratio) * cos if kind == "cosine_with_min_lr" else cos

    return f


def warmup_steps(steps: int | None, ratio: float, total: int) -> int:
    return steps if steps is not None else int(ratio * total)
