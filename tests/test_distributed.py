"""Engines with 2 processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 / ZeRO-3 give the weights of one process
with the same global batch; ZeRO-3 resumes and writes a consolidated model that plain transformers loads;
torch FSDP2 shards on CPU and consolidates to a loadable model. Plus the cheap checks (presets, errors,
launcher environment, data prepared once).

The first DeepSpeed run on a machine JIT-compiles its CPU shared-memory collective (~1.5-3 min, cached in
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): cache that folder in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import tiny
from helpers import assert_user_error, run_cli

STEPS = 3
TOL = 1e-5
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """A tiny Llama, 64 reverse-the-letters rows, and the one-process reference run (global batch 4)."""
    root = tmp_path_factory.mktemp("dist")
    model = tiny.build_model(root / "llama", "llama")
    data = tiny.write_jsonl(root / "train.jsonl", tiny.reverse_rows(64))
    cfg = {
        "model": {"path": str(model)},
        # 5 eval rows: eval is sharded 3 + 2 over 2 processes (a dummy batch keeps ZeRO-3 ranks in step).
        "data": {"train": [{"path": str(data)}], "eval_size": 5, "cache_dir": str(root / "cache")},
        # constant lr: a run that stops at step 2 and resumes to 3 follows the same schedule as one that runs 3.
        "train": {"finetune": "full", "max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3,
                  "lr_scheduler": "constant", "seed": 3, "generate_eval": {"samples": 2, "max_new_tokens": 4}},
        "output": {"dir": str(root / "runs" / "one")},
        "tracking": {"tensorboard": False, "plot": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _train(path, [])
    return root, path


def _train(config: Path, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    args = ["train", config, *extra]
    for s in sets:
        args += ["--set", s]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _two_process_run(root: Path, config: Path, name: str, sets: list[str], *extra: str) -> Path:
    out = root / "runs" / name
    _train(config, [f"output.dir={out}", *sets], "--nproc", "2", *extra)
    info = json.loads((out / "run_info.json").read_text())
    assert info["processes"] == 2
    if info["summary"]["steps"] == STEPS:  # sharded eval loss == one process's
        ref = json.loads((root / "runs" / "one" / "run_info.json").read_text())["summary"]["eval_loss"]
        assert abs(info["summary"]["eval_loss"] - ref) <= TOL
    return out


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(dist_runs):
    root, config = dist_runs
    # 2 processes x micro-batch 2 x accum 1 == 1 process x micro-batch 2 x accum 2: the same 4 samples per step.
    out = _two_process_run(root, config, "ddp", ["train.grad_accum=1"])
    ref, got = _weights(root / "runs" / "one"), _weights(out)
    assert _max_diff(ref, got) <= TOL
    assert _max_diff(ref, tiny_init(root)) > 1e-4  # it trained


def tiny_init(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "llama" / "model.safetensors")


@pytest.mark.slow
@needs_deepspeed
def test_zero2_two_processes_equal_one_process(dist_runs):
    root, config = dist_runs
    out = _two_process_run(root, config, "zero2", ["train.grad_accum=1", "train.deepspeed=zero2"])
    assert _max_diff(_weights(root / "runs" / "one"), _weights(out)) <= TOL


@pytest.mark.slow
@needs_deepspeed
def test_zero3_resumes_and_writes_a_consolidated_model(dist_runs):
    """ZeRO-3, micro-batch 1 x accum 2 per process (accumulation boundaries inside DeepSpeed), stopped after
    step 2, resumed from its sharded checkpoint to step 3: the consolidated final model loads in plain
    transformers and equals the uninterrupted one-process run."""
    import torch
    from transformers import AutoModelForCausalLM

    root, config = dist_runs
    sets = ["train.micro_batch_size=1", "train.deepspeed=zero3", "train.save_every=2"]
    out = _two_process_run(root, config, "zero3", [*sets, "train.max_steps=2"])
    ckpt = out / "checkpoints" / "step-0000002"
    assert (ckpt / "trainer.json").is_file() and (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own shards
    proc = _train(config, [f"output.dir={out}", *sets, f"train.max_steps={STEPS}"], "--nproc", "2", "--resume")
    assert "resumed from" in proc.stderr + proc.stdout
    info = json.loads((out / "run_info.json").read_text())
    assert info["status"] == "finished" and info["summary"]["steps"] == STEPS
    one = root / "runs" / "one"
    assert abs(info["summary"]["eval_loss"] - json.loads((one / "run_info.json").read_text())["summary"]["eval_loss"]) <= TOL
    # Greedy generation ran on both ranks in step (ZeRO-3 gathers weights collectively) and answers the same.
    answers = lambda run: [e["prediction"] for e in json.loads((run / "generate_eval_after.json").read_text())["examples"]]  # noqa: E731
    assert answers(out) == answers(one)

    ref = _weights(root / "runs" / "one")
    assert _max_diff(ref, _weights(out)) <= TOL
    # Plain transformers, no tuneforge, no DeepSpeed: same logits as the reference model.
    a = AutoModelForCausalLM.from_pretrained(root / "runs" / "one" / "final").eval()
    b = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() <= 1e-4


FSDP2_SCRIPT = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
# The wrap accelerate's FSDP2 plugin uses (transformer_based_wrap): each decoder layer, then the root.
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert any(p.to_local().numel() < p.numel() for p in model.parameters())  # really sharded
train_steps(model, batches(rank, world), world)
# What accelerate's get_state_dict does for FSDP2: gather the full state dict (on CPU) on every rank.
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], state_dict=state)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_torch_fsdp2_on_cpu_shards_and_consolidates(dist_runs, tmp_path):
    """accelerate runs FSDP only on GPUs (train.fsdp on CPU is refused); this pins the mechanism its FSDP2
    path relies on (fully_shard per decoder layer + full state dict) with gloo on this torch version."""
    import torch
    from transformers import AutoModelForCausalLM

    root, _ = dist_runs
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_HELPERS + FSDP2_SCRIPT)  # batches(), train_steps() shared with the reference below
    out = tmp_path / "fsdp2_final"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(root / "llama"), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    ns: dict = {}
    exec(FSDP2_HELPERS, ns)  # the same batches and steps, one process, no sharding
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(root / "llama")
    ns["train_steps"](ref, ns["batches"](0, 1), 1)
    got = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    diff = max((p - q).abs().max().item() for p, q in zip(ref.state_dict().values(), got.state_dict().values()))
    assert diff <= TOL
    assert (got.model.embed_tokens.weight - tiny_load(root)).abs().max().item() > 1e-4  # it trained


def tiny_load(root: Path):
    return tiny_init(root)["model.embed_tokens.weight"]


FSDP2_HELPERS = r'''
import torch

def batches(rank, world, steps=2, global_batch=4, length=16):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        ids = torch.randint(5, 300, (global_batch, length), generator=g)
        per = global_batch // world
        out.append(ids[rank * per:(rank + 1) * per])
    return out

def train_steps(model, steps, world):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for ids in steps:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        # summed CE / global token count; FSDP averages gradients over ranks, so x world makes it a sum
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (loss * world / (ids[:, 1:].numel() * world)).backward()
        opt.step()
        opt.zero_grad()
'''


# ---- cheap checks (no extra processes) -------------------------------------------------------------
def test_presets_fill_the_keys_tuneforge_owns():
    from tuneforge.config.schema import DEEPSPEED_PRESETS, TrainConfig
    from tuneforge.train.core.engines import deepspeed_config

    for name in DEEPSPEED_PRESETS:
        t = TrainConfig(deepspeed=name, micro_batch_size=3, grad_accum=5, max_grad_norm=0.5)
        ds = deepspeed_config(t, "bf16", cuda=False)
        zero = ds["zero_optimization"]
        assert zero["stage"] == int(name[4])
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (3, 5, 0.5)
        assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "train_batch_size" not in ds
        assert ds["zero_force_ds_cpu_optimizer"] is False  # our torch optimizer, no JIT-built DeepSpeedCPUAdam
        assert ("offload" in name) == ("offload_optimizer" in zero)
        assert all(not zero[k]["pin_memory"] for k in ("offload_optimizer", "offload_param") if k in zero)  # no GPU
        if zero["stage"] == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # else the final model is empty
    assert deepspeed_config(TrainConfig(deepspeed="zero3_offload"), "no", cuda=True)["zero_optimization"]["offload_param"]["pin_memory"]


def test_user_deepspeed_json(tmp_path):
    from tuneforge.config.schema import TrainConfig
    from tuneforge.errors import UserError
    from tuneforge.train.core.engines import deepspeed_config

    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    ds = deepspeed_config(TrainConfig(deepspeed=str(own), micro_batch_size=2), "no", cuda=False)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["train_micro_batch_size_per_gpu"] == 2
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=8 but the tuneforge config gives 2"):
        deepspeed_config(TrainConfig(deepspeed=str(own), micro_batch_size=2), "no", cuda=False)
    own.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        deepspeed_config(TrainConfig(deepspeed=str(own)), "no", cuda=False)
    own.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(UserError, match="stage must be 1, 2 or 3"):
        deepspeed_config(TrainConfig(deepspeed=str(own)), "no", cuda=False)


def test_engine_errors_are_one_line_before_any_process(tmp_path, llama_dir):
    from helpers import write_config

    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.reverse_rows(8))
    cfg = write_config(tmp_path / "c.yaml", llama_dir, data, tmp_path / "run")
    if not _cuda():
        assert_user_error(run_cli("train", cfg, "--set", "train.fsdp=true"), "train.fsdp", "GPUs only")
    assert_user_error(run_cli("train", cfg, "--set", f"train.deepspeed={tmp_path / 'missing.json'}"), "neither a preset")
    assert_user_error(run_cli("train", cfg, "--set", "train.deepspeed=zero9"), "not a preset")
    assert_user_error(run_cli("train", cfg, "--set", "train.deepspeed=zero2", "--set", "train.fsdp=true"), "pick one engine")
    assert_user_error(run_cli("train", cfg, "--set", "model.quantize=4bit", "--set", "train.deepspeed=zero3"), "is not supported")
    assert not (tmp_path / "run").exists()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def test_launcher_sets_the_rank_variables(monkeypatch):
    from tuneforge.train.core import launch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = [launch.rank_env(r, 2, 12345) for r in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_PORT"]) for e in envs] == [("0", "0", "2", "12345"), ("1", "1", "2", "12345")]
    assert int(envs[0]["OMP_NUM_THREADS"]) >= 1
    assert launch.train_args(Path("c.yaml"), ["a=1", "b=2"], True) == ["train", "c.yaml", "--set", "a=1", "--set", "b=2", "--resume"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.launched()
    from tuneforge.errors import UserError

    with pytest.raises(UserError, match="already started by a launcher"):
        launch.check_launchable(2)


def test_launcher_returns_the_ranks_exit_code(tmp_path):
    from tuneforge.train.core import launch

    code = launch.launch(2, ["train", str(tmp_path / "missing.yaml")], log=lambda *a: None)
    assert code == 2  # a user error in the ranks stays exit 2


def test_other_ranks_wait_for_the_cache_file_not_a_collective(tmp_path, tokenizer):
    """Rank 1 polls for the main process's cache (no barrier, so no collective timeout however long it takes)."""
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.prepare import cache_path, data_fingerprint, prepare
    from tuneforge.train.core.launch import prepare_once

    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.reverse_rows(16))
    dcfg = DataConfig(train=[{"path": str(data)}], eval_split=0.0, cache_dir=str(tmp_path / "cache"))

    class Rank:
        def __init__(self, main):
            self.is_main_process, self.process_index = main, 0 if main else 1

    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("data", prepare_once(Rank(False), dcfg, tokenizer)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not cache_path(dcfg, data_fingerprint(dcfg, tokenizer)).exists()  # still waiting
    main = prepare_once(Rank(True), dcfg, tokenizer)
    waiter.join(timeout=60)
    assert got["data"].cache_hit and got["data"].fingerprint == main.fingerprint
    assert [s.input_ids for s in got["data"].train] == [s.input_ids for s in prepare(dcfg, tokenizer).train]


@pytest.mark.skipif(not _cuda() or _gpus() < 2, reason="needs 2 CUDA GPUs (FSDP through accelerate)")
def test_fsdp2_through_accelerate_on_gpus(dist_runs):
    root, config = dist_runs
    out = _two_process_run(root, config, "fsdp2", ["train.grad_accum=1", "train.fsdp=true", "train.mixed_precision=no"])
    assert _max_diff(_weights(root / "runs" / "one"), _weights(out)) <= 1e-4  # GPU kernels differ from CPU
