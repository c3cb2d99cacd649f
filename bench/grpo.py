"""GRPO speed and memory: tuneforge vs TRL 1.16 GRPOTrainer on the same tiny model, prompts, reward and
generation length (CPU).

Both sides: full fine-tune of a tiny Llama, 8 generations per prompt, 8 completions per forward x 2 accumulation
steps (16 completions, 2 prompts per optimizer step), exactly `--gen` tokens per completion (the random model never
stops early: `min_new_tokens`-free, it just never samples EOS in practice), fp32, AdamW, one regex reward. TRL runs
as configured to match (fp32, no gradient checkpointing) and with its defaults (bf16 autocast + gradient
checkpointing). Each side runs in its own process (peak RSS is that process's), alternating sides per round, so
every side sees the same machine load window.

    .venv/bin/python bench/grpo.py --steps 12 --warmup 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402  (the same tiny-model builder the tests use)

PATTERN = r"the"  # the regex reward both sides score: 1.0 where the completion contains "the"
G, MBS, ACCUM = 8, 8, 2


def prompts(n: int = 64) -> list[dict]:
    return [{"prompt": r["messages"][0]["content"]} for r in tiny.reverse_rows(n, seed=1)]


def run_tuneforge(model_dir: Path, data: Path, out: Path, steps: int, warmup: int, gen: int) -> list[float]:
    from tuneforge.config.schema import Config
    from tuneforge.train.core.step import update
    from tuneforge.train.run import trainer

    cfg = Config.model_validate({
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "eval_split": 0.0, "cache_dir": str(out / "cache"), "max_length": 128},
        "train": {"method": "grpo", "finetune": "full", "max_steps": steps, "micro_batch_size": MBS, "grad_accum": ACCUM, "lr": 1e-5},
        "grpo": {"num_generations": G, "max_completion_length": gen, "rewards": [{"type": "regex", "pattern": PATTERN}], "log_samples": 0},
        "output": {"dir": str(out / "tf")}, "tracking": {"tensorboard": False, "plot": False},
    })
    r = trainer(cfg, log=lambda *a: None)
    r.setup()
    r.model.train()
    times = []
    for step in range(steps):
        began = time.perf_counter()
        r.backward_step(step)
        update(r.accel, r.model, r.optimizer, r.scheduler, cfg.train.max_grad_norm)
        times.append(time.perf_counter() - began)
    return times[warmup:]


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, warmup: int, gen: int, defaults: bool) -> list[float]:
    import re

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train").map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})
    pattern = re.compile(PATTERN, re.DOTALL)

    def regex_reward(completions, **_):
        return [float(pattern.search(c[0]["content"]) is not None) for c in completions]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_begin(self, *a, **k):
            if not stamps:
                stamps.append(time.perf_counter())

    matched = {} if defaults else {"bf16": False, "gradient_checkpointing": False}
    args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=MBS, gradient_accumulation_steps=ACCUM, num_generations=G,
                      max_completion_length=gen, learning_rate=1e-5, max_steps=steps, report_to=[], use_cpu=True, save_strategy="no",
                      logging_steps=1000, seed=42, **matched)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=regex_reward, args=args,
                          train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def child(args) -> None:
    torch_threads = int(os.environ.get("BENCH_THREADS", "0"))
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    root = Path(args.root)
    out = Path(tempfile.mkdtemp(dir=root))
    if args.side == "tuneforge":
        times = run_tuneforge(root / "model", root / "prompts.jsonl", out, args.steps, args.warmup, args.gen)
    else:
        times = run_trl(root / "model", root / "prompts.jsonl", out, args.steps, args.warmup, args.gen, args.side == "trl_defaults")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps({"side": args.side, "step_seconds": times, "peak_rss_gib": round(peak_gib, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--gen", type=int, default=32, help="tokens generated per completion")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--sides", default="tuneforge,trl,trl_defaults")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.side:
        return child(args)
    root = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    tiny.build_model(root / "model", "llama", hidden=args.hidden)
    tiny.write_jsonl(root / "prompts.jsonl", prompts())
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for side in args.sides.split(","):
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--root", str(root), "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--gen", str(args.gen)], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            results.setdefault(side, []).append(json.loads(line[7:]))
    # Other processes on the machine slow whole runs down: each side's speed is its least-disturbed run (the lowest
    # median step time of its runs); the median over every timed step is shown beside it.
    table = {}
    for side, runs in results.items():
        per_step = [t for r in runs for t in r["step_seconds"]]
        best = min(statistics.median(r["step_seconds"]) for r in runs)
        table[side] = {"steps_per_s": round(1 / best, 3), "best_run_median_step_s": round(best, 4),
                       "all_steps_median_s": round(statistics.median(per_step), 4),
                       "peak_rss_gib": max(r["peak_rss_gib"] for r in runs), "runs": len(runs), "timed_steps": len(per_step)}
    ref = table.get("trl", {}).get("steps_per_s")
    for side, row in table.items():
        row["vs_trl_matched"] = round(row["steps_per_s"] / ref, 2) if ref else None
        if "trl" in results:  # the same ratio round by round (sides of one round ran back to back)
            ratios = [statistics.median(t["step_seconds"]) / statistics.median(r["step_seconds"]) for r, t in zip(results[side], results["trl"])]
            row["vs_trl_matched_per_round"] = [round(x, 2) for x in ratios]
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}", "hidden": args.hidden,
            "gen_tokens": args.gen, "completions_per_step": MBS * ACCUM, "num_generations": G}
    print(json.dumps({"meta": meta, "results": table}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": table, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
