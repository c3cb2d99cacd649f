"""Bin packing: every sample in exactly one bin, bins within capacity and full, training on bins takes
the same loss as on the same samples unpacked."""

import random

import pytest
import torch

import tiny
from test_invariants import recipe
from tuneforge.config.schema import DataConfig
from tuneforge.data.collate import collate
from tuneforge.data.packing import packing_stats, plan_bins
from tuneforge.errors import UserError
from tuneforge.train.core.loss import count_targets, forward_logits, summed_ce


def test_bins_hold_every_sample_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(10, 256) for _ in range(5000)]
    bins = plan_bins(lengths, 256)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(5000))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    # Best-fit decreasing is within a few % of the lower bound ceil(total / capacity).
    lower = -(-sum(lengths) // 256)
    assert len(bins) <= 1.03 * lower
    assert plan_bins(lengths, 256) == bins  # deterministic: resume sees the same bins
    stats = packing_stats(lengths, "bins", 256)
    assert stats["bins"] == len(bins) and stats["bin_fill"] == round(sum(lengths) / (256 * len(bins)), 4) > 0.96


def test_bins_exact_fit_and_oversized_sample():
    assert sorted(map(sorted, plan_bins([6, 4, 5, 5, 10], 10))) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than the bin capacity"):
        plan_bins([11], 10)


def test_packing_config_values():
    base = {"train": [{"path": "x.jsonl"}]}
    assert DataConfig.model_validate({**base, "packing": True}).packing == "padding_free"
    assert DataConfig.model_validate({**base, "packing": False}).packing == "off"
    cfg = DataConfig.model_validate({**base, "packing": "bins", "max_length": 512})
    assert cfg.bin_tokens == 512
    with pytest.raises(ValueError, match="pack_length .*must hold the longest sample"):
        DataConfig.model_validate({**base, "packing": "bins", "max_length": 512, "pack_length": 256})
    with pytest.raises(ValueError, match="pack_length applies to data.packing: bins"):
        DataConfig.model_validate({**base, "pack_length": 2048})


def test_training_on_bins_takes_the_loss_of_the_same_samples_unpacked(tmp_path, llama_dir):
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(40, seed=6))
    r = recipe(tmp_path, llama_dir, train_file, "bins", data={"max_length": 96}, packing="bins", micro_batch_size=2, grad_accum=2)
    lengths = [len(s) for s in r.data.train]
    assert len(r.batcher.units) < len(r.data.train)  # several samples per bin
    assert r.batcher.steps_per_epoch == len(r.batcher.units) // 4
    micro = [mb.rows for mb in r.batcher.step(0).micro]
    assert len(micro) == 2 and all(len(rows) == 2 for rows in micro)  # micro_batch_size bins, one row each
    assert all(sum(len(s) for s in row) <= r.cfg.data.bin_tokens for rows in micro for row in rows)
    m = r.backward_step(0)
    step_samples = [s for rows in micro for row in rows for s in row]
    assert m["tokens"] == sum(len(s) for s in step_samples) and max(lengths) <= r.cfg.data.bin_tokens
    with torch.no_grad():  # the same samples, one padded batch: same mean CE over target tokens
        b = collate([step_samples], r.tokenizer.pad_token_id, packed=False)
        padded = summed_ce(forward_logits(r.model, b), b["targets"]).item() / count_targets(b)
    assert abs(m["loss"] - padded) <= 1e-4


def test_resume_refuses_different_batching(tmp_path, llama_dir):
    from tuneforge.config.schema import Config
    from tuneforge.train.run import run, trainer

    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(24, seed=4))
    base = {"model": {"path": str(llama_dir)},
            "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache"), "packing": "bins"},
            "train": {"finetune": "lora", "max_steps": 2, "micro_batch_size": 1, "save_every": 1},
            "output": {"dir": str(tmp_path / "run")}, "tracking": {"tensorboard": False, "plot": False}}
    run(Config.model_validate(base), log=lambda *a: None)
    from tuneforge.rundir import RunDir

    RunDir(tmp_path / "run").interrupt("SIGTERM")  # a finished run is not resumable at all: make it a stopped one
    base["data"]["packing"] = "padding_free"
    with pytest.raises(UserError, match="resume needs the same batching|data.packing"):
        r = trainer(Config.model_validate(base), resume=True, log=lambda *a: None)
        r.setup()
