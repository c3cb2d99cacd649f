"""merge: LoRA/DoRA parity per family, dtype + shards + generation config + card, QLoRA into the de-quantized base."""

import json
from pathlib import Path

import pytest

import tiny

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3"]


def make_run(folder: Path, base: Path, dora: bool = False, quantize: str | None = None, add_tokens: tuple[str, ...] = ()) -> Path:
    """A finished LoRA run dir as `train` writes it (run_info + final/ adapter), without training. `add_tokens`: tokens
    added in training, whose embedding and head rows the adapter saves in full (as model.add_tokens does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast

    torch.manual_seed(1)
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)} if quantize else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    if add_tokens:
        tokenizer.add_tokens(list(add_tokens), special_tokens=True)
        model.resize_token_embeddings(len(tokenizer))
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora,
                          modules_to_save=["embed_tokens", "lm_head"] if add_tokens else None)
    get_peft_model(model, peft_cfg).save_pretrained(folder / "final")
    tokenizer.save_pretrained(folder / "final")
    info = {"status": "finished", "finetune": "lora", "base_model": {"path": str(base), **({"quantize": quantize} if quantize else {})},
            "base_model_dir": str(base), "data_fingerprint": "0123456789abcdef", "total_steps": 7,
            "summary": {"steps": 7, "eval_loss": 1.25, "generate_eval_after": {"gen_exact": 0.75}, "generate_eval_before": {"gen_exact": 0.0}}}
    (folder / "run_info.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_merge_parity_per_family(tmp_path, arch, dora):
    from tuneforge.export.merge import merge

    base = tiny.build_model(tmp_path / "base", arch, **({"tie_word_embeddings": True} if arch == "gemma" else {}))
    run = make_run(tmp_path / "run", base, dora=dora)
    r = merge(str(run), log=lambda *_: None)
    assert r["passed"] and r["max_abs_logit_diff"] < 1e-4 and r["top1_agreement"] == 1.0
    assert not list((run / "merged").glob("adapter_*"))


def test_merge_dtype_shards_generation_config_and_card(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tuneforge.export.merge import merge

    run = make_run(tmp_path / "run", llama_dir)
    r = merge(str(run), str(tmp_path / "m"), dtype="bfloat16", max_shard_size="100KB", log=lambda *_: None)
    out = tmp_path / "m"
    assert r["passed"] and r["dtype"] == "bfloat16" and r["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert r["max_rel_logit_diff"] < 3e-2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert str(model.dtype) == "torch.bfloat16"
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2  # <|im_end|>, the template's end of turn
    card = (out / "README.md").read_text()
    for needle in (f"base_model: {llama_dir}", "| method | lora |", "0123456789abcdef", "| eval loss (per target token) | 1.2500 |",
                   "exact on held-out prompts | 0.0% before → 75.0% after", "max_abs_logit_diff"):
        assert needle in card, needle


def test_qlora_merges_into_the_dequantized_base(tmp_path, llama_dir):
    import torch
    from safetensors.torch import load_file

    from tuneforge.export.merge import merge

    run = make_run(tmp_path / "run", llama_dir, quantize="4bit")
    logs = []
    r = merge(str(run), log=logs.append)
    assert r["passed"] and r["base_dequantized_from"] == "4bit" and r["max_rel_logit_diff"] < 1e-2 and r["top1_agreement"] == 1.0
    assert any("de-quantized" in line for line in logs)
    assert "de-quantized 4bit base" in (run / "merged" / "README.md").read_text()
    merged = load_file(run / "merged" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values()) and not any("lora" in k or "absmax" in k for k in merged)


def test_qlora_with_added_tokens_merges(tmp_path, llama_dir):
    """Issue 21: a QLoRA run with added tokens crashed (size mismatch [n+2, 64] vs [n, 64]); plain LoRA merged."""
    from safetensors.torch import load_file

    from tuneforge.export.merge import merge

    run = make_run(tmp_path / "run", llama_dir, quantize="4bit", add_tokens=("<tool>", "<obs>"))
    r = merge(str(run), log=lambda *_: None)
    assert r["passed"] and r["base_dequantized_from"] == "4bit" and r["top1_agreement"] == 1.0
    rows = load_file(run / "merged" / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    assert rows == load_file(llama_dir / "model.safetensors")["model.embed_tokens.weight"].shape[0] + 2


def test_bf16_verdict_follows_its_stated_tolerance(tmp_path, llama_dir):
    """Issue 21: a bf16 merge printed a difference above the stated tolerance, then OK. The line states the check that
    applies to the dtype, and a difference above it is exit 3 (a --tolerance is honoured for every dtype)."""
    from helpers import run_cli

    run = make_run(tmp_path / "run", llama_dir)
    ok = run_cli("merge", run, "--out", tmp_path / "a", "--dtype", "bfloat16")
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["check"] == "max_rel_logit_diff" and report["tolerance"] == 3e-2 and report["max_rel_logit_diff"] <= 3e-2
    assert f"max relative |logit diff| {report['max_rel_logit_diff']:.2e} <= 0.03 (bfloat16)  OK" in ok.stdout
    strict = report["max_rel_logit_diff"] / 2  # below what bf16 rounding gives here: must fail
    bad = run_cli("merge", run, "--out", tmp_path / "b", "--dtype", "bfloat16", "--tolerance", f"{strict:.3g}")
    assert bad.returncode == 3 and "OK" not in bad.stdout and "Traceback" not in bad.stderr, (bad.returncode, bad.stdout, bad.stderr)
    assert f"> tolerance {float(f'{strict:.3g}'):g} for a bfloat16 merge" in bad.stderr


def test_corrupted_shard_is_a_user_error(tmp_path, llama_dir):
    from tuneforge.errors import UserError
    from tuneforge.export.gguf import export_gguf
    from tuneforge.export.merge import merge

    run = make_run(tmp_path / "run", llama_dir)
    merge(str(run), log=lambda *_: None)
    shard = run / "merged" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(UserError, match="model.safetensors"):
        export_gguf(str(run / "merged"), str(tmp_path / "g"), "f16", log=lambda *_: None)
