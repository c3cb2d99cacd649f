"""predict / eval write the files and the numbers they claim."""

import json
import math

import pytest

import tiny
from helpers import assert_user_error, run_cli, write_config


def test_predict_files_and_metrics(tmp_path, llama_dir):
    from tuneforge.infer.predict import predict

    rows = tiny.reverse_rows(5, seed=4) + [{"messages": [{"role": "user", "content": "hello"}]}]  # last: prompt only
    data = tiny.write_jsonl(tmp_path / "data.jsonl", rows)
    r = predict(str(llama_dir), data, max_new_tokens=5, batch_size=4, log=lambda *_: None)
    out = [json.loads(x) for x in (tmp_path / "data.predictions.jsonl").read_text().splitlines()]
    assert len(out) == 6 and out[-1]["reference"] is None and all(o["prediction"] for o in out)  # random weights still answer
    assert [o["reference"] for o in out[:5]] == [row["messages"][1]["content"] for row in rows[:5]]
    saved = json.loads((tmp_path / "data.predictions.metrics.json").read_text())["metrics"]
    assert saved["with_reference"] == 5 and saved["exact_match"] == sum(o["prediction"] == o["reference"] for o in out[:5]) / 5
    assert 0 <= saved["rougeL"] < 1 and saved["perplexity"] > 1 and math.isfinite(saved["perplexity"])
    assert r["metrics"]["bleu"] == saved["bleu"]

    # The model's own greedy answers as references: every metric must say "perfect".
    own = [{"messages": [o["messages"][0], {"role": "assistant", "content": o["prediction"]}]} for o in out[:5]]
    again = predict(str(llama_dir), tiny.write_jsonl(tmp_path / "own.jsonl", own), max_new_tokens=5, batch_size=2, log=lambda *_: None)
    assert again["metrics"]["exact_match"] == 1.0 and again["metrics"]["rougeL"] == pytest.approx(1.0)
    assert again["metrics"]["bleu"] == pytest.approx(100.0)


def test_predict_refuses_to_overwrite_and_bad_rows(tmp_path, llama_dir):
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.reverse_rows(2))
    (tmp_path / "p.jsonl").write_text("mine\n")
    assert_user_error(run_cli("predict", llama_dir, "--data", data, "--out", tmp_path / "p.jsonl"), "exists", "--overwrite")
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    assert_user_error(run_cli("predict", llama_dir, "--data", bad), "bad.jsonl row 1")


@pytest.mark.slow
def test_eval_base_vs_tuned_matches_the_runs_eval_loss(tmp_path, llama_dir):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.reverse_rows(40, seed=2))
    cfg = write_config(tmp_path / "c.yaml", llama_dir, train, tmp_path / "run", data={"eval_split": 0.2},
                       train={"finetune": "full", "max_steps": 4, "micro_batch_size": 8, "lr": 3e-3,
                              "generate_eval": {"samples": 3, "max_new_tokens": 4}})
    assert run_cli("train", cfg).returncode == 0
    proc = run_cli("eval", tmp_path / "run", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert report["samples"] >= 5  # 20% of 40 rows, after the split's rounding
    assert report["tuned"]["eval_loss"] == pytest.approx(info["summary"]["eval_loss"], rel=1e-4)  # same number training logged
    assert report["base"]["eval_loss"] > report["tuned"]["eval_loss"]
    assert report["tuned"]["perplexity"] == pytest.approx(math.exp(report["tuned"]["eval_loss"]))
    assert set(report["tuned"]) == set(report["base"]) >= {"eval_loss", "perplexity", "gen_exact"}
    assert "fine-tuned" in proc.stdout and info["eval"]["samples"] == report["samples"]
