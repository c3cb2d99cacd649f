"""Seed 002 (Finetune_LLMs): "Lora with DeepSpeed" on the guide's ZeRO-3 JSON, then `lora_merge` of a checkpoint.

The DeepSpeed JSON is tests/data/seeds_002_ds_config_stage3.json, the guide's ds_config_stage3.json in shape: its own
optimizer (AdamW) and scheduler (WarmupLR) sections, "auto" values, ZeRO-3 with CPU offload. Swapped for this
machine: the 7B model for the tiny Llama, 2 CPU processes (`--nproc 2`) for GPUs, gradient_accumulation_steps 16
for 2 and save_steps 100 for 2 (a checkpoint within two steps). `lora_merge -lm checkpoints/checkpoint-N`
becomes `tuneforge merge RUN/checkpoints/step-N`.

The first DeepSpeed run on a machine JIT-compiles its CPU collective (cached in TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions; see tests/test_distributed.py).
"""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import tiny
from helpers import run_cli

DS_JSON = Path(__file__).resolve().parents[1] / "data" / "seeds_002_ds_config_stage3.json"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")]


def test_lora_with_deepspeed_zero3_json_then_merge_a_checkpoint(tmp_path, llama_dir):
    ds = tmp_path / "ds_config_stage3.json"
    shutil.copy(DS_JSON, ds)  # verbatim
    run = tmp_path / "finetuned"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(llama_dir)},
        "data": {"train": [{"path": str(tiny.write_jsonl(tmp_path / "train.jsonl", tiny.reverse_rows(24)))}],
                 "eval_size": 4, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "lora", "deepspeed": str(ds), "micro_batch_size": 1, "grad_accum": 2, "lr": 2e-4,
                  "max_steps": 2, "save_every": 2, "seed": 1},
        "output": {"dir": str(run)},
        "tracking": {"tensorboard": False, "plot": False},
    }))
    assert run_cli("config", "validate", config).returncode == 0

    trained = run_cli("train", config, "--nproc", "2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = " ".join((trained.stdout + trained.stderr).split())  # the console wraps long lines when piped
    assert "the JSON's optimizer and scheduler sections (AdamW, WarmupLR) run inside DeepSpeed's engine" in out
    counts = re.search(r"finetune: lora - ([\d,]+) of ([\d,]+) parameters train", out)
    n_train, n_all = (int(x.replace(",", "")) for x in counts.groups())
    assert 0 < n_train < n_all  # ZeRO-3 partitions the weights while loading: counted from ds_numel, not 0 of 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["processes"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 2 and all(0 <= lr <= 2e-4 for lr in lrs)  # DeepSpeed's WarmupLR, peaking at train.lr
    ckpt = run / "checkpoints" / "step-0000002"
    assert (ckpt / "latest").is_file()  # DeepSpeed's own shards

    merged = run_cli("merge", ckpt)
    assert merged.returncode == 0, merged.stderr[-3000:]
    report = json.loads((run / "merged-step-0000002" / "merge_report.json").read_text())
    assert report["passed"] and report["checkpoint"].endswith("step-0000002")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "merged-step-0000002")
    assert not any("lora" in n for n, _ in model.named_parameters())
