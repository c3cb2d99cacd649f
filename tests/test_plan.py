"""`tuneforge plan`: memory per device from the model config alone, checked against numbers computed by hand."""

import json

import pytest

from helpers import run_cli, write_config
from tuneforge.model.plan import ACT_OVERHEAD_BYTES, GiB, PlanInput, plan, shape_from_config


def llama_a():
    from transformers import LlamaConfig

    # H=64, I=128, 2 layers, 4 heads x 16, 2 kv heads (kv_dim 32), vocab 512, untied head.
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=512, tie_word_embeddings=False)


def qwen_b():
    from transformers import Qwen2Config

    # H=128, I=256, 3 layers, 8 heads x 16, 2 kv heads, vocab 1000, q/k/v biases, tied head.
    return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                       vocab_size=1000, tie_word_embeddings=True)


def test_parameter_counts_match_hand_counts():
    a = shape_from_config(llama_a())
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 MLP 64*128 + 2 norms 64
    layer_a = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128
    assert a.params == 512 * 64 + 2 * layer_a + 64 + 512 * 64 == 139584
    assert a.linear_params == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192) == 73728
    assert (a.hidden, a.layers, a.intermediate, a.kv_dim, a.vocab) == (64, 2, 128, 32, 512)
    b = shape_from_config(qwen_b())
    layer_b = (128 * 128 + 128) + 2 * (128 * 32 + 32) + 128 * 128 + 3 * 128 * 256 + 2 * 128
    assert b.params == 1000 * 128 + 3 * layer_b + 128 == 547264  # tied head counted once
    assert b.linear_params == 3 * (128 * 128 * 2 + 2 * 128 * 32 + 3 * 128 * 256)


def test_full_finetune_fp32_llama_by_hand():
    a = shape_from_config(llama_a())
    p = plan(a, PlanInput(finetune="full", weight_dtype="float32", mixed_precision="no", optimizer="adamw",
                          micro_batch_size=2, seq_len=64))
    w = 139584 * 4
    tokens = 2 * 64
    assert p.parts["weights"] == w and p.parts["gradients"] == w and p.parts["optimizer"] == 2 * w
    assert p.parts["activations"] == tokens * 2 * 4 * (12 * 64 + 2 * 32 + 4 * 128)
    assert p.parts["logits"] == tokens * 512 * 10
    assert p.peak == 4 * w + tokens * 2 * 5376 + tokens * 5120 + ACT_OVERHEAD_BYTES
    # ZeRO-3 over 4 processes: weights, gradients and optimizer state / 4, plus one gathered layer.
    z = plan(a, PlanInput(finetune="full", weight_dtype="float32", mixed_precision="no", micro_batch_size=2, seq_len=64,
                          nproc=4, sharding="zero3"))
    assert z.parts["weights"] == w / 4 + 139584 / 2 * 4 and z.parts["gradients"] == w / 4 and z.parts["optimizer"] == 2 * w / 4
    # 8-bit AdamW: two 1-byte states per parameter.
    assert plan(a, PlanInput(finetune="full", weight_dtype="float32", optimizer="adamw_8bit")).parts["optimizer"] == 2 * 139584


def test_qlora_4bit_qwen_by_hand():
    b = shape_from_config(qwen_b())
    p = plan(b, PlanInput(finetune="lora", quantize="4bit", weight_dtype="bfloat16", mixed_precision="bf16", lora_r=8,
                          micro_batch_size=1, seq_len=128, gradient_checkpointing=True))
    linear = 3 * (128 * 128 * 2 + 2 * 128 * 32 + 3 * 128 * 256)
    lora = 3 * 8 * ((128 + 128) * 2 + (128 + 32) * 2 + (128 + 256) * 3)  # r*(in+out) per adapted Linear
    assert p.trainable == lora == 47616
    # embeddings, norms and biases in fp32: peft's k-bit preparation upcasts what bitsandbytes does not quantize
    assert p.parts["weights"] == pytest.approx(linear * 4.127 / 8 + (547264 - linear) * 4 + lora * 4)
    assert p.parts["dequantized"] == 2 * (256 * 128) * 2  # the largest matrix (MLP 128x256) de-quantized, + its cast
    assert p.parts["gradients"] == lora * 4 and p.parts["optimizer"] == 2 * lora * 4
    # checkpointing: each layer's input (H bf16 per token) + one layer's full set
    assert p.parts["activations"] == 128 * (3 * 128 * 2 + 2 * (12 * 128 + 2 * 32 + 4 * 256))
    only_qv = plan(b, PlanInput(finetune="lora", lora_r=8, lora_targets=["q_proj", "v_proj"]))
    assert only_qv.trainable == 3 * 8 * ((128 + 128) + (128 + 32))


def test_seed_vram_table_7b():
    """The seed's table (LLaMA-Factory, 7B): LoRA ~16 GB, QLoRA-4 ~6 GB, full ~160 GB. Same assumptions as that
    table: gradient checkpointing on, batch 1 x 512 tokens, LoRA r8 on q/v, full = fp32 master weights + AMP."""
    from transformers import LlamaConfig

    s = shape_from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000))
    common = dict(micro_batch_size=1, seq_len=512, gradient_checkpointing=True, lora_r=8, lora_targets=["q_proj", "v_proj"])
    lora = plan(s, PlanInput(finetune="lora", **common)).peak / 1e9
    qlora = plan(s, PlanInput(finetune="lora", quantize="4bit", **common)).peak / 1e9
    full = plan(s, PlanInput(finetune="full", weight_dtype="float32", mixed_precision="bf16", **common)).peak / 1e9
    assert 16 * 0.85 <= lora <= 16 * 1.15
    assert 6 * 0.75 <= qlora <= 6 * 1.15
    assert 100 <= full <= 160  # 16 bytes/parameter = 108 GB before any activation; the table adds margin


def test_plan_cli_fits_and_suggests(tmp_path, llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    cfg = write_config(tmp_path / "c.yaml", llama_dir, data, tmp_path / "run")
    ok = run_cli("plan", cfg, "--gpu", "h100-80gb")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fits in 79.6 GiB" in ok.stdout and "peak" in ok.stdout and "time per optimizer step" in ok.stdout
    tight = run_cli("plan", cfg, "--memory", "0.8GiB", "--set", "train.finetune=full", "--set", "data.max_length=512",
                    "--set", "train.micro_batch_size=64")
    assert tight.returncode == 1, tight.stderr[-2000:]
    assert "does NOT fit" in tight.stdout and "to make it fit" in tight.stdout and "gradient_checkpointing" in tight.stdout
    bad = run_cli("plan", cfg, "--gpu", "gtx-potato")
    assert bad.returncode == 2 and "unknown --gpu" in bad.stderr


def test_train_refuses_a_run_the_plan_says_cannot_fit_on_the_gpu(tmp_path, llama_dir, monkeypatch):
    """`train` runs the plan first on a GPU (simulated here: a 64 MiB device) and refuses in one line."""
    import types

    import torch

    from tuneforge.config.load import load_config
    from tuneforge.errors import UserError
    from tuneforge.train.safety.preflight import check_plan_on_gpu

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    cfg = load_config(write_config(tmp_path / "c.yaml", llama_dir, data, tmp_path / "run"),
                      ["train.finetune=full", "train.micro_batch_size=64", "data.max_length=512"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=64 * 2**20))
    with pytest.raises(UserError, match="memory plan: .* per GPU needed, the GPU has 64.0 MiB"):
        check_plan_on_gpu(cfg)
    monkeypatch.setenv("TUNEFORGE_SKIP_PLAN", "1")
    check_plan_on_gpu(cfg)
    monkeypatch.delenv("TUNEFORGE_SKIP_PLAN")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2**30))
    check_plan_on_gpu(cfg)  # fits: silent
