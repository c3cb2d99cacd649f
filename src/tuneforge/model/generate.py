"""Greedy/sampled generation with the model's chat template and stop tokens (batched, left padded)."""

from __future__ import annotations

from typing import Callable

import torch

from tuneforge.data.templates import stop_token_ids


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                   done: Callable[[int], None] | None = None, **sampling) -> list[str]:
    """Answer each conversation (ending in a user turn). Returns the decoded replies, stop tokens removed.
    `done(n)` is called after each batch of n answers (a progress counter's advance)."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    replies = []
    for i in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, c) for c in conversations[i : i + batch_size]]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
            pad_token_id=pad, do_sample=bool(sampling.get("temperature")), **{k: v for k, v in sampling.items() if v},
        )
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        if done is not None:
            done(len(prompts))
    model.train(was_training)
    return replies
