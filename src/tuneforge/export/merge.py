"""Merge a LoRA adapter into full weights and prove the merged model matches the adapter model.

The merged directory is reloaded with plain transformers (no tuneforge, no peft) before comparing,
so the check covers what a user will actually load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.errors import ParityError, UserError
from tuneforge.outputs import check_output_dir, clear_output_dir, mark_output_dir
from tuneforge.rundir import update_run_info, write_json

PARITY_SAMPLES = "parity_samples.json"


def merge(path: str, out: str | None = None, tolerance: float = 1e-3, log=print, overwrite: bool = False) -> dict:
    out_dir = Path(out) if out else Path(path) / "merged"
    # The default RUN_DIR/merged is the run's own artifact: re-merging replaces it. Elsewhere, only with --overwrite.
    check_output_dir(out_dir, "merged", overwrite or out is None, "--overwrite")

    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.model.trained import load_trained

    model, tokenizer, desc = load_trained(path, dtype="float32")
    if desc["kind"] != "lora":
        raise UserError(f"{path}: nothing to merge (a {desc['kind']} model has no adapter); use it directly")
    samples = parity_inputs(Path(path), tokenizer)
    with torch.no_grad():
        adapter_logits = [model(input_ids=ids, use_cache=False).logits for ids in samples]
    merged = model.merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mark_output_dir(tmp, "merged", source=str(path))
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    with torch.no_grad():
        diffs = [(reloaded(input_ids=ids, use_cache=False).logits - a).abs().max().item() for ids, a in zip(samples, adapter_logits)]
    report = {"max_abs_logit_diff": max(diffs), "tolerance": tolerance, "samples": len(samples), "passed": max(diffs) <= tolerance}
    write_json(tmp / "merge_report.json", report)
    clear_output_dir(out_dir, "merged")
    tmp.rename(out_dir)
    if (Path(path) / "run_info.json").is_file():
        update_run_info(Path(path), merged_dir=str(out_dir), merge=report)
    if not report["passed"]:
        raise ParityError(f"merged model differs from the adapter model: max |logit diff| {max(diffs):.3g} > tolerance {tolerance:g} (see {out_dir}/merge_report.json)")
    return {**report, "out": str(out_dir)}


def parity_inputs(run_dir: Path, tokenizer, n: int = 4):
    """Token ids saved by `train` (eval samples); else a few rendered chat prompts."""
    import torch

    saved = run_dir / PARITY_SAMPLES
    if saved.is_file():
        rows = json.loads(saved.read_text())[:n]
    else:
        prompts = ["Hello! Who are you?", "Summarise: the cat sat on the mat.", "List three colours."]
        rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        rows = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
    return [torch.tensor([r]) for r in rows]
