"""A run's life through the CLI: status transitions, SIGTERM, the lock, the watchdog, resume checks,
the secret-leak check, `runs`, and report.html in a headless browser."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny
from helpers import assert_user_error, run_cli, write_config


def info(run):
    return json.loads((run / "run_info.json").read_text())


def config(tmp_path, llama_dir, name="c.yaml", **train):
    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", tiny.reverse_rows(40))
    settings = {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "save_every": 4, **train}
    return write_config(tmp_path / name, llama_dir, rows, tmp_path / "run", train=settings,
                        tracking={"plot": False})


def start(cfg, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def wait_for(proc, text, timeout=300):
    """Read the child's stdout until `text` appears (the pause fault prints it)."""
    deadline = time.time() + timeout
    seen = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}; rc={proc.poll()} out={seen[-2000:]} err={proc.stderr.read()[-3000:]}")


@pytest.mark.slow
def test_sigterm_lock_resume_checks_and_every_status(tmp_path, llama_dir):
    cfg = config(tmp_path, llama_dir)
    run = tmp_path / "run"
    # running -> interrupted: SIGTERM after step 3 finishes the step, writes a checkpoint, exits 130.
    proc = start(cfg, env={"TUNEFORGE_FAULT": "pause@step:3"})
    wait_for(proc, "paused at step 3")
    assert info(run)["status"] == "running"
    second = run_cli("train", cfg, "--resume")  # the lock: a second process is refused while the first lives
    assert_user_error(second, "already training here", f"pid {proc.pid}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    state = info(run)
    assert state["status"] == "interrupted" and "SIGTERM" in state["error"] and "after step 3" in state["error"]
    assert (run / "checkpoints" / "step-0000003" / "trainer.json").is_file() and not (run / "run.lock").exists()
    assert (run / "report.html").is_file()
    # A plain `train` says how to continue; --resume refuses a changed lr/seed and lists them (before loading anything).
    assert_user_error(run_cli("train", cfg), "interrupted run", "--resume")
    changed = run_cli("train", cfg, "--resume", "--set", "train.lr=0.5", "--set", "train.seed=7")
    assert_user_error(changed, "train.lr", "train.seed", "alter the run")
    # interrupted -> running -> finished; a harmless change (logging cadence) is accepted.
    done = run_cli("train", cfg, "--resume", "--set", "train.log_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "train.log_every" in done.stderr
    state = info(run)
    assert state["status"] == "finished" and state["error"] is None
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 6, 8]  # no duplicate rows from the interrupted attempt
    # finished: --resume says so in one line instead of crashing.
    assert_user_error(run_cli("train", cfg, "--resume"), "already finished", "train.max_steps")
    table = run_cli("runs", tmp_path)
    assert table.returncode == 0 and "finished" in table.stdout and "8/8" in table.stdout and "lora" in table.stdout


@pytest.mark.slow
def test_nan_stops_with_last_good_checkpoint_and_failed_status(tmp_path, llama_dir):
    cfg = config(tmp_path, llama_dir, max_steps=10, save_every=2)
    run = tmp_path / "run"
    proc = run_cli("train", cfg, env={"TUNEFORGE_FAULT": "nan@step:6"})
    assert_user_error(proc, "step 6: loss is nan")
    state = info(run)
    assert state["status"] == "failed" and "step 6: loss is nan" in state["error"]
    # The last checkpoint is step 4 (step 6 never saved), and its weights are finite.
    from safetensors.torch import load_file

    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000002", "step-0000004"]
    weights = load_file(run / "checkpoints" / "step-0000004" / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert rows[-1]["step"] == 6 and rows[-1]["loss"] is None and "loss" in rows[-1]["nonfinite"]
    # failed -> `train` says how to resume; the kill before the first checkpoint is not a dead end either.
    assert_user_error(run_cli("train", cfg), "failed run", "--resume")


@pytest.mark.slow
def test_kill_before_first_checkpoint_resumes_from_zero_and_loss_watchdog(tmp_path, llama_dir):
    cfg = config(tmp_path, llama_dir, max_steps=4, save_every=3)
    run = tmp_path / "run"
    killed = run_cli("train", cfg, env={"TUNEFORGE_FAULT": "kill@step:2"})
    assert killed.returncode == -signal.SIGKILL
    assert info(run)["status"] == "running" and (run / "run.lock").is_file()  # nobody could record the kill
    listed = run_cli("runs", tmp_path)
    assert "dead" in listed.stdout
    assert_user_error(run_cli("train", cfg), "running run", "--resume")
    resumed = run_cli("train", cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stale lock" in resumed.stderr and "starts again from step 0" in resumed.stderr
    assert info(run)["status"] == "finished"
    # Loss above the threshold for `patience` steps stops the run (seed 001's keys).
    cfg2 = config(tmp_path, llama_dir, name="c2.yaml", max_steps=6, save_every=None, loss_watchdog_threshold=0.5,
                  loss_watchdog_patience=2)
    shutil.rmtree(run)
    stopped = run_cli("train", cfg2)
    assert_user_error(stopped, "step 2: loss", "loss_watchdog_threshold=0.5 for 2 steps")
    assert info(run)["status"] == "failed"


SECRETS = {"HF_TOKEN": "hf_PLANTEDsecret0123456789", "WANDB_API_KEY": "wandbPLANTED0123456789abcdef0123456789ab"}
DOTENV_SECRET = "dotenvPLANTEDsecret42"


@pytest.mark.slow
def test_secrets_never_reach_run_dir_logs_or_trackers(tmp_path, llama_dir):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    (tmp_path / ".env").write_text(f"MY_SERVICE_TOKEN={DOTENV_SECRET}\nHF_TOKEN={SECRETS['HF_TOKEN']}\n")
    store = tmp_path / "mlruns"
    cfg = config(tmp_path, llama_dir, max_steps=2, save_every=1)
    raw = __import__("yaml").safe_load(cfg.read_text())
    raw["tracking"].update(wandb={"project": "leak-test"}, mlflow={"uri": store.as_uri(), "experiment": "leak"})
    cfg.write_text(__import__("yaml").safe_dump(raw))
    proc = run_cli("train", cfg, env={**SECRETS, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").rglob("*.wandb")) and list(store.rglob("*"))
    needles = [*SECRETS.values(), DOTENV_SECRET]
    for folder in (tmp_path / "run", store):
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for n in needles:
                    assert n.encode() not in data, f"secret leaked into {path}"
    for n in needles:
        assert n not in proc.stdout and n not in proc.stderr


def test_custom_callable_config_refused_on_the_command_line(tmp_path, llama_dir):
    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", tiny.reverse_rows(4))
    cfg = write_config(tmp_path / "c.yaml", llama_dir, rows, tmp_path / "run")
    raw = __import__("yaml").safe_load(cfg.read_text())
    raw["data"]["train"] = [{"custom": "subprocess:Popen", "options": {"args": f"touch {tmp_path}/pwned", "shell": True}}]
    cfg.write_text(__import__("yaml").safe_dump(raw))
    for cmd in (("config", "validate", cfg), ("prepare", cfg)):
        assert_user_error(run_cli(*cmd, env={"TUNEFORGE_ALLOW_CODE": ""}), "allow_code")
    assert not (tmp_path / "pwned").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_curves_in_headless_chromium(tmp_path):
    from tuneforge.train.observe.report import write_report
    from tuneforge.train.observe.tracking import Tracker

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"status": "finished", "finetune": "lora", "total_steps": 30}))
    t = Tracker(run, tensorboard=False)
    for step in range(1, 31):
        t.log(step, loss=3.0 / step ** 0.5, lr=1e-3 * (1 - step / 31), grad_norm=1.0 / step, tokens_per_s=1000.0 + step)
        if step % 10 == 0:
            t.log(step, eval_loss=3.2 / step ** 0.5)
    page = write_report(run)
    proc = run_cli("report", run)
    assert proc.returncode == 0 and page.stat().st_size > 2000
    browser = chromium()
    if browser is None:
        pytest.skip("chromium not installed: the report was checked as HTML only (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    import matplotlib.image as mpimg
    import numpy as np

    img = (mpimg.imread(shot)[..., :3] * 255).astype(int)
    blue = np.all(np.abs(img - [9, 105, 218]) < 40, axis=-1).sum()  # the train-loss line colour
    red = np.all(np.abs(img - [207, 34, 46]) < 40, axis=-1).sum()  # eval loss
    assert blue > 300 and red > 50, (blue, red)
