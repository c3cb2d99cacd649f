"""kill -9 at random moments, then --resume: the final weights are bit-identical to an uninterrupted run's
and the logged loss curve is identical step for step.

A tiny run with dropout (LoRA dropout / attention dropout), shuffling and gradient accumulation, killed with
SIGKILL 5 times per method (LoRA and full fine-tuning, 10 kill points in all): right after a random step,
in the middle of a checkpoint write (state saved, folder not yet renamed), after the last step before the
final save, and once from outside at a random instant. The kill points come from train/faults.py
(TUNEFORGE_FAULT=kill@step:N | kill@ckpt:N | kill@final), so each is a real SIGKILL at a known place.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import tiny
from helpers import run_cli, write_config

TOTAL, SAVE = 12, 3


def make_config(tmp_path, model, method, out):
    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", tiny.reverse_rows(64, seed=3))
    train = {"finetune": method, "max_steps": TOTAL, "micro_batch_size": 2, "grad_accum": 2, "save_every": SAVE,
             "keep_checkpoints": 2, "lr": 2e-3, "seed": 7}
    sections = {"train": train, "tracking": {"plot": False, "tensorboard": False}}
    if method == "lora":
        sections["lora"] = {"dropout": 0.1, "r": 4}
    return write_config(tmp_path / f"{out}.yaml", model, rows, tmp_path / out, **sections)


def dropout_model(tmp_path, llama_dir):
    """The tiny Llama with attention dropout on, so full fine-tuning consumes dropout RNG too."""
    folder = tmp_path / "llama-dropout"
    shutil.copytree(llama_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def kill_plan(rng: random.Random, outside: bool) -> list[str]:
    """Five kill points in increasing order, so each one fires after the previous resume."""
    candidates = [(k, 0, f"kill@step:{k}") for k in range(1, TOTAL)] + [(k, 1, f"kill@ckpt:{k}") for k in range(SAVE, TOTAL + 1, SAVE)]
    picked = sorted(rng.sample(candidates, 3 if outside else 4))
    plan = [p[2] for p in picked] + ["kill@final"]
    return (["outside"] if outside else []) + plan


def curve(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if "loss" in r]


def final_weights(run):
    out = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert out
    return out


def kill_from_outside(cfg, rng) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    time.sleep(rng.uniform(0.5, 4.0))  # anywhere in start-up, data preparation, model load or the first steps
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_kill9_at_random_points_then_resume_is_bit_identical(tmp_path, llama_dir, method):
    model = llama_dir if method == "lora" else dropout_model(tmp_path, llama_dir)
    rng = random.Random(f"kill-{method}-{os.environ.get('TUNEFORGE_KILL_SEED', '0')}")
    ref_cfg = make_config(tmp_path, model, method, "reference")
    ref = run_cli("train", ref_cfg)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cfg = make_config(tmp_path, model, method, "killed")
    plan = kill_plan(rng, outside=(method == "full"))
    resume = []
    for point in plan:
        if point == "outside":
            rc = kill_from_outside(cfg, rng)
        else:
            rc = run_cli("train", cfg, *resume, env={"TUNEFORGE_FAULT": point}).returncode
        assert rc == -signal.SIGKILL, (point, rc)
        if (tmp_path / "killed").is_dir():
            resume = ["--resume"]  # the run directory exists: from here on every start is a resume
    done = run_cli("train", cfg, *resume)
    assert done.returncode == 0, (plan, done.stderr[-3000:])
    run, reference = tmp_path / "killed", tmp_path / "reference"
    assert json.loads((run / "run_info.json").read_text())["status"] == "finished"
    assert curve(run) == curve(reference) and len(curve(run)) == TOTAL, plan
    got, want = final_weights(run), final_weights(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and bool((got[k] == want[k]).all()), (plan, k)


@pytest.mark.slow
def test_kill9_two_process_run_resumes_bit_identical(tmp_path, llama_dir):
    """Two processes (DDP over gloo): every rank dies with SIGKILL mid-checkpoint, then after a step."""
    ref = run_cli("train", make_config(tmp_path, llama_dir, "lora", "reference"), "--nproc", "2")
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = make_config(tmp_path, llama_dir, "lora", "killed")
    resume = []
    for point in ("kill@ckpt:6", "kill@step:10"):
        proc = run_cli("train", cfg, "--nproc", "2", *resume, env={"TUNEFORGE_FAULT": point})
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (point, proc.returncode, proc.stderr[-2000:])
        resume = ["--resume"]
    done = run_cli("train", cfg, "--nproc", "2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    run, reference = tmp_path / "killed", tmp_path / "reference"
    assert json.loads((run / "run_info.json").read_text())["status"] == "finished"
    assert curve(run) == curve(reference) and len(curve(run)) == TOTAL
    got, want = final_weights(run), final_weights(reference)
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
