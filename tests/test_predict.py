"""predict / eval write the files and the numbers they claim."""

import json
import math
from pathlib import Path

import pytest

import tiny
from helpers import assert_user_error, run_cli, write_config


def test_predict_files_and_metrics(tmp_path, llama_dir):
    from tuneforge.infer.predict import predict

    rows = tiny.reverse_rows(5, seed=4) + [{"messages": [{"role": "user", "content": "hello"}]}]  # last: prompt only
    data = tiny.write_jsonl(tmp_path / "data.jsonl", rows)
    logs = []
    r = predict(str(llama_dir), data, max_new_tokens=5, batch_size=4, log=logs.append)
    assert "predict: started (6 to do)" in logs and any(line.startswith("predict: done, 6/6 in ") for line in logs)  # piped progress
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
    n = 2 * 2 * report["samples"]  # loss + an answer per sample, both models: progress while piped
    assert f"eval: started ({n} to do)" in proc.stderr and f"eval: done, {n}/{n} in " in proc.stderr


REVERSE_TASK = """task: tf_reverse
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def reverse_choice_rows(n: int) -> list[dict]:
    """Multiple choice: the reversed letters (right) or the letters as given (wrong), in a seeded order."""
    import random

    rng, out = random.Random(7), []
    for row in tiny.reverse_rows(n, seed=11):
        right = row["messages"][1]["content"]
        wrong = row["messages"][0]["content"].split(": ", 1)[1]
        choices = [right, wrong] if rng.random() < 0.5 else [wrong, right]
        out.append({"question": row["messages"][0]["content"], "choices": choices, "answer": choices.index(right)})
    return out


def own_accuracy(model_dir: Path, rows: list[dict]) -> float:
    """The task's accuracy from our own log-likelihoods: sum of log p(' ' + choice | question) per choice."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    right = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            ctx = tok(row["question"])["input_ids"]
            whole = tok(row["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return right / len(rows)


@pytest.mark.slow
def test_eval_hands_off_to_lm_eval_and_its_accuracy_is_the_models(tmp_path, learned_run):
    rows = reverse_choice_rows(16)
    data = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tf_reverse.yaml").write_text(REVERSE_TASK.format(rows=data))
    proc = run_cli("eval", learned_run, "--samples", "2", "--max-new-tokens", "4", "--lm-eval", "tf_reverse",
                   "--lm-eval-include", tasks, "--lm-eval-raw", env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((learned_run / "eval_report.json").read_text())
    tuned, base = report["tuned"]["lm_eval/tf_reverse/acc"], report["base"]["lm_eval/tf_reverse/acc"]
    assert tuned == pytest.approx(own_accuracy(learned_run / "final", rows))
    assert base == pytest.approx(own_accuracy(json.loads((learned_run / "run_info.json").read_text())["base_model_dir"], rows))
    assert "lm_eval/tf_reverse/acc" in proc.stdout
    # A task name lm-eval does not know: one line, before any model is loaded.
    assert_user_error(run_cli("eval", learned_run, "--lm-eval", "tf_revers", "--lm-eval-include", tasks), "tf_revers", "tf_reverse")
