"""Reward functions the GRPO tests name in their configs (`function: grpo_fixtures:...`, with data.allow_code)."""

from __future__ import annotations

TARGET = 64  # token ids below this count as "on target"


def low_ids(completion_ids, **_):
    """Share of the completion's tokens with an id below TARGET: a dense, checkable signal a random model gets ~1/8 of."""
    return [sum(t < TARGET for t in ids) / max(len(ids), 1) for ids in completion_ids]


def fails_on_x(completions, answer, **_):
    """Raises on the row whose answer is 'x' (the error must name that row)."""
    return [float(int(a)) * 0 + 1.0 for a in answer]
