"""Seed 004 (LLaMA-Factory walk-through): its own Mixtral commands - SFT with `--quantization_bit 4` (QLoRA on
an MoE), prediction on `--max_samples 10`, export (merge) - on a tiny local Mixtral and alpaca-format data.

The SFT command is imported as written (`config import --from llamafactory`); only the hub ids are swapped for
local files (`--set`). Training runs in its own process; import, predict and merge in this one (faster). The predict and export commands are not training: import refuses them naming the tuneforge
command to run, and that command runs here with the seed's arguments.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import tiny
from helpers import run_cli, run_cli_inprocess

DATA = Path(__file__).resolve().parents[1] / "data"
pytestmark = pytest.mark.slow


def alpaca_rows(n: int) -> list[dict]:
    """alpaca_gpt4_en's format: instruction / input / output."""
    return [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
            for r in tiny.reverse_rows(n, seed=5)]


def test_llamafactory_mixtral_qlora_sft_predict_and_export(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    model = tiny.build_model(tmp_path / "mixtral", "mixtral")
    rows = alpaca_rows(16)
    tiny.write_jsonl(tmp_path / "alpaca_gpt4_en.jsonl", rows)

    imported = run_cli_inprocess("config", "import", DATA / "seeds_004_sft_mixtral.sh", "--from", "llamafactory",
                                 "--out", tmp_path / "sft.yaml")
    assert imported.returncode == 0, imported.stderr[-2000:]
    local = ["--set", f"model.path={model}", "--set", "data.train.0.path=alpaca_gpt4_en.jsonl"]
    sft = run_cli("train", tmp_path / "sft.yaml", *local, cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr[-3000:]
    run = tmp_path / "trained_model_sft"  # --output_dir
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["base_model"]["quantize"] == "4bit"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    total = info["total_steps"]
    assert steps and all(math.isfinite(s["loss"]) for s in steps) and steps[-1]["step"] == total
    assert steps[-1]["epoch"] == 1  # --num_train_epochs 2.0 (counted from 0)
    # --lr_scheduler_type cosine --learning_rate 2e-5, no warmup: the last step's rate
    assert steps[-1]["lr"] == pytest.approx(2e-5 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}  # --lora_target q_proj,v_proj
    with safe_open(str(run / "final" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(("q_proj" in n or "v_proj" in n) and "experts" not in n for n in names)

    # --do_predict --max_samples 10 --output_dir trained_model_output
    refused = run_cli_inprocess("config", "import", DATA / "seeds_004_predict_mixtral.sh", "--from", "llamafactory")
    assert refused.returncode == 2 and "tuneforge predict" in refused.stderr
    out = tmp_path / "trained_model_output"
    pred = run_cli_inprocess("predict", run, "--data", tmp_path / "alpaca_gpt4_en.jsonl", "--limit", "10", "--batch-size", "1",
                             "--max-new-tokens", "8", "--out", out / "generated_predictions.jsonl")
    assert pred.returncode == 0, pred.stderr[-3000:]
    preds = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == [r["output"] for r in rows[:10]]
    assert all(isinstance(p["prediction"], str) for p in preds)
    metrics = json.loads((out / "generated_predictions.metrics.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert metrics["metrics"]["rows"] == 10 and 0 <= metrics["metrics"]["exact_match"] <= 1
    assert 1 < metrics["metrics"]["perplexity"] < 2 * vocab  # a barely trained random model: about uniform

    # export_model.py --export_dir trained_model_output: the LoRA merged into the (de-quantized) base
    refused = run_cli_inprocess("config", "import", DATA / "seeds_004_export_mixtral.sh", "--from", "llamafactory")
    assert refused.returncode == 2 and "tuneforge merge" in refused.stderr
    merged = out / "merged"
    merge = run_cli_inprocess("merge", run, "--out", merged)
    assert merge.returncode == 0, merge.stderr[-3000:]
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["passed"] and report["base_dequantized_from"] == "4bit" and report["max_rel_logit_diff"] < 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        w2 = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight")
    assert not any("lora" in k for k in keys)
    # full precision again, saved in Mixtral's own per-expert layout (what LLaMA-Factory's export writes)
    assert w2.dtype == torch.float32 and tuple(w2.shape) == (64, 128)
    assert sum(".w1.weight" in k for k in keys) == 2 * 4  # 2 layers x 4 experts
