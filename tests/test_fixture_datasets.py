"""CLI-level: `tuneforge prepare` on every real dataset in ../shared/fixtures, with the real Qwen2.5
tokenizer (a tokenizer-only directory: no weights needed). Skips cleanly when fixtures are absent."""

import json

import pytest
import yaml

from conftest import FIXTURES
from helpers import run_cli

pytestmark = pytest.mark.slow
QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct"

CASES = {  # file: (rows read, what must come out)
    "llamafactory_alpaca_en_demo.json": (999, "train_samples"),
    "llamafactory_lima.json": (1029, "train_samples"),
    "oasst_en_100_tree.jsonl": (100, "train_samples"),
    "fastchat_dummy_conversation.json": (500, "train_samples"),
    "llamafactory_glaive_toolcall_en_demo.json": (300, "train_samples"),
    "llamafactory_dpo_en_demo.json": (300, "preference_pairs"),
    "hh-rlhf_harmless-base_test.jsonl.gz": (2312, "preference_pairs"),
}


def config(tmp_path, name, **data):
    cfg = {"model": {"path": str(QWEN)},
           "data": {"train": [{"path": str(FIXTURES / "datasets" / name)}], "cache_dir": str(tmp_path / "cache"),
                    "max_length": 2048, "on_bad_row": "skip", **data},
           "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_prepare_fixture_dataset(tmp_path, name):
    if not (FIXTURES / "datasets" / name).is_file() or not QWEN.is_dir():
        pytest.skip("fixtures not present")
    rows, kind = CASES[name]
    proc = run_cli("prepare", config(tmp_path, name))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows_read"] == rows
    produced = report["train_samples"] + report["eval_samples"] + report["preference_pairs"]
    assert produced + sum(report["dropped"].values()) == rows  # every row accounted for
    kept = report[kind] + (report["eval_samples"] if kind == "train_samples" else 0)
    assert kept >= 0.85 * rows  # the rest are real duplicates or replies beyond max_length, counted above
    again = run_cli("prepare", config(tmp_path, name))
    assert "cache hit" in again.stdout


def test_inspect_json_with_a_real_tokenizer_dir(tmp_path):
    name = "fastchat_dummy_conversation.json"
    if not (FIXTURES / "datasets" / name).is_file() or not QWEN.is_dir():
        pytest.skip("fixtures not present")
    from transformers import AutoTokenizer

    proc = run_cli("data", "inspect", config(tmp_path, name), "--json", "--limit", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    tok = AutoTokenizer.from_pretrained(QWEN)
    for r in rows:
        assert tok(r["text"], add_special_tokens=False)["input_ids"] == r["input_ids"]
        trained = tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100])
        assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained
