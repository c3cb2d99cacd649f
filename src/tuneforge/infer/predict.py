"""`tuneforge predict`: batched generation over a dataset -> jsonl + metrics (exact, ROUGE-L, BLEU, perplexity).

The model is loaded once (GPU when present), prompts are rendered with its chat template, batches are
left padded and generation stops at the template's end-of-turn tokens (model/generate.py). Perplexity
is teacher-forced on the reference answers (answer tokens + end-of-turn, given the prompt).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tuneforge.errors import UserError


def load_rows(data: Path, limit: int | None = None) -> list[dict]:
    """-> [{"messages": prompt conversation, "reference": answer or None}] from any supported row format."""
    from tuneforge.data.formats import BadRow, to_conversation
    from tuneforge.data.sources import read_rows

    if not Path(data).exists():
        raise UserError(f"--data {data}: file not found")
    out = []
    for row in read_rows(str(data)):
        msgs = row.data.get("messages")
        if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "user":
            out.append({"messages": msgs, "reference": None})  # a prompt only: predict, no reference
        elif "prompt" in row.data and not any(k in row.data for k in ("completion", "response", "output", "answer")):
            out.append({"messages": [{"role": "user", "content": str(row.data["prompt"])}], "reference": None})
        else:
            try:
                conv = to_conversation(row, "auto", None)
            except BadRow as exc:
                raise UserError(f"{row.where}: {exc} (each row needs a prompt, e.g. messages ending in a user turn)") from None
            conv = conv["messages"] if isinstance(conv, dict) else conv
            if not isinstance(conv, list):
                raise UserError(f"{row.where}: plain text rows have no prompt to answer (use messages or prompt/completion rows)")
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            out.append({"messages": conv[:last], "reference": conv[last]["content"]})
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"--data {data}: no rows")
    return out


def predict(path: str, data: Path, out: Path | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
            top_p: float | None = None, batch_size: int = 8, limit: int | None = None, seed: int = 0,
            overwrite: bool = False, log=print) -> dict:
    out = Path(out) if out else Path(data).with_name(Path(data).stem + ".predictions.jsonl")
    metrics_path = out.with_name(out.stem + ".metrics.json")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists (add --overwrite to replace it, or pick another file)")
    rows = load_rows(data, limit)

    import torch

    from tuneforge.model.generate import generate_batch
    from tuneforge.model.trained import load_trained

    model, tokenizer, _ = load_trained(path)
    torch.manual_seed(seed)
    from tuneforge.progress import phase

    log(f"predicting {len(rows)} rows on {next(model.parameters()).device} (batch {batch_size})")
    with phase("predict", total=len(rows), log=log) as progress:  # counted per batch: a line every ~10 s when piped
        preds = generate_batch(model, tokenizer, [r["messages"] for r in rows], max_new_tokens, batch_size=batch_size,
                               done=progress.advance, temperature=temperature, top_p=top_p if temperature else None)
    with_ref = [(r, p) for r, p in zip(rows, preds) if r["reference"] is not None]
    metrics = {"rows": len(rows), "with_reference": len(with_ref)}
    if with_ref:
        metrics.update(text_metrics([p for _, p in with_ref], [r["reference"] for r, _ in with_ref]))
        metrics["perplexity"] = reference_perplexity(model, tokenizer, [r for r, _ in with_ref])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({"prompt": r["messages"][-1]["content"], "messages": r["messages"], "reference": r["reference"],
                                       "prediction": p}) + "\n" for r, p in zip(rows, preds)))
    tmp.replace(out)
    settings = {"model": str(path), "data": str(data), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    metrics_path.write_text(json.dumps({**settings, "metrics": metrics}, indent=2))
    return {"out": str(out), "metrics_file": str(metrics_path), "rows": len(rows),
            "metrics": {k: v for k, v in metrics.items() if k not in ("rows", "with_reference")}}


def text_metrics(preds: list[str], refs: list[str]) -> dict:
    """Exact match (stripped), mean ROUGE-L F1 (rouge-score), corpus BLEU (sacrebleu, 0-100)."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("predict metrics need rouge-score and sacrebleu: pip install 'tuneforge[eval]'") from None
    from tuneforge.metrics import exact

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    return {"exact_match": sum(exact(p, r) for p, r in zip(preds, refs)) / len(refs), "rougeL": sum(rouge) / len(rouge),
            "bleu": sacrebleu.corpus_bleu(preds, [refs]).score}


def reference_perplexity(model, tokenizer, rows: list[dict]) -> float:
    """exp(mean CE per reference token), the reference rendered as the assistant turn by the chat template."""
    from tuneforge.data.render import IGNORE
    from tuneforge.data.templates import stop_token_ids
    from tuneforge.export.parity import target_loss
    from tuneforge.model.generate import prompt_ids

    stops, items = set(stop_token_ids(tokenizer)), []
    for r in rows:
        prompt = prompt_ids(tokenizer, r["messages"])
        full_text = tokenizer.apply_chat_template(r["messages"] + [{"role": "assistant", "content": r["reference"]}], tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] != prompt:  # a template that re-renders earlier turns: score the answer tokens alone
            full = prompt + tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
        answer = full[len(prompt):]
        end = next((i + 1 for i, t in enumerate(answer) if t in stops), len(answer))  # score up to the end-of-turn token
        items.append((full[: len(prompt) + end], [IGNORE] * len(prompt) + answer[:end]))
    total, count = target_loss(model, items)
    return math.exp(total / max(1, count))
