"""GPU throughput, MFU and peak memory: tuneforge vs TRL on the same random-init model shapes and data.

Random-init models of real shapes are built on the device (nothing is downloaded). Each setup runs in
its own process (accelerate's and CUDA's global state differ between them); every process prints one
RESULT line with tokens/s, MFU and peak GiB, and the parent prints the table and the ratios.

    python bench/gpu.py                      # on a GPU machine: all setups, results to stdout
    python bench/gpu.py --json out.json      # also write the numbers
    python bench/gpu.py --tiny --steps 2     # the same code on CPU with a tiny shape (a smoke test)

Setups: full fine-tune of the Qwen2.5-1.5B shape (tuneforge default / token budget / bins vs TRL
defaults / packing / packing + Liger), LoRA on the Llama-3-8B shape (tuneforge token budget vs TRL
packing + Liger), QLoRA 4-bit on the Llama-3-8B shape (peak memory at packed length 2048, batch 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

SHAPES = {  # name -> (arch, hidden, intermediate, layers, heads, kv heads, vocab)
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936),
    "llama3-8b": ("llama", 4096, 14336, 32, 32, 8, 128256),
    "tiny": ("llama", 64, 128, 2, 4, 2, 4096),
}


def chat_rows(n: int, max_words: int, seed: int = 0) -> list[dict]:
    """Chat rows with a long-tailed length distribution like Alpaca + LIMA (most short, some near max_length)."""
    import random

    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(tiny.WORDS) for _ in range(max(2, min(k, max_words))))  # noqa: E731
    return [{"messages": [{"role": "user", "content": words(int(rng.lognormvariate(3.0, 1.0)))},
                          {"role": "assistant", "content": words(int(rng.lognormvariate(4.5, 1.0)))}]} for _ in range(n)]


def build_model(folder: Path, shape: str) -> Path:
    """A random-init model of `shape` + the local test tokenizer (its ids are a subset of the vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    arch, hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    tok = tiny.build_tokenizer(folder)
    cfg = tiny.model_config(arch, vocab, hidden, layers)
    cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = inter, heads, kv
    cfg.max_position_embeddings, cfg.eos_token_id = 4096, tok.eos_token_id
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    return folder


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def run_tuneforge(work: Path, shape: str, args, finetune: str, **train) -> dict:
    import torch

    from tuneforge.config.schema import Config
    from tuneforge.train.run import trainer
    from tuneforge.train.core.step import update

    packing = train.pop("packing", "padding_free")
    quantize = train.pop("quantize", None)
    cfg = Config.model_validate({
        "model": {"path": str(work / shape), **({"quantize": quantize} if quantize else {})},
        "data": {"train": [{"path": str(work / "chat.jsonl")}], "eval_split": 0.0, "cache_dir": str(work / "cache"),
                 "packing": packing, "max_length": args.max_length},
        "train": {"finetune": finetune, "max_steps": args.warmup + args.steps, "lr": 1e-5, **train},
        "output": {"dir": str(work / f"run-{time.time_ns()}")}, "tracking": {"tensorboard": False, "plot": False},
    })
    r = trainer(cfg, log=lambda *a: None)
    r.setup()
    r.model.train()
    tokens, began = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            tokens, began = 0, time.perf_counter()
        tokens += r.backward_step(step)["tokens"]
        update(r.accel, r.model, r.optimizer, r.scheduler, cfg.train.max_grad_norm)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    trainable = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in r.model.parameters())
    return {"tokens": tokens, "seconds": time.perf_counter() - began, "peak_gib": _peak_gib(),
            "trainable_fraction": trainable / total, "mean_len": _mean_len(r.data.train)}


def _mean_len(samples) -> float:
    return sum(len(s) for s in samples) / max(1, len(samples))


def run_trl(work: Path, shape: str, args, lora: bool = False, **overrides) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(work / shape)
    model = AutoModelForCausalLM.from_pretrained(work / shape, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    ds = load_dataset("json", data_files=str(work / "chat.jsonl"), split="train")
    sft = SFTConfig(output_dir=str(work / "trl"), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
                    learning_rate=1e-5, logging_steps=10_000, save_strategy="no", report_to=[], max_length=args.max_length,
                    bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), **overrides)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    counted = {"tokens": 0, "step": 0}
    collate = trainer.data_collator

    def counting(features):  # non-padding tokens fed to the model, timed steps only
        batch = collate(features)
        mask = batch.get("attention_mask")
        if counted["step"] >= args.warmup:
            counted["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            counted["step"] += 1
            if counted["step"] == args.warmup:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                counted["start"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return {"tokens": counted["tokens"], "seconds": time.perf_counter() - counted["start"], "peak_gib": _peak_gib(),
            "trainable_fraction": 1.0 if not lora else 0.0, "mean_len": float("nan")}


def setups(big: str, small: str, args) -> dict:
    budget = args.max_length * args.batch
    return {
        "full/tuneforge_default": lambda w: run_tuneforge(w, small, args, "full", micro_batch_size=args.batch),
        "full/tuneforge_token_budget": lambda w: run_tuneforge(w, small, args, "full", micro_batch_tokens=budget),
        "full/tuneforge_budget_fused_linear": lambda w: run_tuneforge(w, small, args, "full", micro_batch_tokens=budget,
                                                                      loss_kernel="fused_linear"),
        "full/tuneforge_budget_liger": lambda w: run_tuneforge(w, small, args, "full", micro_batch_tokens=budget, loss_kernel="liger"),
        "full/tuneforge_bins": lambda w: run_tuneforge(w, small, args, "full", packing="bins", micro_batch_size=args.batch),
        "full/trl_defaults": lambda w: run_trl(w, small, args),
        "full/trl_packing": lambda w: run_trl(w, small, args, packing=True),
        "full/trl_packing_liger": lambda w: run_trl(w, small, args, packing=True, use_liger_kernel=True),
        "lora/tuneforge_token_budget": lambda w: run_tuneforge(w, big, args, "lora", micro_batch_tokens=budget),
        "lora/trl_packing_liger": lambda w: run_trl(w, big, args, lora=True, packing=True, use_liger_kernel=True),
        "qlora/tuneforge_4bit_2x2048": lambda w: run_tuneforge(w, big, args, "lora", quantize="4bit",
                                                               micro_batch_tokens=2 * args.max_length, gradient_checkpointing=True),
    }


def mfu_of(result: dict, shape: str) -> float | None:
    import torch

    from tuneforge.train.core.flops import device_peak_flops, flops_per_token, mfu

    arch, hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = tiny.model_config(arch, vocab, hidden, layers)
    cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = inter, heads, kv
    seq = result["mean_len"] if result["mean_len"] == result["mean_len"] else 512.0
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return mfu(result["tokens"] / result["seconds"], flops_per_token(cfg, seq, result["trainable_fraction"]), device_peak_flops(name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--only", help="run only setups whose name contains this")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    big, small = ("tiny", "tiny") if args.tiny else ("llama3-8b", "qwen2.5-1.5b")
    if args.tiny:
        args.max_length = min(args.max_length, 128)
    table = setups(big, small, args)
    if args.child:
        result = table[args.child](args.workdir)
        result["mfu"] = mfu_of(result, small if args.child.startswith("full") else big)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        for shape in {big, small}:
            build_model(work / shape, shape)
        tiny.write_jsonl(work / "chat.jsonl", chat_rows(args.rows, max_words=args.max_length // 3))
        for name in table:
            if args.only and args.only not in name:
                continue
            if args.tiny and ("liger" in name or "qlora" in name):
                continue  # Liger needs Triton on a GPU; 4-bit training on CPU has known traps (STACK-NOTES)
            cmd = [sys.executable, __file__, "--child", name, "--workdir", str(work), *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            results[name] = json.loads(line[0][7:]) if line else {"error": out.stderr[-1500:]}
            print(name, json.dumps(results[name])[:300], flush=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


def report(results: dict) -> None:
    print(f"\n{'setup':<32}{'tok/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<32}  failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"{name:<32}{r['tokens_per_s']:>10.0f}{mfu:>8}{r['peak_gib']:>10.1f}")
    for group, peer in (("full", "full/trl_packing_liger"), ("lora", "lora/trl_packing_liger")):
        if peer in results and "tokens_per_s" in results[peer]:
            for name, r in results.items():
                if name.startswith(group + "/tuneforge") and "tokens_per_s" in r:
                    print(f"{name} vs {peer}: {r['tokens_per_s'] / results[peer]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
