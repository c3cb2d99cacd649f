"""Parity between the trained model and an exported artifact: logits on saved eval samples, greedy answers.

The reference is always what `train` produced (adapter model for LoRA, the full model otherwise), so
every artifact is compared with the model the user trained, not with an intermediate copy.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import ParityError
from tuneforge.outputs import clear_output_dir
from tuneforge.rundir import RunDir, update_run_info

PARITY_SAMPLES = "parity_samples.json"
GREEDY_TOKENS = 24  # new tokens per held-out answer in every parity check
DEFAULT_PROMPTS = ["Hello! Who are you?", "Summarise: the cat sat on the mat.", "List three colours."]


def sample_ids(run_dir: Path, tokenizer, n: int = 4) -> list[list[int]]:
    """Token ids saved by `train` (eval samples); else a few rendered chat prompts."""
    saved = Path(run_dir) / PARITY_SAMPLES
    if saved.is_file():
        return json.loads(saved.read_text())[:n]
    return [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for c in held_out_prompts(run_dir)]


def held_out_prompts(run_dir: Path, n: int = 3) -> list[list[dict]]:
    """Conversations to answer greedily: the run's held-out generate-eval prompts when it has them."""
    for name in ("generate_eval_after.json", "generate_eval_before.json"):
        path = Path(run_dir) / name
        if path.is_file():
            examples = json.loads(path.read_text()).get("examples", [])[:n]
            if examples:
                return [[{"role": "user", "content": e["prompt"]}] for e in examples]
    return [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS[:n]]


def logits(model, samples: list[list[int]]):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s], device=device), use_cache=False).logits.float().cpu() for s in samples]


def compare(reference, other) -> dict:
    """Max |logit diff|, the same relative to the largest |logit|, and next-token (argmax) agreement."""
    abs_diff = max((a - b).abs().max().item() for a, b in zip(reference, other))
    scale = max(a.abs().max().item() for a in reference) or 1.0
    same = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(reference, other))
    total = sum(a.shape[1] for a in reference)
    return {"max_abs_logit_diff": abs_diff, "max_rel_logit_diff": abs_diff / scale, "top1_agreement": same / max(1, total),
            "samples": len(reference)}


def target_loss(model, items: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """(sum of next-token CE over labelled positions, number of those positions); labels IGNORE elsewhere.

    Only the tokens training put loss on count, so the mean is the number a run logs as eval_loss.
    """
    import torch

    from tuneforge.data.render import IGNORE

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in items:
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()  # (T-1, V)
            target = torch.tensor(labels[1:], device=device)
            total += torch.nn.functional.cross_entropy(out, target, ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
    return total, count


def target_perplexity(model, items: list[tuple[list[int], list[int]]]) -> float:
    import math

    total, count = target_loss(model, items)
    return math.exp(total / max(1, count))


def greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = GREEDY_TOKENS) -> list[str]:
    from tuneforge.model.generate import generate_batch

    return generate_batch(model, tokenizer, conversations, max_new_tokens, batch_size=1)


def publish(tmp: Path, out_dir: Path, run_dir: Path, *, kind: str, info_key: str, report: dict, report_file: str,
            what: str, failure: str | None) -> None:
    """Move a finished artifact into place and record it in the run, then fail loudly (exit 3) if its check did not
    pass. The artifact stays either way: its report says what differs."""
    clear_output_dir(out_dir, kind)
    tmp.rename(out_dir)
    if RunDir(run_dir).exists():
        update_run_info(run_dir, **{info_key: {"dir": str(out_dir), **report}})
    if failure:
        raise ParityError(f"{what} differs from the trained model: {failure} (see {out_dir}/{report_file})")
