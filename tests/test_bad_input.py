"""Bad input of any kind: one line naming the place and the fix, exit 2, no traceback, nothing lost."""

import json

import tiny
from helpers import assert_user_error, run_cli, write_config


def cfg_for(tmp_path, llama_dir, rows=None, text=None, **sections):
    train = tmp_path / "train.jsonl"
    if text is not None:
        train.write_text(text)
    else:
        tiny.write_jsonl(train, rows)
    return write_config(tmp_path / "c.yaml", llama_dir, train, tmp_path / "run", **sections)


def test_missing_data_file(tmp_path, llama_dir):
    cfg = write_config(tmp_path / "c.yaml", llama_dir, tmp_path / "nope.jsonl", tmp_path / "run")
    assert_user_error(run_cli("train", cfg), "data file not found", "nope.jsonl")


def test_empty_dataset(tmp_path, llama_dir):
    assert_user_error(run_cli("train", cfg_for(tmp_path, llama_dir, text="")), "no training samples")


def test_row_without_assistant_turn_names_file_and_row(tmp_path, llama_dir):
    rows = tiny.reverse_rows(10)
    rows[6] = {"messages": [{"role": "user", "content": "hi"}]}
    assert_user_error(run_cli("prepare", cfg_for(tmp_path, llama_dir, rows)), "train.jsonl row 7", "no assistant turn", "on_bad_row")


def test_invalid_json_line(tmp_path, llama_dir):
    text = json.dumps(tiny.reverse_rows(1)[0]) + "\n{not json\n"
    assert_user_error(run_cli("prepare", cfg_for(tmp_path, llama_dir, text=text)), "train.jsonl row 2", "invalid JSON")


def test_bad_rows_skipped_are_counted(tmp_path, llama_dir):
    rows = tiny.reverse_rows(20) + [{"messages": [{"role": "user", "content": "x"}]}, {"foo": 1}]
    proc = run_cli("prepare", cfg_for(tmp_path, llama_dir, rows, data={"on_bad_row": "skip"}))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(next((tmp_path / "cache").glob("*/report.json")).read_text())
    assert report["dropped"] == {"no assistant turn with content": 1, "cannot detect the format from keys ['foo']": 1}
    assert report["train_samples"] + report["eval_samples"] == 20 and len(report["bad_row_examples"]) == 2
    assert "dropped" in proc.stdout


def test_unreadable_model_dir(tmp_path, llama_dir):
    bad = tmp_path / "model"
    bad.mkdir()
    cfg = write_config(tmp_path / "c.yaml", bad, tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(8)), tmp_path / "run")
    assert_user_error(run_cli("train", cfg), "not a model directory")
    (bad / "config.json").write_text("{broken")
    assert_user_error(run_cli("train", cfg), "model.path", "no tokenizer vocabulary")  # the failed run above left no trap


def test_too_little_data_for_one_step(tmp_path, llama_dir):
    cfg = cfg_for(tmp_path, llama_dir, tiny.reverse_rows(5), train={"micro_batch_size": 8})
    assert_user_error(run_cli("train", cfg), "lower train.micro_batch_size")


def test_resume_without_checkpoints_and_not_a_run_dir(tmp_path, llama_dir):
    assert_user_error(run_cli("train", cfg_for(tmp_path, llama_dir, tiny.reverse_rows(8)), "--resume"), "--resume", "no run to resume")
    assert_user_error(run_cli("generate", tmp_path, "--prompt", "hi"), "not a run directory")


def test_bad_override_syntax(tmp_path, llama_dir):
    assert_user_error(run_cli("config", "validate", cfg_for(tmp_path, llama_dir, tiny.reverse_rows(8)), "--set", "train.lr"), "KEY=VALUE")


def test_training_on_preference_pairs_only_is_a_clear_error(tmp_path, llama_dir):
    rows = [{"prompt": f"red {i}", "chosen": "blue", "rejected": "green"} for i in range(10)]
    assert_user_error(run_cli("train", cfg_for(tmp_path, llama_dir, rows)), "10 preference pairs", "train.method: dpo")
