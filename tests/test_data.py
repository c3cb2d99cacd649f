"""Data path: formats, cache keyed by content, inspect output."""

import json

import pytest

import tiny
from conftest import FIXTURES
from helpers import run_cli, write_config
from tuneforge.config.schema import DataConfig
from tuneforge.data.formats import BadRow, to_conversation
from tuneforge.data.prepare import prepare
from tuneforge.data.render import IGNORE
from tuneforge.data.sources import Row


def test_alpaca_and_sharegpt_rows_become_conversations():
    alpaca = Row({"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Be exact.", "history": [["hi", "hello"]]}, "f", 1)
    assert to_conversation(alpaca, "auto", None) == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    share = Row({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "f", 2)
    assert to_conversation(share, "auto", "sys") == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(BadRow, match="role is 'bot'"):
        to_conversation(Row({"messages": [{"role": "bot", "content": "x"}]}, "f", 3), "auto", None)


def data_cfg(tmp_path, train, **kw):
    return DataConfig.model_validate({"train": [{"path": str(train)}], "cache_dir": str(tmp_path / "cache"), **kw})


def test_cache_hit_when_unchanged_and_miss_when_input_changes(tmp_path, tokenizer):
    train = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(40))
    first = prepare(data_cfg(tmp_path, train), tokenizer)
    again = prepare(data_cfg(tmp_path, train), tokenizer)
    assert not first.cache_hit and again.cache_hit and again.fingerprint == first.fingerprint
    assert [s.input_ids for s in again.train] == [s.input_ids for s in first.train]
    assert [s.labels for s in again.eval] == [s.labels for s in first.eval]
    tiny.write_jsonl(train, tiny.reverse_rows(40, seed=9))  # same size, other content
    changed = prepare(data_cfg(tmp_path, train), tokenizer)
    assert not changed.cache_hit and changed.fingerprint != first.fingerprint
    option = prepare(data_cfg(tmp_path, train, train_on="all"), tokenizer)
    assert option.fingerprint != changed.fingerprint
    assert first.report["train_samples"] == 38 and first.report["eval_samples"] == 2  # eval_split 0.05 of 40


def test_inspect_json_shows_exact_text_ids_and_labels(tmp_path, llama_dir):
    train = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(10))
    cfg = write_config(tmp_path / "c.yaml", llama_dir, train, tmp_path / "run")
    proc = run_cli("data", "inspect", cfg, "--json", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2
    for r in rows:
        assert r["text"].startswith("<|im_start|>user\nreverse the letters:") and r["text"].endswith("<|im_end|>\n")
        assert len(r["input_ids"]) == len(r["labels"])
        trained = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE]
        assert trained and trained[-1] == 2  # ends with <|im_end|> (id 2): the model learns to stop


@pytest.mark.parametrize("name,fmt,expect_rows", [
    ("llamafactory_alpaca_en_demo.json", "alpaca", 999),
    ("fastchat_dummy_conversation.json", "sharegpt", 500),
    ("llamafactory_lima.json", "alpaca", 1029),
])
def test_real_fixture_datasets_prepare(tmp_path, tokenizer, name, fmt, expect_rows):
    path = FIXTURES / "datasets" / name
    if not path.is_file():
        pytest.skip(f"fixture {name} not present")
    data = prepare(data_cfg(tmp_path, path, max_length=4096, on_bad_row="skip"), tokenizer)
    rep = data.report
    assert rep["rows_read"] == expect_rows
    assert rep["train_samples"] + rep["eval_samples"] + sum(rep["dropped"].values()) == expect_rows
    assert rep["train_samples"] > 0.9 * expect_rows
