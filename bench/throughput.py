"""Training throughput: tuneforge vs TRL SFTTrainer on the same tiny model and variable-length chat data.

Prints non-padding tokens/s for each and the ratios against TRL defaults. One run, same machine, same
steps and batch size, so the ratio means something even when absolute numbers vary with machine load.

    .venv/bin/python bench/throughput.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402  (the same tiny-model builder the tests use)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(tiny.WORDS) for _ in range(k))  # noqa: E731
    return [{"messages": [{"role": "user", "content": words(rng.randint(3, 50))},
                          {"role": "assistant", "content": words(rng.randint(2, 50))}]} for _ in range(n)]


def run_tuneforge(model_dir, data, out, steps, batch, packing) -> dict:
    from tuneforge.config.schema import Config
    from tuneforge.train.run import trainer
    from tuneforge.train.core.step import update

    cfg = Config.model_validate({
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "eval_split": 0.0, "cache_dir": str(out / "cache"), "packing": packing, "max_length": 256},
        "train": {"finetune": "full", "max_steps": steps, "micro_batch_size": batch, "lr": 1e-3},
        "output": {"dir": str(out / f"tf_{packing}")}, "tracking": {"tensorboard": False, "plot": False},
    })
    r = trainer(cfg, log=lambda *a: None)
    r.setup()
    r.tracker = None
    r.model.train()
    tokens = 0
    began = time.perf_counter()
    for step in range(steps):
        tokens += r.backward_step(step)["tokens"]
        update(r.accel, r.model, r.optimizer, r.scheduler, cfg.train.max_grad_norm)
    return {"tokens": tokens, "seconds": time.perf_counter() - began}


def run_trl(model_dir, data, out, steps, batch, **overrides) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                     logging_steps=10_000, save_strategy="no", report_to=[], max_length=256, use_cpu=True, **overrides)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features):  # non-padding tokens actually fed to the model
        batch_ = collate(features)
        mask = batch_.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else int((batch_["input_ids"] != tok.pad_token_id).sum())
        return batch_

    trainer.data_collator = counting
    trainer.train_dataset  # noqa: B018  (tokenized in __init__: excluded from timing like our prepare step)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            counted["start"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    return {"tokens": counted["tokens"], "seconds": time.perf_counter() - counted["start"]}


SETUPS = {
    "trl_defaults": lambda m, d, o, a: run_trl(m, d, o, a.steps, a.batch),
    "trl_packing_bfd": lambda m, d, o, a: run_trl(m, d, o, a.steps, a.batch, packing=True, packing_strategy="bfd"),
    "trl_packing_wrapped": lambda m, d, o, a: run_trl(m, d, o, a.steps, a.batch, packing=True, packing_strategy="wrapped"),
    "tuneforge_padded": lambda m, d, o, a: run_tuneforge(m, d, o, a.steps, a.batch, packing="off"),
    "tuneforge_packed": lambda m, d, o, a: run_tuneforge(m, d, o, a.steps, a.batch, packing="padding_free"),
    # Same shape of work as TRL bfd: micro-batches of `batch` bins x 256 tokens.
    "tuneforge_bins": lambda m, d, o, a: run_tuneforge(m, d, o, a.steps, a.batch, packing="bins"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write results here")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one setup in this process
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # each setup runs in its own process: accelerate's global state differs between them
        result = SETUPS[args.only](args.workdir / "model", args.workdir / "chat.jsonl", args.workdir / args.only, args)
        print("RESULT " + json.dumps(result))
        return
    import subprocess

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny.build_model(tmp / "model", "llama", hidden=128, layers=2)
        tiny.write_jsonl(tmp / "chat.jsonl", chat_rows(args.rows))
        for name in SETUPS:
            cmd = [sys.executable, __file__, "--only", name, "--workdir", str(tmp), "--steps", str(args.steps), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(line[0][7:])
    base = results["trl_defaults"]["tokens"] / results["trl_defaults"]["seconds"]
    print(f"{'setup':<22}{'tokens':>10}{'seconds':>10}{'tok/s':>10}{'vs TRL defaults':>18}")
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["ratio_vs_trl_defaults"] = r["tokens_per_s"] / base
        print(f"{name:<22}{r['tokens']:>10}{r['seconds']:>10.1f}{r['tokens_per_s']:>10.0f}{r['ratio_vs_trl_defaults']:>17.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
