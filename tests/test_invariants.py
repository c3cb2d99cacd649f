"""Numbers that must not depend on a setting: masking, packing, accumulation split, resume."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tiny
from tuneforge.config.schema import Config
from tuneforge.data.collate import collate
from tuneforge.data.prepare import Sample
from tuneforge.data.render import IGNORE, encode
from tuneforge.train.core.loss import count_targets, forward_logits, summed_ce
from tuneforge.train.run import trainer


def samples(tokenizer, n=8, seed=0):
    out = []
    for row in tiny.reverse_rows(n, seed):
        _, enc = encode(tokenizer, row["messages"], "assistant", 256)
        out.append(Sample(enc.input_ids, enc.labels, row["messages"]))
    return out


def load(folder):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_masked_loss_equals_hand_computed_ce(llama_dir, tokenizer):
    model, batch_samples = load(llama_dir), samples(tokenizer)
    batch = collate([batch_samples], tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        ours = summed_ce(forward_logits(model, batch), batch["targets"]) / count_targets(batch)
        # By hand: one sample at a time, no padding; -log p(token t+1 | prefix) over assistant tokens.
        nll, count = 0.0, 0
        for s in batch_samples:
            logp = F.log_softmax(model(torch.tensor([s.input_ids])).logits[0].double(), -1)
            for t in range(len(s.input_ids) - 1):
                if s.labels[t + 1] != IGNORE:
                    nll -= logp[t, s.input_ids[t + 1]].item()
                    count += 1
    assert count == count_targets(batch) > 0
    assert abs(ours.item() - nll / count) <= 1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_equals_padded_loss(arch, tmp_path, tokenizer):
    folder = tiny.build_model(tmp_path / arch, arch)
    model, batch_samples = load(folder), samples(tokenizer, 6, seed=1)
    layouts = {
        "padded": ([batch_samples], False),
        "one packed row": ([batch_samples], True),
        "two packed rows, the shorter filled by a pad segment": ([batch_samples[:2], batch_samples[2:]], True),
    }
    losses = {}
    with torch.no_grad():
        for name, (rows, packed) in layouts.items():
            b = collate(rows, tokenizer.pad_token_id, packed)
            losses[name] = summed_ce(forward_logits(model, b), b["targets"]).item() / count_targets(b)
            assert int(b["real_tokens"]) == sum(len(s) for s in batch_samples)
    two = collate(layouts["two packed rows, the shorter filled by a pad segment"][0], tokenizer.pad_token_id, True)
    assert two["input_ids"].shape == (2, max(sum(len(s) for s in batch_samples[:2]), sum(len(s) for s in batch_samples[2:])))
    assert collate([batch_samples], tokenizer.pad_token_id, True)["input_ids"].shape == (1, sum(len(s) for s in batch_samples))
    assert all(abs(v - losses["padded"]) <= 1e-4 for v in losses.values()), losses


def recipe(tmp_path, llama_dir, train_file, name, data=None, **train):
    cfg = Config.model_validate({
        "model": {"path": str(llama_dir)},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache"),
                 "packing": train.pop("packing", True), **(data or {})},
        "train": {"finetune": "full", "lr": 1e-3, "seed": 3, **train},
        "output": {"dir": str(tmp_path / name)},
        "tracking": {"tensorboard": False, "plot": False},
    })
    r = trainer(cfg, log=lambda *a: None)
    r.setup()
    return r


@pytest.mark.parametrize("packing", [True, False])
def test_batch8_accum1_equals_batch2_accum4(tmp_path, llama_dir, packing):
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(16, seed=2))  # unequal lengths
    results = []
    for mbs, accum in ((8, 1), (2, 4)):
        r = recipe(tmp_path, llama_dir, train_file, f"run{mbs}", micro_batch_size=mbs, grad_accum=accum, packing=packing)
        m = r.backward_step(0)
        grads = {n: p.grad.clone() for n, p in r.model.named_parameters()}
        results.append((m["loss"], m["target_tokens"], grads))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2
    assert abs(l1 - l2) <= 1e-5
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) <= 1e-5


def test_resume_reproduces_uninterrupted_run(tmp_path, llama_dir):
    from tuneforge.train.run import run

    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(24, seed=4))
    base = {
        "model": {"path": str(llama_dir)},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "lora", "lr": 1e-3, "max_steps": 6, "micro_batch_size": 4, "save_every": 3, "keep_checkpoints": 3, "seed": 5},
        "lora": {"dropout": 0.1},  # dropout draws random numbers: resume must restore the RNG too
        "output": {"dir": str(tmp_path / "full")},
        "tracking": {"tensorboard": False, "plot": False},
    }
    run(Config.model_validate(base), log=lambda *a: None)
    # Simulate a crash after step 3: keep only what existed then, and resume.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-0000006")
    info = json.loads((crashed / "run_info.json").read_text())
    (crashed / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
    base["output"]["dir"] = str(crashed)
    run(Config.model_validate(base), resume=True, log=lambda *a: None)
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(crashed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(x)["step"] for x in (crashed / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated steps after resume
