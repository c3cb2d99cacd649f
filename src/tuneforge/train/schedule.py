"""Learning-rate schedule: linear warmup, then cosine / linear decay to 0, or constant."""

from __future__ import annotations

import math


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return f


def warmup_steps(steps: int | None, ratio: float, total: int) -> int:
    return steps if steps is not None else int(ratio * total)
