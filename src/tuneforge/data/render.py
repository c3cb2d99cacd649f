"""Render a conversation ONCE with the chat template and derive the loss mask from character offsets.

Peers re-render prefixes per turn and diff token ids; that breaks on templates that change earlier
text when later turns are added. Here: one render, locate each message's content in the rendered
string in order, and label the tokens that overlap assistant spans (+ the end-of-turn token).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.formats import BadRow, Messages
from tuneforge.data.templates import END_OF_TURN_TOKENS

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    truncated: bool


def render(tokenizer, messages: Messages) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja raise_exception() from templates, e.g. role alternation rules
        raise BadRow(f"the chat template rejected this conversation: {exc}") from None


def trained_spans(text: str, messages: Messages, train_on: str, end_tokens: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` that carry loss."""
    if train_on == "all":
        return [(0, len(text))]
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        start = text.find(content, cursor) if content else cursor
        if start < 0:
            raise BadRow(f"message {i} ({m['role']}) is not reproduced verbatim by the chat template")
        end = start + len(content)
        cursor = end
        if m["role"] != "assistant":
            continue
        end = _extend_to_end_token(text, end, messages, i, end_tokens)
        spans.append((start, end))
        cursor = end
    if train_on == "last_assistant":
        spans = spans[-1:]
    return spans


def _extend_to_end_token(text: str, end: int, messages: Messages, i: int, end_tokens: tuple[str, ...]) -> int:
    """Include the first end-of-turn token that follows the reply, if it comes before the next message."""
    following = messages[i + 1]["content"].strip() if i + 1 < len(messages) else ""
    nxt = text.find(following, end) if following else -1
    limit = nxt if nxt >= 0 else len(text)
    best = None
    for tok in end_tokens:
        pos = text.find(tok, end, limit)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(tok))
    return best[1] if best else end


def encode(tokenizer, messages: Messages, train_on: str, max_length: int) -> tuple[str, Encoded]:
    text = render(tokenizer, messages)
    end_tokens = tuple(t for t in END_OF_TURN_TOKENS + (tokenizer.eos_token or "",) if t and t in text)
    spans = trained_spans(text, messages, train_on, end_tokens)
    # The template already wrote BOS/special tokens: add none (same as apply_chat_template(tokenize=True)).
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if _overlaps(off, spans) else IGNORE for tok, off in zip(ids, offsets)]
    truncated = len(ids) > max_length
    return text, Encoded(ids[:max_length], labels[:max_length], truncated)


def _overlaps(off: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    a, b = off
    if a == b:  # zero-width (some special tokens): count by position
        return any(s <= a < e for s, e in spans)
    return any(a < e and b > s for s, e in spans)


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    """Plain corpus text: BOS (if the tokenizer has one) + text + EOS, every token trained."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    ids = ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return Encoded(ids[:max_length], ids[:max_length], len(ids) > max_length)
