"""Preprocessing speed: tuneforge `prepare` vs TRL SFTTrainer's dataset preparation, same rows, same run.

100k synthetic chat rows -> chat template -> tokens + assistant masks (+ packing for TRL; tuneforge
packs per micro-batch at train time, so its prepared data needs no packing pass). Also times the
cache hit (an unchanged input must load, not re-prepare).

    .venv/bin/python bench/preprocess.py --rows 100000
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import tiny  # noqa: E402
from throughput import chat_rows  # noqa: E402


def run_tuneforge(work: Path, num_proc: int) -> dict:
    from transformers import PreTrainedTokenizerFast

    from tuneforge.config.schema import DataConfig
    from tuneforge.data.prepare import prepare

    tok = PreTrainedTokenizerFast.from_pretrained(work / "model")
    cfg = DataConfig.model_validate({"train": [{"path": str(work / "chat.jsonl")}], "eval_split": 0.0, "max_length": 256,
                                     "num_proc": num_proc, "cache_dir": str(work / f"cache{num_proc}")})
    began = time.perf_counter()
    data = prepare(cfg, tok)
    first = time.perf_counter() - began
    began = time.perf_counter()
    again = prepare(cfg, tok)
    hit = time.perf_counter() - began
    assert again.cache_hit and len(again.train) == len(data.train)
    return {"seconds": first, "cache_hit_seconds": hit, "samples": len(data.train)}


def run_trl(work: Path, num_proc: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    ds = load_dataset("json", data_files=str(work / "chat.jsonl"), split="train", cache_dir=str(work / f"hf_cache{num_proc}"))  # no cache shared between runs

    def build(dataset):
        args = SFTConfig(output_dir=str(work / "trl"), max_length=256, packing=True, report_to=[], use_cpu=True,
                         dataset_num_proc=num_proc if num_proc > 1 else None)
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)

    began = time.perf_counter()
    build(ds.select(range(100)))  # fixed cost of building a trainer, subtracted below
    fixed = time.perf_counter() - began
    began = time.perf_counter()
    trainer = build(ds)
    total = time.perf_counter() - began
    return {"seconds": total - fixed, "samples": len(trainer.train_dataset)}


RUNNERS = {"tuneforge": run_tuneforge, "trl": run_trl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print("RESULT " + json.dumps(RUNNERS[args.only](args.workdir, args.num_proc)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny.build_model(work / "model", "llama")
        tiny.write_jsonl(work / "chat.jsonl", chat_rows(args.rows))
        for name in ("trl", "tuneforge"):
            for num_proc in (1, 2):
                cmd = [sys.executable, __file__, "--only", name, "--num-proc", str(num_proc), "--workdir", str(work)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                results[f"{name}_proc{num_proc}"] = json.loads(line[0][7:])
    print(f"{'setup':<18}{'seconds':>10}{'rows/s':>10}{'speed-up vs TRL':>18}{'cache hit s':>14}")
    for name, r in results.items():
        peer = results[name.replace("tuneforge", "trl")]
        r["speedup_vs_trl_same_procs"] = peer["seconds"] / r["seconds"]
        hit = f"{r['cache_hit_seconds']:.2f}" if "cache_hit_seconds" in r else "-"
        print(f"{name:<18}{r['seconds']:>10.1f}{args.rows / r['seconds']:>10.0f}{r['speedup_vs_trl_same_procs']:>17.2f}x{hit:>14}")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "results": results}, indent=2))


if __name__ == "__main__":
    main()
