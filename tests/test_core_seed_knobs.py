"""Training keys other tools' users bring (saves/evals per epoch, adam_epsilon, eval batch size,
group_by_length, a DeepSpeed JSON with its own optimizer and scheduler), and what a plain run shows and loads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from tuneforge.config.load import validate
from tuneforge.config.schema import Config, TrainConfig
from tuneforge.errors import UserError
from tuneforge.train.run import run, trainer

QUIET = {"log": lambda *a, **k: None}
BASE = {"model": {"path": "m"}, "data": {"train": [{"path": "t.jsonl"}], "eval_size": 2}}
# The DeepSpeed JSON of HF-Trainer-style guides (Finetune_LLMs' ds_config_stage3.json): own optimizer and scheduler, "auto".
SEED_DS = json.loads((Path(__file__).parent / "data" / "seeds_002_ds_config_stage3.json").read_text())


@pytest.mark.parametrize("train,needle", [
    ({"saves_per_epoch": 2, "save_every": 5}, "train.saves_per_epoch and train.save_every both set"),
    ({"evals_per_epoch": 2, "eval_every": 5}, "train.evals_per_epoch and train.eval_every both set"),
    ({"adam_epsilon": 1e-6, "optimizer": "sgd"}, "adam_epsilon applies to the AdamW optimizers"),
])
def test_conflicting_knobs_are_one_line(train, needle):
    with pytest.raises(UserError) as err:
        validate({**BASE, "train": train})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_group_by_length_with_bins_is_refused():
    with pytest.raises(UserError, match="group_by_length means nothing with data.packing: bins"):
        validate({**BASE, "data": {**BASE["data"], "packing": "bins"}, "train": {"group_by_length": True}})


def test_adam_epsilon_reaches_the_optimizer():
    from tuneforge.train.core.optim import build_optimizer

    net = torch.nn.Linear(4, 4)
    assert build_optimizer(net, TrainConfig()).defaults["eps"] == 1e-8
    assert build_optimizer(net, TrainConfig(adam_epsilon=1e-5)).defaults["eps"] == 1e-5


def test_seed_style_deepspeed_json_resolves_its_own_sections(tmp_path):
    from tuneforge.train.core.engines import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(SEED_DS))
    t = TrainConfig(deepspeed=str(path), lr=3e-4, betas=(0.9, 0.95), adam_epsilon=1e-6, weight_decay=0.01)
    ds = deepspeed_config(t, "no", cuda=False)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True}
    assert ds["scheduler"]["params"]["warmup_min_lr"] == 0.0 and ds["scheduler"]["params"]["warmup_max_lr"] == 3e-4
    assert ds["train_micro_batch_size_per_gpu"] == t.micro_batch_size and ds["gradient_clipping"] == 1.0
    assert "torch_adam" not in deepspeed_config(t, "no", cuda=True)["optimizer"]["params"]  # DeepSpeed's own Adam on GPUs
    refusals = [
        (TrainConfig(deepspeed=str(path), optimizer="adafactor"), "train.optimizer both choose the optimizer"),
        (TrainConfig(deepspeed=str(path), lr_scheduler="linear"), "train.lr_scheduler both choose the schedule"),
    ]
    for cfg, needle in refusals:
        with pytest.raises(UserError, match=needle):
            deepspeed_config(cfg, "no", cuda=False)
    for change, needle in (({"optimizer": {"type": "Lamb", "params": {}}}, "'Lamb' needs a GPU"),
                           ({"optimizer": None}, "scheduler section but no optimizer section"),
                           ({"scheduler": {"type": "Cosine"}}, "not one of DeepSpeed's")):
        path.write_text(json.dumps({k: v for k, v in {**SEED_DS, **change}.items() if v is not None}))
        with pytest.raises(UserError, match=needle):
            deepspeed_config(TrainConfig(deepspeed=str(path)), "no", cuda=False)


def config(tmp_path, model, rows, name, data=None, **train) -> Config:
    return Config.model_validate({
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(tiny.write_jsonl(tmp_path / f"{name}.jsonl", rows))}], "eval_size": 4,
                 "cache_dir": str(tmp_path / "cache"), **(data or {})},
        "train": {"micro_batch_size": 2, "lr": 1e-3, "seed": 1, **train},
        "output": {"dir": str(tmp_path / name)},
        "tracking": {"tensorboard": False, "plot": False},
    })


def test_per_epoch_knobs_become_steps_and_eval_uses_its_batch_size(tmp_path, llama_dir):
    lines = []
    summary = run(config(tmp_path, llama_dir, tiny.reverse_rows(20, seed=3), "per_epoch", saves_per_epoch=2, evals_per_epoch=4,
                         keep_checkpoints=5), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    rows = [json.loads(x) for x in (tmp_path / "per_epoch" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6, 8]  # 16 samples / 2 = 8 steps per epoch; the end evaluates too
    assert sorted(p.name for p in (tmp_path / "per_epoch" / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert [x for x in lines if "per_epoch" in x] == ["train.saves_per_epoch: 2 -> save_every 4 (8 steps per epoch)",
                                                     "train.evals_per_epoch: 4 -> eval_every 2 (8 steps per epoch)"]
    assert summary["data"] == {"truncated": 0, "skipped_rows": 0}

    r = trainer(config(tmp_path, llama_dir, tiny.reverse_rows(20, seed=3), "eval_mbs", {"packing": "off"}, eval_micro_batch_size=3,
                       max_steps=1), **QUIET)
    r.setup()
    sizes = []
    hook = r.model.register_forward_hook(lambda m, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    r.recipe.evaluate()
    hook.remove()
    assert r.eval_batch_size == 3 and sizes == [3, 1]  # 4 eval rows in forwards of 3 (micro_batch_size is 2)


@pytest.mark.slow
def test_plain_lora_run_loads_no_deepspeed_and_shows_progress_and_data_counts(tmp_path, llama_dir):
    rows = tiny.reverse_rows(24, seed=2) + [{"messages": "not a list"}]  # one bad row, skipped
    data = tiny.write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({
        "model": {"path": str(llama_dir)},
        "data": {"train": [{"path": str(data)}], "eval_size": 4, "cache_dir": str(tmp_path / "cache"), "max_length": 20, "on_bad_row": "skip"},
        "train": {"finetune": "lora", "max_steps": 2, "micro_batch_size": 4, "generate_eval": {"samples": 2, "max_new_tokens": 2}},
        "output": {"dir": str(tmp_path / "run")}, "tracking": {"tensorboard": False, "plot": False}}))
    code = ("import runpy, sys\nsys.argv = ['tuneforge', 'train', sys.argv[1]]\n"
            "try:\n    runpy.run_module('tuneforge', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('DEEPSPEED_LOADED', 'deepspeed' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "DEEPSPEED_LOADED False" in out and "Setting accelerator" not in out
    assert re.search(r"generate_eval \(before\): started \(\d to do\)", out)  # piped: a start line, then one every ~10 s
    assert re.search(r"generate_eval \(after\): done, (\d)/\1 in \d+ s", out)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["truncated"] > 0 and sum(report["skipped"].values()) == 1
    table = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in proc.stdout.splitlines() if line.count("│") >= 3}
    assert table["samples truncated to data.max_length"] == str(report["truncated"])
    assert table["bad rows skipped (data.on_bad_row: skip)"] == "1"
