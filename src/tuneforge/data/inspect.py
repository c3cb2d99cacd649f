"""`tuneforge data inspect`: the exact rendered text, ids and labels, with trained spans highlighted."""

from __future__ import annotations

import json

from tuneforge.data.render import IGNORE, render_with_spans
from tuneforge.errors import UserError


def inspect_samples(cfg, split: str, limit: int, as_json: bool) -> None:
    from tuneforge.data.prepare import prepare
    from tuneforge.model.load import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(cfg.model, need_weights=False), cfg.model)
    data = prepare(cfg.data, tok)
    samples = (data.train if split == "train" else data.eval)[:limit]
    pairs = (data.pairs if split == "train" else data.eval_pairs)[:limit]
    if not samples and not pairs:  # say so: an empty listing looks like a bug
        raise UserError(f"--split {split}: the prepared data holds no {split} samples (hold some out with data.eval_split, "
                        "data.eval_size or data.eval)")
    if pairs and not samples:  # preference data: prompt, chosen and rejected spans
        from tuneforge.data.preference import inspect

        return inspect(pairs, tok, as_json, data.report)
    if as_json:
        # The exact string that was tokenized (re-rendered: decode() is not always the inverse of encode()).
        texts = [_text(s, tok, cfg.data.train_on) for s in samples]
        rows = [{"text": t, "input_ids": s.input_ids, "labels": s.labels} for t, s in zip(texts, samples)]
        print(json.dumps(rows, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console()
    r = data.report
    console.print(f"{r['train_samples']} train / {r['eval_samples']} eval samples, {r['train_tokens']} train tokens "
                  f"({r['train_target_tokens']} trained), mean {r['mean_sample_tokens']} max {r['max_sample_tokens']} tokens/sample, "
                  f"{r['truncated']} truncated, dropped {r['dropped'] or 'none'}", highlight=False)
    for i, s in enumerate(samples):
        text = Text()
        for tid, lab in zip(s.input_ids, s.labels):
            text.append(tok.decode([tid]), style="bold green" if lab != IGNORE else "dim")
        console.rule(f"{split} sample {i}: {len(s.input_ids)} tokens, {s.n_targets} trained (green)")
        console.print(text)


def _text(sample, tok, train_on: str) -> str:
    if sample.messages is None:  # a group_texts block: cut from the token stream, shown decoded
        return tok.decode(sample.input_ids)
    if isinstance(sample.messages, str):
        return sample.messages
    return render_with_spans(tok, sample.messages, train_on)[0]
