"""The run directory and checkpoints of the training core: status transitions, checkpoint layout, failures."""

import json

import pytest
from safetensors.torch import load_file

import tiny
from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.rundir import RunDir
from tuneforge.train.recipes.sft import SFTRecipe
from tuneforge.train.run import run

QUIET = {"log": lambda *a: None}


def config(tmp_path, llama_dir, out="run", **train):
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(24, seed=4))
    return Config.model_validate({
        "model": {"path": str(llama_dir)},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "lora", "lr": 1e-3, "max_steps": 2, "micro_batch_size": 4, **train},
        "output": {"dir": str(tmp_path / out)},
        "tracking": {"tensorboard": False, "plot": False},
    })


def test_lora_checkpoint_holds_only_adapter_weights_and_state(tmp_path, llama_dir):
    run(config(tmp_path, llama_dir, save_every=2), **QUIET)
    rd = RunDir(tmp_path / "run")
    ckpt = rd.latest_checkpoint()
    assert ckpt == rd.checkpoint(2) and not list(rd.checkpoints.glob(".*.tmp"))
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer.json"} <= names
    weights = load_file(ckpt / "model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # the adapter, not the 1000x larger base
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 2 and meta["data_fingerprint"] == rd.info()["data_fingerprint"] and "mbs=4" in meta["batching"]
    info = rd.info()
    assert info["status"] == "finished" and info["error"] is None and info["recipe"] == "sft"
    final = load_file(rd.final / "adapter_model.safetensors")
    assert final.keys() and all("lora_" in k for k in final)


class Boom(SFTRecipe):
    def loss(self, model, batch):
        if self.ctx.optimizer.state and len(self.ctx.tracker.path.read_text().splitlines()) >= 1:
            raise RuntimeError("boom at step 2\nsecond line")
        return super().loss(model, batch)


def test_a_run_that_dies_ends_failed_with_one_line_reason(tmp_path, llama_dir):
    with pytest.raises(RuntimeError, match="boom"):
        run(config(tmp_path, llama_dir, max_steps=4), recipe=Boom(), **QUIET)
    info = RunDir(tmp_path / "run").info()
    assert info["status"] == "failed" and info["error"] == "RuntimeError: boom at step 2"


def test_refusal_before_start_keeps_status(tmp_path, llama_dir):
    run(config(tmp_path, llama_dir, save_every=1), **QUIET)
    RunDir(tmp_path / "run").interrupt("SIGTERM")  # as if stopped before its end
    changed = config(tmp_path, llama_dir, save_every=1, micro_batch_size=2)
    with pytest.raises(UserError, match="--resume: .*micro_batch_size"):  # refused before anything loads
        run(changed, resume=True, **QUIET)
    assert RunDir(tmp_path / "run").status == "interrupted"  # a refused resume does not mark the run failed


def test_rundir_status_transitions(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.status is None
    rd.start(total_steps=3)
    assert rd.status == "running"
    rd.fail(ValueError("bad value\nmore"))
    assert rd.info()["error"] == "ValueError: bad value"
    rd.fail(UserError("data.train: missing file (check the path)"))
    assert rd.info()["error"] == "data.train: missing file (check the path)"
    rd.start()
    rd.interrupt("SIGTERM")
    assert rd.status == "interrupted" and rd.info()["error"] == "SIGTERM" and rd.info()["total_steps"] == 3
