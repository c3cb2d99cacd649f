"""GRPO's built-in rewards, weights, the user's own function, and a reward that fails naming the row; prompt rows."""

from __future__ import annotations

import math
import sys
import types

import pytest

from tuneforge.config.schema import Config, RewardSpec
from tuneforge.data.formats import BadRow
from tuneforge.data.prompts import from_row
from tuneforge.data.sources import Row
from tuneforge.errors import UserError
from tuneforge.train.recipes.grpo_rewards import build, score


def _score(specs: list[dict], completions: list[str], columns: list[dict] | None = None, ids=None):
    rewards = build([RewardSpec(**s) for s in specs], max_completion_length=8)
    columns = columns or [{} for _ in completions]
    return score(rewards, completions, ids or [[1] * len(c) for c in completions], [[]] * len(completions), columns,
                 [f"p.jsonl row {i + 1}" for i in range(len(completions))])


def test_builtins():
    got = _score([{"type": "exact_match"}, {"type": "regex", "pattern": r"^<a>\d+</a>$"}, {"type": "json"}],
                 [" 42 ", "<a>7</a>", '{"x": 1}'], [{"answer": 42}, {"answer": "8"}, {"answer": "no"}])
    assert got == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # " 42 " is JSON too
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    got = _score([{"type": "json_schema", "json_schema": schema}], ['{"name": "x"}', '{"name": 3}', "not json"])
    assert [r[0] for r in got] == [1.0, 0.0, 0.0]
    per_row = _score([{"type": "json_schema", "column": "schema"}], ["[1]", "[1]"],
                     [{"schema": {"type": "array"}}, {"schema": '{"type": "object"}'}])
    assert [r[0] for r in per_row] == [1.0, 0.0]


def test_math_answers_are_compared_as_math():
    pytest.importorskip("math_verify")
    got = _score([{"type": "math"}], ["The answer is $\\frac{1}{2}$.", "\\boxed{0.5}", "it is 3"], [{"answer": "0.5"}] * 3)
    assert [r[0] for r in got] == [1.0, 1.0, 0.0]


def test_length_penalty_is_dapos_soft_overlong():
    got = _score([{"type": "length", "max_tokens": 8, "soft_tokens": 4}], ["a"] * 4, ids=[[1] * 4, [1] * 6, [1] * 8, [1] * 9])
    assert [r[0] for r in got] == [0.0, -0.5, -1.0, -1.0]


def test_user_function_and_weights_and_none(tmp_path, monkeypatch):
    mod = types.ModuleType("my_rewards_grpo")
    mod.short = lambda completions, **kw: [None if c == "skip" else 1.0 / len(c) for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards_grpo", mod)
    rewards = build([RewardSpec(type="function", function="my_rewards_grpo:short", weight=2.0)], 8)
    assert rewards[0].name == "short" and rewards[0].weight == 2.0
    got = score(rewards, ["ab", "skip"], [[1], [2]], [[], []], [{}, {}], ["r1", "r2"])
    assert got[0] == [0.5] and math.isnan(got[1][0])


def test_a_failing_reward_names_itself_and_the_row(monkeypatch):
    def picky(completions, answer, **kw):
        return [float(int(a)) for a in answer]  # row 2's answer is not a number

    monkeypatch.setitem(sys.modules, "picky_grpo", types.SimpleNamespace(picky=picky))
    rewards = build([RewardSpec(type="function", function="picky_grpo:picky", name="numeric")], 8)
    with pytest.raises(UserError) as exc:
        score(rewards, ["a", "b", "c"], [[1]] * 3, [[]] * 3, [{"answer": "1"}, {"answer": "x"}, {"answer": "3"}],
              ["p.jsonl row 1", "p.jsonl row 2", "p.jsonl row 3"])
    msg = str(exc.value)
    assert "'numeric'" in msg and "p.jsonl row 2" in msg and "ValueError" in msg and "\n" not in msg
    monkeypatch.setitem(sys.modules, "short_grpo", types.SimpleNamespace(f=lambda completions, **kw: [1.0]))
    with pytest.raises(UserError, match="returned list of 1 for 2 completions"):
        score(build([RewardSpec(type="function", function="short_grpo:f")], 8), ["a", "b"], [[1]] * 2, [[]] * 2, [{}, {}], ["r1", "r2"])


def test_missing_column_is_named():
    with pytest.raises(UserError, match="column 'solution' is not in the prompt rows"):
        _score([{"type": "exact_match", "column": "solution"}], ["a"], [{"answer": "a"}])


def test_config_checks():
    base = {"model": {"path": "org/m"}, "data": {"train": [{"path": "p.jsonl"}]}, "train": {"method": "grpo", "micro_batch_size": 8}}
    with pytest.raises(ValueError, match="needs grpo.rewards"):
        Config(**base)
    with pytest.raises(ValueError, match="needs data.allow_code|imports and runs Python code"):
        Config(**base, grpo={"rewards": [{"type": "function", "function": "os:system"}]})
    with pytest.raises(ValueError, match="pattern: does not apply to a json reward"):
        Config(**base, grpo={"rewards": [{"type": "json", "pattern": "x"}]})
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        Config(**{**base, "train": {"method": "grpo", "micro_batch_size": 6}}, grpo={"rewards": [{"type": "json"}]})
    with pytest.raises(ValueError, match="grpo.beta applies to train.method: grpo"):
        Config(**{**base, "train": {}}, grpo={"beta": 0.1})
    ok = Config(**{**base, "data": {**base["data"], "allow_code": True}}, grpo={"rewards": [{"type": "function", "function": "m:f"}], "scale_rewards": False})
    assert ok.grpo.scale_rewards == "none"


def test_prompt_rows():
    msgs, cols = from_row(Row({"prompt": "2+2?", "answer": "4"}, "p.jsonl", 1), "be brief")
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}] and cols == {"answer": "4"}
    msgs, cols = from_row(Row({"question": "hi", "answer": 1}, "p.jsonl", 2), None, {"question": "prompt"})
    assert msgs == [{"role": "user", "content": "hi"}] and cols == {"answer": 1}
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert from_row(Row({"messages": conv}, "p.jsonl", 3), None)[0] == conv
    with pytest.raises(BadRow, match="ends with an assistant turn"):
        from_row(Row({"messages": conv[:2]}, "p.jsonl", 4), None)
    with pytest.raises(BadRow, match="needs 'prompt'"):
        from_row(Row({"text": "x"}, "p.jsonl", 5), None)


def test_values_grpo_cannot_honour_are_refused_when_the_config_loads(tmp_path):
    # Before anything runs (no data prepared, no run folder): the config itself is refused.
    from pydantic import ValidationError

    from tuneforge.config.schema import Config

    base = {"model": {"path": "m"}, "data": {"train": [{"path": "p.jsonl"}]}, "output": {"dir": str(tmp_path / "run")},
            "train": {"method": "grpo", "micro_batch_size": 8}, "grpo": {"rewards": [{"type": "regex", "pattern": "x"}]}}
    Config.model_validate(base)  # the default engine and reference are fine
    with pytest.raises(ValidationError, match="grpo.generation: vllm is not wired"):
        Config.model_validate({**base, "grpo": {**base["grpo"], "generation": "vllm"}})
    with pytest.raises(ValidationError, match="precomputed cannot serve grpo"):
        Config.model_validate({**base, "preference": {"reference": "precomputed"}})
    assert not (tmp_path / "run").exists()


def test_the_job_server_refuses_a_reward_function(tmp_path):
    """A job is a guest: a grpo reward naming code is refused at submit, naming the field (as a custom: dataset is)."""
    pytest.importorskip("fastapi")
    from tuneforge.serve.paths import confine
    from tuneforge.serve.schema import RequestError

    cfg = {"model": {"path": "m"}, "data": {"train": [{"path": "p.jsonl"}]}, "train": {"method": "grpo", "micro_batch_size": 8},
           "grpo": {"rewards": [{"type": "json"}, {"type": "function", "function": "os:system"}]}}
    with pytest.raises(RequestError) as exc:
        confine(cfg, "alice", "r1", tmp_path)
    assert exc.value.status == 400 and exc.value.errors[0]["loc"] == "grpo.rewards.1.function"
