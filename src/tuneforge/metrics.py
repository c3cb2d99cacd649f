"""Answer-level metrics for generation evals. Pure functions, no heavy imports."""

from __future__ import annotations

import json


def exact(pred: str, ref: str) -> bool:
    return pred.strip() == ref.strip()


def json_equal(pred: str, ref: str) -> bool:
    """Both parse as JSON and are equal as values (key order and spacing do not matter)."""
    try:
        return json.loads(pred) == json.loads(ref)
    except (json.JSONDecodeError, TypeError):
        return False


def valid_json(pred: str) -> bool:
    try:
        json.loads(pred)
        return True
    except (json.JSONDecodeError, TypeError):
        return False


METRICS = {"exact": exact, "json": json_equal}


def score(preds: list[str], refs: list[str], metric: str) -> dict[str, float]:
    fn = METRICS[metric]
    n = max(1, len(refs))
    out = {f"gen_{metric}": sum(fn(p, r) for p, r in zip(preds, refs)) / n}
    if metric == "json":
        out["gen_valid_json"] = sum(valid_json(p) for p in preds) / n
    return out
