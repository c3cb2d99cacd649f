"""`train` with an `export:` section: merge -> push after a finished run, recorded in run_info; a failed push keeps the
finished run (one line, exit 2); steps that cannot run are refused before training; a checkpoint folder merges."""

import json
import socket

import pytest
from safetensors.torch import load_file

import tiny
from helpers import assert_user_error, run_cli, write_config


def _config(tmp_path, base, name: str, **export):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.reverse_rows(24, seed=1))
    return write_config(tmp_path / f"{name}.yaml", base, data, tmp_path / name, train={"max_steps": 4, "save_every": 2},
                        export=export)


@pytest.mark.slow
def test_train_merges_then_pushes_and_a_checkpoint_merges(tmp_path, llama_dir, fake_hub):
    cfg = _config(tmp_path, llama_dir, "run", merge=True, hub_repo="me/after", hub_private=False)
    proc = run_cli("train", cfg, env=fake_hub.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["merge"]["passed"]
    assert info["export"]["merge"]["status"] == "done" and info["export"]["push"]["status"] == "done"
    assert info["export"]["push"]["what"] == "merged" and info["export"]["push"]["repo"] == "me/after"
    pushed = fake_hub.files("me/after")
    assert pushed["model.safetensors"] == (run / "merged" / "model.safetensors").read_bytes()
    assert pushed["tokenizer.json"] == (run / "merged" / "tokenizer.json").read_bytes()
    assert not fake_hub.repos[("model", "me/after")]["private"]
    assert fake_hub.authorizations() == {f"Bearer {fake_hub.token}"}
    assert fake_hub.token not in "".join(p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file())

    # Issue 21: `merge RUN/checkpoints/step-N` was "not a run directory". The last checkpoint holds the final weights,
    # so its merge equals the run's own merge, tensor for tensor.
    proc = run_cli("merge", run / "checkpoints" / "step-0000004")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_ckpt, from_run = load_file(run / "merged-step-0000004" / "model.safetensors"), load_file(run / "merged" / "model.safetensors")
    assert from_ckpt.keys() == from_run.keys() and all((from_ckpt[k] - from_run[k]).abs().max() < 1e-6 for k in from_run)
    report = json.loads((run / "merged-step-0000004" / "merge_report.json").read_text())
    assert report["passed"] and report["checkpoint"].endswith("step-0000004")
    assert not list(run.glob("*.tmp"))  # the rebuilt adapter folder is gone
    assert run_cli("merge", run / "checkpoints" / "step-0000002").returncode == 0  # an earlier one too (it differs)
    assert load_file(run / "merged-step-0000002" / "model.safetensors")["lm_head.weight"].shape == from_run["lm_head.weight"].shape


@pytest.mark.slow
def test_failed_push_keeps_the_finished_run(tmp_path, llama_dir, fake_hub):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = _config(tmp_path, llama_dir, "run", hub_repo="me/x")
    proc = run_cli("train", cfg, env={**fake_hub.env(), "HF_ENDPOINT": dead})
    assert_user_error(proc, "push after training failed", f"cannot reach the Hugging Face Hub at {dead}",
                      "is finished and kept", f"tuneforge push {tmp_path / 'run'} --repo me/x --what adapter --private")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["export"]["push"]["status"] == "failed"
    assert dead in info["export"]["push"]["error"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_export_steps_that_cannot_run_are_refused_before_training(tmp_path, llama_dir, fake_hub):
    # GPTQModel lives in .venv-gptq only: a config asking for GPTQ here stops before anything trains.
    proc = run_cli("train", _config(tmp_path, llama_dir, "q", quantize={"bits": 4}))
    assert_user_error(proc, "export.quantize", "GPTQModel", "pip install 'tuneforge[gptq]'")
    proc = run_cli("train", _config(tmp_path, llama_dir, "h", hub_repo="me/x"), env={"HF_TOKEN": "hf_x"})  # HF_HUB_OFFLINE=1
    assert_user_error(proc, "export.hub_repo", "HF_HUB_OFFLINE")
    proc = run_cli("train", _config(tmp_path, llama_dir, "t", hub_repo="me/x"), env={**fake_hub.env(), "HF_TOKEN": "",
                                                                                      "HF_HOME": str(tmp_path / "hf")})
    assert_user_error(proc, "export.hub_repo", "no Hugging Face token")
    assert_user_error(run_cli("config", "validate", _config(tmp_path, llama_dir, "m", hub_push="merged", hub_repo="me/x")),
                      "export.hub_push: merged needs export.merge: true")
    assert not any((tmp_path / name).exists() for name in "qhtm")


def test_nothing_runs_after_an_unfinished_run(tmp_path, llama_dir):
    from test_export_merge import make_run

    from tuneforge.config import load_config
    from tuneforge.export.after import after_train

    run = make_run(tmp_path / "run", llama_dir)
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "status": "interrupted"}))
    cfg = load_config(_config(tmp_path, llama_dir, "run", merge=True), [])
    logs = []
    assert after_train(cfg, log=logs.append) is None
    assert logs == ["export: merge skipped (the run is interrupted, not finished)"] and not (run / "merged").exists()
