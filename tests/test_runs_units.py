"""Run safety pieces on their own: lock, watchdog, signals, resume config check, metrics files, trackers, report."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tuneforge.errors import UserError
from tuneforge.train.safety.lock import LOCK, RunLock, read_owner
from tuneforge.train.safety.resume_check import check_resume_config
from tuneforge.train.safety.signals import StopFlag
from tuneforge.train.observe.tracking import Tracker, read_metrics
from tuneforge.train.safety.watchdog import Diverged, Watchdog


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    # A live owner (another process) holds the lock: a second run is refused, even with --resume.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": child.pid, "host": os.uname().nodename, "heartbeat": time.time()}))
        with pytest.raises(UserError, match="already training here"):
            RunLock(tmp_path, resume=True).acquire()
    finally:
        child.kill()
        child.wait()
    # The owner died (kill -9): without --resume the message says how to continue; --resume takes the lock over.
    with pytest.raises(UserError, match="stale lock.*--resume"):
        RunLock(tmp_path, resume=False).acquire()
    said = []
    lock = RunLock(tmp_path, resume=True, heartbeat_s=0.05, log=said.append).acquire()
    assert lock.took_over.pid == child.pid and "stale lock" in said[0]
    first = read_owner(tmp_path).heartbeat
    time.sleep(0.3)
    assert read_owner(tmp_path).pid == os.getpid() and read_owner(tmp_path).heartbeat > first  # heartbeat moves
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_lock_on_another_host_trusts_the_heartbeat(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time()}))
    with pytest.raises(UserError, match="already training here.*elsewhere"):
        RunLock(tmp_path, resume=True).acquire()
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time() - 3600}))
    with RunLock(tmp_path, resume=True, log=lambda m: None) as lock:
        assert lock.took_over.host == "elsewhere"


def test_watchdog_nan_inf_threshold_and_early_stopping():
    w = Watchdog(threshold=5.0, patience=3, early_stopping_patience=2)
    w.check_step(1, 2.0, 1.0)
    with pytest.raises(Diverged, match="step 2: loss is nan"):
        w.check_step(2, float("nan"), 1.0)
    with pytest.raises(Diverged, match="gradient norm is inf"):
        w.check_step(2, 1.0, float("inf"))
    for step in (3, 4):
        w.check_step(step, 9.0, 1.0)
    w.check_step(5, 1.0, 1.0)  # back under: the count restarts
    w.check_step(6, 9.0, 1.0)
    w.check_step(7, 9.0, 1.0)
    with pytest.raises(Diverged, match="loss_watchdog_threshold=5 for 3 steps"):
        w.check_step(8, 9.0, 1.0)
    assert w.check_eval(10, 1.0) == (True, False)
    assert w.check_eval(20, 1.1) == (False, False)
    assert w.check_eval(30, 0.9) == (True, False)
    assert w.check_eval(40, 0.95) == (False, False)
    assert w.check_eval(50, 0.95) == (False, True)
    restored = Watchdog(early_stopping_patience=2)
    restored.load_state(json.loads(json.dumps(w.state())))
    assert (restored.best_eval, restored.best_step, restored.evals_without_gain) == (0.9, 30, 2)


def test_stop_flag_catches_sigterm_and_sigint_then_restores():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert flag.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a signal after the first one means "stop now"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == before


def saved_config(tmp_path, **train):
    import yaml

    cfg = {"model": {"path": "m"}, "data": {"cache_dir": "c"}, "lora": {"r": 16},
           "train": {"lr": 1e-3, "seed": 1, "max_steps": 20, "log_every": 1, "save_every": 5, "eval_every": None, **train}, "tracking": {"tensorboard": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return json.loads(json.dumps(cfg))


def test_resume_refuses_changes_that_alter_the_run(tmp_path):
    cfg = saved_config(tmp_path)
    ok = json.loads(json.dumps(cfg))
    ok["train"].update(max_steps=40, log_every=5, save_every=2, eval_every=3)
    ok["tracking"]["tensorboard"] = False
    assert set(check_resume_config(tmp_path, ok, resumed_step=10)) == {
        "train.max_steps", "train.log_every", "train.save_every", "train.eval_every", "tracking.tensorboard"}
    bad = json.loads(json.dumps(cfg))
    bad["train"].update(lr=5e-4, seed=2, max_steps=10)
    bad["model"]["path"] = "other"
    bad["lora"]["r"] = 8
    with pytest.raises(UserError) as err:
        check_resume_config(tmp_path, bad, resumed_step=15)
    msg = str(err.value)
    for key in ("train.lr", "train.seed", "model.path", "lora.r", "train.max_steps"):
        assert key in msg
    assert "log_every" not in msg


def test_metrics_are_strict_json_truncated_atomically_and_survive_a_torn_line(tmp_path):
    t = Tracker(tmp_path, tensorboard=False)
    for step in range(1, 6):
        t.log(step, loss=1.0 / step, lr=1e-3)
    t.log(6, loss=float("nan"), grad_norm=float("inf"))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line) for line in text.splitlines()]  # strict parser accepts every line
    assert rows[-1]["loss"] is None and rows[-1]["nonfinite"] == {"loss": "nan", "grad_norm": "inf"}
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "loss": 0.1')  # killed mid-append
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    Tracker(tmp_path, tensorboard=False).truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))


def tb_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_tensorboard_has_no_duplicate_steps_after_resume(tmp_path):
    first = Tracker(tmp_path, tensorboard=True)
    for step in range(1, 8):
        first.log(step, loss=float(step))
    first.close()  # killed after step 7; the checkpoint was at step 4
    second = Tracker(tmp_path, tensorboard=True)
    second.truncate_after(4)
    for step in range(5, 9):
        second.log(step, loss=float(step) + 0.5)
    second.close()
    assert tb_steps(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5), (7, 7.5), (8, 8.5)]


def test_wandb_offline_and_mlflow_local_file(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from tuneforge.config.schema import TrackingConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    tracking = TrackingConfig.model_validate({"tensorboard": False, "wandb": {"project": "p", "name": "n"},
                                              "mlflow": {"uri": store.as_uri(), "experiment": "e"}})
    t = Tracker(tmp_path / "run", tensorboard=False, tracking=tracking, config={"train": {"lr": 0.001}})
    (tmp_path / "run").mkdir()
    for step in (1, 2, 3):
        t.log(step, loss=1.0 / step)
    t.close()
    import mlflow

    mlflow.set_tracking_uri(store.as_uri())
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]
    hist = mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert mlflow.get_run(run_id).data.params["train.lr"] == "0.001"
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_report_is_self_contained_with_curves(tmp_path):
    from tuneforge.train.observe.report import list_runs, write_report

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"status": "finished", "finetune": "lora", "total_steps": 3,
                                                    "base_model": {"path": "tiny"}}))
    (run / "config.yaml").write_text("train: {lr: 0.001}\n")
    t = Tracker(run, tensorboard=False)
    for step in (1, 2, 3):
        t.log(step, loss=2.0 / step, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0 + step, tokens=64, peak_mem_gib=0.5)
    t.log(3, eval_loss=0.9)
    page = write_report(run).read_text()
    assert page.count("<svg") == 4 and 'data-name="train loss"' in page and 'data-name="eval loss"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page and "<script" not in page
    assert "lr: 0.001" in page and "finished" in page
    [row] = list_runs(tmp_path / "runs")
    assert (row["run"], row["status"], row["steps"], row["loss"], row["eval_loss"], row["method"]) == (
        "a", "finished", "3/3", "0.6667", "0.9000", "lora")


def test_custom_callable_needs_explicit_opt_in(monkeypatch):
    from tuneforge.config.schema import DataConfig

    monkeypatch.delenv("TUNEFORGE_ALLOW_CODE", raising=False)
    spec = {"train": [{"custom": "subprocess:Popen", "options": {"args": "touch /tmp/pwned", "shell": True}}]}
    with pytest.raises(ValueError, match="allow_code"):
        DataConfig.model_validate(spec)
    assert DataConfig.model_validate({**spec, "allow_code": True}).allow_code
    monkeypatch.setenv("TUNEFORGE_ALLOW_CODE", "1")
    DataConfig.model_validate(spec)
    DataConfig.model_validate({"train": [{"custom": "registered-name"}]})  # a registered name runs no config-chosen code


def test_doctor_table_names_every_piece():
    from helpers import run_cli_inprocess

    proc = run_cli_inprocess("doctor")
    assert proc.returncode == 0, proc.stderr
    for piece in ("python", "torch", "accelerator", "bitsandbytes", "deepspeed", "flash-attn", "disk: working dir", "HF cache"):
        assert piece in proc.stdout, piece
    from tuneforge.doctor import checks

    rows = {c.name: c for c in checks()}
    assert rows["python"].ok and rows["torch"].ok
    assert all(c.hint for c in rows.values() if not c.ok)  # every missing piece says what to do


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, llama_dir):
    """lr 1e-12 leaves the weights unchanged in fp32, so the eval loss cannot improve: patience 1 stops at the
    second eval, and the best checkpoint (the first eval's) is kept in RUN_DIR/best."""
    import tiny
    from tuneforge.config.schema import Config
    from tuneforge.train.run import run

    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", tiny.reverse_rows(40))
    cfg = Config.model_validate({
        "model": {"path": str(llama_dir)}, "data": {"train": [{"path": str(rows)}], "eval_size": 4, "cache_dir": str(tmp_path / "c")},
        "train": {"max_steps": 10, "micro_batch_size": 2, "lr": 1e-12, "lr_scheduler": "constant", "eval_every": 2,
                  "early_stopping_patience": 1, "keep_best": True},
        "output": {"dir": str(tmp_path / "run")}, "tracking": {"tensorboard": False, "plot": False}})
    run(cfg, log=lambda *a: None)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["stopped_at"] == 4 and "early stopping" in info["stopped_early"]
    assert info["best_step"] == 2 and json.loads((tmp_path / "run" / "best" / "trainer.json").read_text())["step"] == 2
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r) == 4
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run" / "report.html").is_file()


def test_preflight_refuses_unwritable_output_and_a_disk_too_small(tmp_path):
    import torch

    from helpers import run_cli_inprocess
    from tuneforge.train.safety.preflight import check_disk, check_writable

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "afile" / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tmp_path}}}\ndata: {{train: [{{path: {tmp_path / 'afile'}}}]}}\n"
                   f"output: {{dir: {tmp_path / 'afile' / 'run'}}}\n")
    proc = run_cli_inprocess("train", cfg)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    huge = torch.nn.Linear(200_000, 100_000, device="meta")  # 2e10 fp32 parameters: 80 GB of weights, never allocated
    with pytest.raises(UserError, match=r"needs ~\d+.* GiB for 2 checkpoint\(s\) and the final model, but only"):
        check_disk(tmp_path, huge, keep=2, saves=True, full=True)
    assert check_disk(tmp_path, torch.nn.Linear(4, 4), keep=2, saves=True, full=True) == (20 * 3 * 4 + 20) * 4


def test_a_damaged_run_info_is_one_line(tmp_path):
    from tuneforge.rundir import read_run_info

    (tmp_path / "run_info.json").write_text('{"status": "fini')  # cut short
    with pytest.raises(UserError, match=r"run_info.json: not valid JSON"):
        read_run_info(tmp_path)
    (tmp_path / "run_info.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_run_info(tmp_path)
