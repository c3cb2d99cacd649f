"""Issue 8 on a GPU: QLoRA and LoRA on a Llama-3-8B-shaped model (peak GiB, tokens/s), and DeepSpeed
ZeRO-3 against plain single-process training on a Llama-3.2-1B-shaped model (same final weights).

Random-init models of real shapes are built on the machine (nothing downloaded). Each setup runs in its own
process (accelerate, DeepSpeed and CUDA keep global state); the parent prints a table and writes JSON.

    python bench/gpu_engine.py --json $OUT/gpu_engine.json     # on a GPU machine (bitsandbytes, deepspeed installed)
    python bench/gpu_engine.py --tiny                          # the same code on CPU with tiny shapes (smoke test)
    python bench/gpu_engine.py --only zero3                    # one group: qlora, lora or zero3

The lent GPU image has no bitsandbytes or deepspeed: carry them (bench/gpu_wheels.sh with WITH_BNB=1 for
bitsandbytes; `pip wheel --no-deps deepspeed==0.19.8 -w .whl` builds a 2 MB py3-none-any wheel, its CUDA
ops are JIT-built only if used, and the ZeRO-3 setup here uses none but the NCCL collectives).

Goal from issue 8: QLoRA 8B peak <= 6.5 GiB at packed length 2048, batch 2 (torchtune reports 7.4 GiB).
QLoRA/LoRA use bench/gpu.py's model builder, data and timing loop (tuneforge's own recipe, timed steps
after warm-up). ZeRO-3 runs `tuneforge train --nproc N --set train.deepspeed=zero3` (N = GPUs, 2 on CPU)
against one process with accumulation N over the same global batch, fp32, and compares the consolidated
final weights (plain transformers loads them).
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
import gpu  # noqa: E402  (bench/gpu.py: build_model, chat_rows, run_tuneforge)

ONE_B = ("llama", 2048, 8192, 16, 32, 8, 128256)  # Llama-3.2-1B shape: hidden, intermediate, layers, heads, kv, vocab


def setups(args) -> dict:
    big = "tiny" if args.tiny else "llama3-8b"
    packed = {"packing": "bins", "micro_batch_size": 2}  # bins of max_length tokens: "packed length 2048, batch 2"
    return {
        "qlora/8b_4bit_nf4": lambda w: gpu.run_tuneforge(w, big, args, "lora", quantize="4bit", gradient_checkpointing=True, **packed),
        "lora/8b_bf16": lambda w: gpu.run_tuneforge(w, big, args, "lora", gradient_checkpointing=True, **packed),
        "zero3/1b_vs_single": lambda w: zero3_vs_single(w, args),
    }


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def build_1b(folder: Path, tiny_shape: bool) -> Path:
    """fp32 weights: the equivalence is checked at fp32 precision."""
    import torch
    from transformers import AutoModelForCausalLM

    arch, hidden, inter, layers, heads, kv, vocab = gpu.SHAPES["tiny"] if tiny_shape else ONE_B
    tok = gpu.tiny.build_tokenizer(folder)
    cfg = gpu.tiny.model_config(arch, vocab, hidden, layers)
    cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = inter, heads, kv
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return folder


def zero3_vs_single(work: Path, args) -> dict:
    import torch
    from safetensors.torch import load_file

    procs = 2 if args.tiny else max(1, _gpus())
    model = build_1b(work / "one_b", args.tiny)
    cfg = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": [{"path": str(work / "chat.jsonl")}], "eval_split": 0.0, "cache_dir": str(work / "cache"),
                 "max_length": args.max_length, "packing": "bins"},
        "train": {"finetune": "full", "max_steps": args.zero3_steps, "micro_batch_size": 1, "lr": 1e-5,
                  "lr_scheduler": "constant", "mixed_precision": "no"},
        "tracking": {"tensorboard": False, "plot": False},
    }
    config = work / "zero3.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML
    runs = {}
    for name, extra, sets in (("single", [], [f"train.grad_accum={procs}"]),
                              ("zero3", ["--nproc", str(procs)], ["train.deepspeed=zero3"])):
        out = work / f"run_{name}"
        cmd = [sys.executable, "-m", "tuneforge", "train", str(config), *extra, "--set", f"output.dir={out}"]
        for s in sets:
            cmd += ["--set", s]
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
        steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in ln]
        runs[name] = {"seconds": time.perf_counter() - began, "tokens_per_s": sum(s["tokens_per_s"] for s in steps[1:]) / max(1, len(steps) - 1),
                      "final_loss": steps[-1]["loss"]}
    a = load_file(work / "run_single" / "final" / "model.safetensors")
    b = load_file(work / "run_zero3" / "final" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(work / "run_zero3" / "final")  # plain transformers loads the consolidated model
    return {"processes": procs, "max_abs_weight_diff": diff, "runs": runs, "tokens": 0, "seconds": 1.0,
            "peak_gib": float("nan"), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps (QLoRA/LoRA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero3-steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--only", help="run only setups whose name contains this")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.max_length, args.rows, args.steps = min(args.max_length, 128), min(args.rows, 200), min(args.steps, 2)
    table = setups(args)
    if args.child:
        print("RESULT " + json.dumps(table[args.child](args.workdir)))
        return
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        if not args.only or "zero3" not in args.only:
            gpu.build_model(work / ("tiny" if args.tiny else "llama3-8b"), "tiny" if args.tiny else "llama3-8b")
        gpu.tiny.write_jsonl(work / "chat.jsonl", gpu.chat_rows(args.rows, max_words=args.max_length // 3))
        for name in table:
            if args.only and args.only not in name:
                continue
            cmd = [sys.executable, __file__, "--child", name, "--workdir", str(work), *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            results[name] = json.loads(line[0][7:]) if line else {"error": out.stderr[-1500:]}
            print(name, json.dumps(results[name])[:400], flush=True)
    report(results)
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({**meta, "results": results}, indent=2))


def report(results: dict) -> None:
    print(f"\n{'setup':<24}{'tok/s':>10}{'peak GiB':>10}  notes")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24}  failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
        elif name.startswith("zero3"):
            z, s = r["runs"]["zero3"], r["runs"]["single"]
            print(f"{name:<24}{z['tokens_per_s']:>10.0f}{'':>10}  {r['processes']} proc ZeRO-3 vs 1 proc ({s['tokens_per_s']:.0f} tok/s): "
                  f"max |dW| {r['max_abs_weight_diff']:.2e}")
        else:
            goal = "  (goal <= 6.5 GiB)" if name.startswith("qlora") else ""
            print(f"{name:<24}{r['tokens'] / r['seconds']:>10.0f}{r['peak_gib']:>10.2f}{goal}")


if __name__ == "__main__":
    main()
