"""The core with 2 real processes (DDP, gloo): eval sharded over ranks (odd eval size: one rank runs a dummy
micro-batch) reduces to the one-process eval loss; the LoRA checkpoint (trainable-only hooks under DDP's
`module.` names) resumes on 2 processes to the uninterrupted weights."""

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

import tiny
from helpers import run_cli

pytestmark = pytest.mark.slow


def train(config, out, *extra):
    proc = run_cli("train", config, "--set", f"output.dir={out}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_shard_eval_and_resume_lora(tmp_path, llama_dir):
    data = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(40, seed=8))
    cfg = {
        "model": {"path": str(llama_dir)},
        "data": {"train": [{"path": str(data)}], "eval_size": 7, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "lora", "max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "seed": 2,
                  "eval_every": 2, "save_every": 2, "keep_checkpoints": 2, "lr_scheduler": "constant"},
        "lora": {"r": 4},
        "tracking": {"tensorboard": False, "plot": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = train(path, tmp_path / "one")
    two = train(path, tmp_path / "two", "--set", "train.grad_accum=1", "--nproc", "2")  # same global batch (4)

    ev1 = [r["eval_loss"] for r in metrics(one) if "eval_loss" in r]
    ev2 = [r["eval_loss"] for r in metrics(two) if "eval_loss" in r]
    assert len(ev1) == len(ev2) == 2 and ev2 == pytest.approx(ev1, abs=1e-5)
    a, b = load_file(one / "final" / "adapter_model.safetensors"), load_file(two / "final" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

    ckpt = two / "checkpoints" / "step-0000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "trainer.json"} <= names
    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))

    # Crash after step 2 on 2 processes, resume on 2 processes: the uninterrupted weights.
    crashed = tmp_path / "crashed"
    shutil.copytree(two, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-0000004")
    info = json.loads((crashed / "run_info.json").read_text())
    (crashed / "run_info.json").write_text(json.dumps({**info, "status": "interrupted"}))
    train(path, crashed, "--set", "train.grad_accum=1", "--nproc", "2", "--resume")
    c = load_file(crashed / "final" / "adapter_model.safetensors")
    assert max((b[k] - c[k]).abs().max().item() for k in b) <= 1e-6
