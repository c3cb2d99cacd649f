"""The RunPod handler on the seed's example request, and the SkyPilot task `tuneforge launch` writes."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import assert_user_error, run_cli, write_config
from serve_helpers import make_workspace, seed_request
from tuneforge.serve.skypilot import pick_accelerator

SKY_PYTHON = os.environ.get("TUNEFORGE_SKY_PYTHON")  # an interpreter with skypilot installed (it pins an old uvicorn)


@pytest.mark.slow
def test_runpod_handler_runs_the_seed_request(tmp_path, llama_dir, monkeypatch):
    from tuneforge.serve.runpod import handler

    data = tmp_path / "volume"
    make_workspace(data, "user", llama_dir)
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(data))
    req = seed_request("rp-run")
    req["input"]["credentials"]["hf_token"] = "hf_RUNPOD_PLANTED"
    out = handler({"id": "rp-1", **req})
    assert out.get("status") == "finished", out
    assert "adapter_model.safetensors" in {Path(a).name for a in out["artifacts"]}
    assert out["summary"]["steps"] == 2 and {r["key"] for r in out["not_mapped"]} <= set(req["input"]["args"])
    for p in data.rglob("*"):
        if p.is_file():
            assert b"hf_RUNPOD_PLANTED" not in p.read_bytes(), p


def test_runpod_handler_rejects_bad_requests_with_error(tmp_path, monkeypatch):
    from tuneforge.serve.runpod import handler

    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    assert "input.args" in handler({"id": "x", "input": {"run_id": "r"}})["error"]
    assert "output.dir" in handler({"id": "x", **seed_request("r2", output_dir="/etc")})["error"]
    assert "error" in handler({"id": "x", "input": None})
    assert "user_id" in handler({"id": "x", **seed_request("r3", user="../../etc")})["error"]
    assert "config.train.save_every" in handler({"id": "x", **seed_request("r4", max_steps=10**9, save_steps=1)})["error"]
    assert "config.data.num_proc" in handler({"id": "x", **seed_request("r5", dataset_processes=1024)})["error"]
    assert not (tmp_path / "jobs").exists()  # refused before anything was written or run
    assert not (tmp_path.parent / "etc").exists()


def test_accelerator_follows_the_plan():
    assert pick_accelerator(10 * 2**30)[0] == "L4:1"
    assert pick_accelerator(30 * 2**30)[0] == "A100:1"
    assert pick_accelerator(60 * 2**30)[0] == "A100-80GB:1"
    assert pick_accelerator(200 * 2**30)[0] == "H100:8"


def test_launch_writes_a_valid_skypilot_task(tmp_path, llama_dir):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    cfg = write_config(tmp_path / "job.yaml", llama_dir, train, tmp_path / "run")
    proc = run_cli("launch", cfg, "--on", "skypilot", "--dry-run", env={"HF_TOKEN": "hf_SKY_PLANTED"})
    assert proc.returncode == 0, proc.stderr
    task_path = tmp_path / "job.sky.yaml"
    text = task_path.read_text()
    assert "hf_SKY_PLANTED" not in text
    task = yaml.safe_load(text)
    # the documented task schema (docs.skypilot.co "YAML spec"): these keys and types
    assert set(task) <= {"name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run"}
    assert task["resources"]["accelerators"] == "L4:1"  # the tiny model's plan fits the smallest GPU
    assert task["run"].startswith("tuneforge train ") and "pip install" in task["setup"]
    assert task["secrets"] == {"HF_TOKEN": None, "WANDB_API_KEY": None}
    assert str(cfg.resolve()) in task["file_mounts"].values() and str(train.resolve()) in task["file_mounts"]
    if SKY_PYTHON:  # SkyPilot's own parser, when an interpreter with skypilot is given
        check = subprocess.run([SKY_PYTHON, "-c", f"import sky; t = sky.Task.from_yaml({str(task_path)!r}); print(t.run)"],
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stderr[-2000:]
        assert "tuneforge train" in check.stdout


def test_launch_mounts_relative_inputs_where_the_mounted_config_finds_them(tmp_path, llama_dir):
    """The config travels as written; SkyPilot runs the task from the home folder, so a relative input is mounted
    under ~/ at the same relative path, an absolute one at its own path (issue 21: they disagreed)."""
    import shutil

    (tmp_path / "data").mkdir()
    rows = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    (tmp_path / "data" / "train.jsonl").write_text(rows)
    shutil.copytree(llama_dir, tmp_path / "models" / "tiny")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": "models/tiny"}, "data": {"train": [{"path": "./data/train.jsonl"}],
                                   "eval": [{"path": str(tmp_path / "data" / "train.jsonl")}]},
                                   "train": {"max_steps": 2}, "output": {"dir": "runs/sky"}}))
    proc = run_cli("launch", "job.yaml", "--on", "skypilot", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    task = yaml.safe_load((tmp_path / "job.sky.yaml").read_text())
    mounts = task["file_mounts"]
    assert mounts["~/data/train.jsonl"] == str((tmp_path / "data" / "train.jsonl").resolve())
    assert mounts["~/models/tiny"] == str((tmp_path / "models" / "tiny").resolve())
    assert mounts[str(tmp_path / "data" / "train.jsonl")] == str((tmp_path / "data" / "train.jsonl").resolve())
    assert mounts[task["run"].split()[2]] == str(cfg.resolve())  # the config it runs is the one mounted
    assert set(mounts) == {"~/tuneforge-task/config.yaml", "~/data/train.jsonl", "~/models/tiny",
                           str(tmp_path / "data" / "train.jsonl")}
    # a path that leads above the launch folder has no place on the machine: refused in one line
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "job.yaml").write_text(cfg.read_text().replace("./data/train.jsonl", "../data/train.jsonl")
                                               .replace("models/tiny", "../models/tiny"))
    assert_user_error(run_cli("launch", "job.yaml", "--on", "skypilot", "--dry-run", cwd=tmp_path / "sub"),
                      "model.path", "above the home folder")
    assert not (tmp_path / "sub" / "job.sky.yaml").exists()


def test_launch_without_skypilot_says_how(tmp_path, monkeypatch):
    from tuneforge.errors import UserError
    from tuneforge.serve.skypilot import launch_task

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="pip install"):
        launch_task(tmp_path / "job.sky.yaml", print)
    proc = run_cli("launch", tmp_path / "missing.yaml", "--on", "k8s")
    assert_user_error(proc, "skypilot")


def test_launch_mounts_every_local_input_the_schema_marks(tmp_path):
    """lora.init_from and a DeepSpeed JSON are inputs too: found from the schema's PathField markers, not a list."""
    from tuneforge.config.schema import Config
    from tuneforge.serve.skypilot import input_mounts

    (tmp_path / "adapter").mkdir()
    (tmp_path / "ds.json").write_text("{}")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    raw = {"model": {"path": "org/model"}, "data": {"train": [{"path": str(tmp_path / "a.jsonl")}]},
           "lora": {"init_from": str(tmp_path / "adapter")}, "train": {"deepspeed": str(tmp_path / "ds.json")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    mounts = input_mounts(Config.model_validate(raw), tmp_path / "c.yaml")
    assert sorted(mounts.values()) == sorted(str((tmp_path / n).resolve()) for n in ("a.jsonl", "adapter", "ds.json"))
