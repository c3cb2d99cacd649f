"""The chunked loss equals the plain fp32 cross-entropy in value and gradient, in less memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tuneforge.data.render import IGNORE
from tuneforge.train.core.loss import reference_ce, summed_ce


def _case(n=37, v=101, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (2, n), generator=g)
    targets[torch.rand(2, n, generator=g) < 0.3] = IGNORE  # prompt / padding positions
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_equals_reference_value_and_gradient(smoothing, chunk):
    logits, targets = _case()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = summed_ce(a, targets, smoothing, chunk=chunk)
    ref = reference_ce(b, targets, smoothing)
    (ours * 0.5).backward()  # a non-unit upstream gradient, as the step's 1/n_targets scale gives
    (ref * 0.5).backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    assert (a.grad[targets == IGNORE] == 0).all()  # masked positions get no gradient


def test_bf16_logits_keep_their_dtype_and_match_within_bf16():
    logits, targets = _case(dtype=torch.bfloat16)
    a = logits.clone().requires_grad_()
    ours = summed_ce(a, targets)
    ours.backward()
    assert a.grad.dtype == torch.bfloat16  # the gradient buffer is never fp32
    ref = reference_ce(logits.float(), targets)
    assert abs(ours.item() - ref.item()) <= 1e-4 * abs(ref.item())


def test_all_ignored_is_zero_with_zero_grad():
    logits, targets = _case()
    targets[:] = IGNORE
    a = logits.clone().requires_grad_()
    out = summed_ce(a, targets)
    out.backward()
    assert out.item() == 0.0 and a.grad.abs().sum().item() == 0.0


PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys, torch
    from transformers import LlamaConfig, AutoModelForCausalLM
    from tuneforge.train.core.loss import reference_ce, summed_ce

    def status(key):  # KiB, from the kernel's accounting of this process
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 1024))
    targets = torch.roll(ids, -1, 1)
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: imports and init do not count
    base = status("VmRSS")
    logits = model(input_ids=ids, use_cache=False).logits
    loss = (summed_ce if sys.argv[1] == "chunked" else reference_ce)(logits, targets)
    loss.backward()
    print(json.dumps({"extra_kib": status("VmHWM") - base, "loss": loss.item()}))
""")



@pytest.mark.slow
def test_chunked_loss_peak_memory_drops_by_at_least_the_fp32_logits():
    """One training step of a vocab-128k tiny model: peak RSS falls by >= one (tokens, vocab) fp32 buffer."""
    runs = {}
    for kind in ("reference", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind], capture_output=True, text=True, check=True)
        runs[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_fp32_kib = 1024 * 128256 * 4 / 1024
    saved = runs["reference"]["extra_kib"] - runs["chunked"]["extra_kib"]
    assert abs(runs["reference"]["loss"] - runs["chunked"]["loss"]) <= 1e-5 * runs["reference"]["loss"]
    assert saved >= logits_fp32_kib, (runs, logits_fp32_kib)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_linear_equals_reference_value_and_gradients(smoothing):
    from tuneforge.train.core.loss import fused_linear_ce

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 23, 16, generator=g)
    weight = torch.randn(97, 16, generator=g) * 0.5
    targets = torch.randint(0, 97, (2, 23), generator=g)
    targets[:, :5] = IGNORE
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = fused_linear_ce(h1, w1, targets, smoothing, chunk=6)
    ref = reference_ce(h2 @ w2.T, targets, smoothing)
    (ours * 0.25).backward()
    (ref * 0.25).backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6, rtol=1e-5)
    frozen = fused_linear_ce(hidden.clone().requires_grad_(), weight, targets)  # frozen head (LoRA): no weight grad
    frozen.backward()


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fused_linear_training_step_matches_logits_path(tmp_path, llama_dir, finetune):
    """A real step on the tiny Llama: same loss and gradients whether the loss sees logits or hidden states."""
    import tiny
    from test_invariants import recipe

    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(16, seed=5))
    grads, losses = [], []
    for kernel in ("chunked", "fused_linear"):
        r = recipe(tmp_path, llama_dir, train_file, kernel, micro_batch_size=4, grad_accum=2, loss_kernel=kernel,
                   finetune=finetune, label_smoothing=0.1)
        if kernel == "fused_linear":
            from tuneforge.train.core.loss import output_head

            assert output_head(r.model) is not None  # the hidden-state path really ran
        m = r.backward_step(0)
        losses.append(m["loss"])
        grads.append({n: p.grad.clone() for n, p in r.model.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) <= 1e-5
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name
