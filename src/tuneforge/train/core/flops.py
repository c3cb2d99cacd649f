"""Model FLOPs per trained token and device peaks, for MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s / device peak FLOP/s. Model FLOPs follow the PaLM appendix convention:
a token costs 2 FLOPs per matmul weight forward and 4 backward (6N), plus attention scores and
values, 12 * layers * hidden * seq_len per token. Recomputation from gradient checkpointing is not
counted (that would be hardware FLOPs, not model FLOPs). With frozen weights (LoRA, freeze) the
backward still computes activation gradients (2N) but no weight gradients for them.
"""

from __future__ import annotations

import os

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, no sparsity). Matched by substring of the
# device name, most specific first; TUNEFORGE_PEAK_TFLOPS overrides (e.g. for a measured matmul peak).
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0),
    ("A10G", 125.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
    ("MI300X", 1307.0), ("MI250X", 383.0),
]


def matmul_params(cfg) -> int:
    """Weights that take part in a matmul per token: every layer's linear weights plus the LM head.

    From the config alone (no weights loaded): attention q/k/v/o, the gated MLP, and the vocab projection.
    The input embedding is a lookup, not a matmul, so it is not counted.
    """
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    attn = h * head_dim * heads * 2 + h * head_dim * kv * 2  # q, o + k, v
    mlp = 3 * h * cfg.intermediate_size  # gate, up, down
    return cfg.num_hidden_layers * (attn + mlp) + h * cfg.vocab_size


def flops_per_token(cfg, seq_len: float, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs for one token of a sample of `seq_len` tokens (packed rows: the mean sample length,
    since attention stays inside each sample)."""
    n = matmul_params(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn_width = cfg.num_attention_heads * head_dim
    # forward 2N + activation-grad 2N always; weight grads 2N only for trained weights.
    dense = (4 + 2 * trainable_fraction) * n
    # Scores QK^T and weighted values: 2 matmuls x 2 FLOPs x seq_len x width, x3 for fwd+bwd. Like PaLM and
    # torchtitan we count the causal mask's skipped half too, so our MFU compares with theirs.
    attention = 12 * cfg.num_hidden_layers * attn_width * seq_len
    return dense + attention


def device_peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a device by name, or None if unknown (MFU is then not reported)."""
    override = os.environ.get("TUNEFORGE_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if not device_name:
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, per_token_flops: float, peak_flops: float | None, devices: int = 1) -> float | None:
    """Fraction of the devices' peak spent on model FLOPs (None when the peak is unknown)."""
    if not peak_flops:
        return None
    return tokens_per_s * per_token_flops / (peak_flops * devices)


def run_flops(model, mean_sample_len: float) -> tuple[float, float | None]:
    """(model FLOPs per trained token, device peak FLOP/s or None) for a training run's MFU log."""
    import torch

    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad) / max(1, sum(p.numel() for p in params))
    per_token = flops_per_token(model.config, mean_sample_len, trainable)
    return per_token, device_peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def mean_length(items, default: float) -> float:
    """Mean tokens per training item (what attention spans in a packed row); `default` for items without a length."""
    try:
        return sum(len(x) for x in items) / len(items) if len(items) else default
    except TypeError:
        return default
