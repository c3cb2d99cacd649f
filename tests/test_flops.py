"""MFU accounting from the config alone, checked against hand-computed numbers."""

from transformers import LlamaConfig, Qwen2Config

from tuneforge.train.core.flops import device_peak_flops, flops_per_token, matmul_params, mfu

LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
QWEN25_1_5B = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, vocab_size=151936)


def test_matmul_params_match_known_model_sizes():
    # Llama-2-7B: 6.74B parameters minus the 131M-parameter input embedding (norms are ~0.3M).
    assert matmul_params(LLAMA2_7B) == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000 == 6_607_077_376
    # Qwen2.5-1.5B (GQA: k/v are 2 heads of 128): hand count.
    per_layer = 1536 * 1536 * 2 + 1536 * 256 * 2 + 3 * 1536 * 8960
    assert matmul_params(QWEN25_1_5B) == 28 * per_layer + 1536 * 151936


def test_flops_per_token_full_and_frozen():
    n = matmul_params(LLAMA2_7B)
    attn = 12 * 32 * 4096 * 2048
    assert flops_per_token(LLAMA2_7B, 2048) == 6 * n + attn
    assert flops_per_token(LLAMA2_7B, 2048, trainable_fraction=0.0) == 4 * n + attn  # LoRA: no frozen weight grads


def test_mfu_from_device_table_and_override(monkeypatch):
    monkeypatch.delenv("TUNEFORGE_PEAK_TFLOPS", raising=False)
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("cpu") is None and mfu(1000.0, 1e9, None) is None
    monkeypatch.setenv("TUNEFORGE_PEAK_TFLOPS", "790")
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 790e12
    # The measured H100 point: 22,853 tok/s of a 1.54B model at 6N -> ~26.8% of 790 TFLOP/s.
    assert abs(mfu(22853, 6 * 1.54e9, 790e12) - 0.267) < 0.002


def test_training_logs_mfu_when_the_device_peak_is_known(tmp_path, llama_dir, monkeypatch):
    """With a known peak (the override), each logged step carries mfu = tokens/s x FLOPs/token / peak."""
    import json

    import tiny
    from test_invariants import recipe

    monkeypatch.setenv("TUNEFORGE_PEAK_TFLOPS", "0.001")  # 1 GFLOP/s: a CPU-sized peak, so the number is visible
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(16, seed=7))
    r = recipe(tmp_path, llama_dir, train_file, "mfu", micro_batch_size=4, max_steps=2)
    assert r.peak_flops == 1e9
    per_token = flops_per_token(r.model.config, sum(len(s) for s in r.data.train) / len(r.data.train), 1.0)
    assert abs(r.flops_per_token - per_token) < 1e-6 * per_token
    r.train()
    rows = [json.loads(line) for line in (r.run.root / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        assert abs(row["mfu"] - round(row["tokens_per_s"] * per_token / 1e9, 4)) <= 1e-4
