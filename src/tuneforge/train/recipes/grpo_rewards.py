"""GRPO's reward functions: the built-ins a config names (grpo.rewards), and the user's own `module:function`.

Every reward is called once per generation batch with the same keyword arguments:

    completions      list[str]          the generated replies (decoded, special tokens dropped)
    completion_ids   list[list[int]]    their token ids
    prompts          list[list[dict]]   the prompt conversations (messages) they answer
    **columns        list[...]          every other column of the prompt rows (e.g. answer), one value per completion

and returns one float per completion (None: the reward does not apply to it; a completion no reward
applies to gets advantage 0). The weighted sum of all rewards (grpo.rewards[].weight) is the completion's
reward. A user function follows TRL's signature, except that completions are plain strings.

A reward that raises, or returns the wrong shape, stops the run with a one-line error naming the reward and
the prompt row it failed on (the batch is re-run row by row to find it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from tuneforge import metrics
from tuneforge.errors import UserError

RewardFn = Callable[..., list]


# ---- built-ins ------------------------------------------------------------------------------------------


def exact_match(column: str) -> RewardFn:
    """1.0 where the completion, stripped, equals the row's `column` value (stripped); else 0.0."""
    def reward(completions, **columns):
        return [float(metrics.exact(c, str(ref))) for c, ref in zip(completions, _column(columns, column))]
    return reward


def regex(pattern: str) -> RewardFn:
    """1.0 where `pattern` matches the completion (re.search, DOTALL: anchor it with ^...$ to match the whole); else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions, **_):
        return [float(compiled.search(c) is not None) for c in completions]
    return reward


def _parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False, None


def valid_json(completions, **_) -> list[float]:
    """1.0 where the completion parses as JSON; else 0.0."""
    return [float(metrics.valid_json(c)) for c in completions]


def json_schema(schema: dict | None, column: str | None) -> RewardFn:
    """1.0 where the completion parses as JSON and validates against the schema (inline in the config, or per
    row from `column`); else 0.0."""
    jsonschema = _need("jsonschema", "json_schema")
    fixed = jsonschema.validators.validator_for(schema)(schema) if schema is not None else None

    def reward(completions, **columns):
        schemas = _column(columns, column) if column else [None] * len(completions)
        out = []
        for c, row_schema in zip(completions, schemas):
            ok, value = _parse_json(c)
            if isinstance(row_schema, str):
                row_schema = json.loads(row_schema)
            validator = fixed or jsonschema.validators.validator_for(row_schema)(row_schema)
            out.append(float(ok and validator.is_valid(value)))
        return out
    return reward


def math_answer(column: str) -> RewardFn:
    """1.0 where the completion's final answer equals the row's `column` value mathematically (math-verify:
    LaTeX, \\boxed{}, fractions, 0.5 == 1/2); else 0.0. A reference math-verify cannot parse: None (skipped)."""
    math_verify = _need("math_verify", "math")
    parse, verify = math_verify.parse, math_verify.verify

    def reward(completions, **columns):
        out = []
        for c, ref in zip(completions, _column(columns, column)):
            gold = parse(str(ref))
            out.append(float(verify(gold, parse(c))) if gold else None)
        return out
    return reward


def length_penalty(max_tokens: int, soft_tokens: int) -> RewardFn:
    """DAPO's soft overlong punishment: 0 up to max_tokens - soft_tokens completion tokens, then falling
    linearly to -1 at max_tokens, -1 beyond."""
    start = max_tokens - soft_tokens

    def reward(completion_ids, **_):
        return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / soft_tokens) for ids in completion_ids]
    return reward


def _need(module: str, reward: str):
    """An optional package a built-in reward uses (the rl extra), or a one-line error naming the install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"grpo.rewards: a {reward} reward needs {module.replace('_', '-')}: pip install 'tuneforge[rl]'") from None


def _column(columns: dict, name: str) -> list:
    if name not in columns:
        known = ", ".join(sorted(columns)) or "none"
        raise UserError(f"grpo.rewards: column {name!r} is not in the prompt rows (columns: {known}); "
                        "set the reward's column, or rename it with data.train[].columns")
    return columns[name]


# ---- from the config --------------------------------------------------------------------------------------


@dataclass
class Reward:
    name: str  # in logs: rewards/<name>/mean
    fn: RewardFn
    weight: float


def build(specs: list, max_completion_length: int) -> list[Reward]:
    """grpo.rewards (config RewardSpec list) -> callables. A `function` reference imports user code: the schema
    allows it only with data.allow_code (or TUNEFORGE_ALLOW_CODE=1)."""
    out = []
    for spec in specs:
        if spec.type == "exact_match":
            fn = exact_match(spec.column or "answer")
        elif spec.type == "regex":
            fn = regex(spec.pattern)
        elif spec.type == "json":
            fn = valid_json
        elif spec.type == "json_schema":
            fn = json_schema(spec.json_schema, spec.column)
        elif spec.type == "math":
            fn = math_answer(spec.column or "answer")
        elif spec.type == "length":
            fn = length_penalty(spec.max_tokens or max_completion_length, spec.soft_tokens)
        else:
            fn = load_function(spec.function)
        out.append(Reward(spec.label, fn, spec.weight))
    names = [r.name for r in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"grpo.rewards: two rewards are named {dup!r} (give each a distinct name:)")
    return out


def load_function(ref: str) -> RewardFn:
    import importlib

    module, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"grpo.rewards: function {ref!r}: cannot import ({exc})") from None
    if not callable(fn):
        raise UserError(f"grpo.rewards: function {ref!r} is not callable")
    return fn


# ---- scoring ----------------------------------------------------------------------------------------------


def score(rewards: list[Reward], completions: list[str], completion_ids: list[list[int]], prompts: list,
          columns: list[dict], where: list[str]) -> list[list[float]]:
    """-> per completion, one value per reward (NaN where a reward returned None). `columns[i]` are the row
    fields of completion i's prompt and `where[i]` its row ("file row n"), for errors."""
    keys = sorted({k for row in columns for k in row})
    kwargs = {k: [row.get(k) for row in columns] for k in keys}
    table = [_call(r, completions, completion_ids, prompts, kwargs, where) for r in rewards]
    return [[v for v in col] for col in zip(*table)] if table else [[] for _ in completions]


def _call(reward: Reward, completions, completion_ids, prompts, kwargs: dict, where: list[str]) -> list[float]:
    n = len(completions)
    try:
        values = reward.fn(completions=completions, completion_ids=completion_ids, prompts=prompts, **kwargs)
        return _checked(reward, values, n)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: find the row, say it in one line
        failing = _first_failing_row(reward, completions, completion_ids, prompts, kwargs)
        place = where[failing] if failing is not None else f"a batch of {n} completions (every row alone passes)"
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        raise UserError(f"grpo.rewards: reward {reward.name!r} raised on {place}: {detail} (fix the function or the row)") from None


def _checked(reward: Reward, values: Any, n: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{type(values).__name__} of {len(values)}" if isinstance(values, (list, tuple)) else type(values).__name__
        raise UserError(f"grpo.rewards: reward {reward.name!r} returned {got} for {n} completions "
                        "(return a list with one float, or None, per completion)")
    out = []
    for v in values:
        if v is None:
            out.append(float("nan"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out.append(float(v))
        else:
            raise UserError(f"grpo.rewards: reward {reward.name!r} returned {v!r} (a finite float or None per completion)")
    return out


def _first_failing_row(reward: Reward, completions, completion_ids, prompts, kwargs: dict) -> int | None:
    for i in range(len(completions)):
        try:
            reward.fn(completions=completions[i : i + 1], completion_ids=completion_ids[i : i + 1], prompts=prompts[i : i + 1],
                      **{k: v[i : i + 1] for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001
            return i
    return None
