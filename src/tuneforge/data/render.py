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
    full_length: int = 0  # tokens before truncation


def render(tokenizer, messages: Messages, tools: list | None = None) -> str:
    if (tools or any(m.get("tool_calls") for m in messages)) and "tool" not in (tokenizer.chat_template or ""):
        raise BadRow("the chat template does not support tool calls: use a model/template with tool support (e.g. Qwen2.5, Llama 3.1+)")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False)
    except Exception as exc:  # jinja raise_exception() from templates, e.g. role alternation rules
        raise BadRow(f"the chat template rejected this conversation: {exc}") from None


_HEADERS: dict[tuple[int, str], str] = {}


def assistant_header(tokenizer) -> str:
    """The text a template puts before an assistant reply (the generation prompt), found by probing."""
    key = (id(tokenizer), tokenizer.chat_template or "")
    if key not in _HEADERS:
        probe = [{"role": "user", "content": "probe"}]
        with_prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(probe, tokenize=False)
        _HEADERS[key] = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    return _HEADERS[key]


def trained_spans(text: str, messages: Messages, train_on: str, end_tokens: tuple[str, ...], header: str = "") -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` that carry loss."""
    if train_on == "all":
        return [(0, len(text))]
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = (m.get("content") or "").strip()
        if m["role"] == "assistant" and not content and m.get("tool_calls"):
            # A tool call is rendered by the template (not verbatim): train from the assistant header to its end token.
            at = text.find(header, cursor) if header else -1
            start = at + len(header) if at >= 0 else cursor
            end = _extend_to_end_token(text, start, messages, i, end_tokens)
            spans.append((start, end))
            cursor = end
            continue
        start = text.find(content, cursor) if content else cursor
        if start < 0:
            if m["role"] != "assistant":
                continue  # e.g. tool results that a template re-encodes as JSON: no loss there anyway
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
    following = (messages[i + 1].get("content") or "").strip() if i + 1 < len(messages) else ""
    nxt = text.find(following, end) if following else -1
    limit = nxt if nxt >= 0 else len(text)
    best = None
    for tok in end_tokens:
        pos = text.find(tok, end, limit)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(tok))
    return best[1] if best else end


def render_with_spans(tokenizer, item, train_on: str, text: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """A conversation (list) or {"messages", "tools"} -> (rendered text, trained character spans)."""
    messages, tools = (item["messages"], item.get("tools")) if isinstance(item, dict) else (item, None)
    text = text if text is not None else render(tokenizer, messages, tools)
    end_tokens = tuple(t for t in END_OF_TURN_TOKENS + (tokenizer.eos_token or "",) if t and t in text)
    header = assistant_header(tokenizer) if any(m.get("tool_calls") for m in messages) else ""
    return text, trained_spans(text, messages, train_on, end_tokens, header)


CHUNK = 4096  # conversations per tokenizer call: large enough for Rust's threads, small enough to pipeline


def encode_many(tokenizer, items: list, train_on: str, max_length: int) -> list:
    """Encode many items. Returns Encoded or BadRow per item. A str item is corpus text: BOS + text + EOS,
    every token trained."""
    return [enc for chunk in encode_chunks(tokenizer, items, train_on, max_length) for enc in chunk]


def encode_chunks(tokenizer, items: list, train_on: str, max_length: int, in_flight: int = 3):
    """Yield Encoded/BadRow per item, CHUNK items at a time. Pipelined: the Rust tokenizer encodes in a
    background thread (it releases the GIL) while Python renders the next chunks and labels finished
    ones; at most `in_flight` chunks wait, so memory stays bounded on large inputs."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        waiting: deque = deque()
        for i in range(0, len(items), CHUNK):
            rendered = render_many(tokenizer, items[i : i + CHUNK], train_on)
            waiting.append((rendered, pool.submit(_encode_texts, tokenizer, rendered)))
            if len(waiting) >= in_flight:
                rendered, job = waiting.popleft()
                yield _to_encoded(tokenizer, rendered, job.result(), max_length)
        while waiting:
            rendered, job = waiting.popleft()
            yield _to_encoded(tokenizer, rendered, job.result(), max_length)


def render_many(tokenizer, items: list, train_on: str) -> list:
    """Items -> (text, trained spans) per conversation, (text, None) per corpus text, or BadRow."""
    plain = [i for i, it in enumerate(items) if isinstance(it, list) and not any(m.get("tool_calls") for m in it)]
    texts: dict[int, str] = {}
    if plain:
        try:  # one batched template call: the template is compiled and set up once per chunk
            texts = dict(zip(plain, tokenizer.apply_chat_template([items[i] for i in plain], tokenize=False)))
        except Exception:  # noqa: BLE001 - a template rejected one conversation: render one by one to name it
            texts = {}
    out: list = []
    for i, item in enumerate(items):
        try:
            out.append((item, None) if isinstance(item, str) else render_with_spans(tokenizer, item, train_on, texts.get(i)))
        except BadRow as exc:
            out.append(exc)
    return out


def _encode_texts(tokenizer, rendered: list) -> list:
    # The template already wrote BOS/special tokens: add none (same as apply_chat_template(tokenize=True)).
    texts = [r[0] for r in rendered if not isinstance(r, BadRow)]
    return tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []


def _to_encoded(tokenizer, rendered: list, encodings: list, max_length: int) -> list:
    # Spans map to tokens with char_to_token (a few calls per sample), ~3x faster than reading every
    # token's offsets back into Python.
    out, k = [], 0
    for r in rendered:
        if isinstance(r, BadRow):
            out.append(r)
            continue
        enc = encodings[k]
        k += 1
        ids = enc.ids
        if r[1] is None:
            ids = _with_bos_eos(tokenizer, ids)
            labels = list(ids)
        else:
            labels = label_tokens(enc, ids, r[1])
        out.append(Encoded(ids[:max_length], labels[:max_length], len(ids) > max_length, len(ids)))
    return out


def label_tokens(enc, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Labels = token ids for every token that overlaps a trained character span, IGNORE elsewhere.
    `ids` is enc.ids, passed in because every enc.ids call builds a new Python list."""
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        first = _token_at(enc, range(s, e))
        last = _token_at(enc, range(e - 1, s - 1, -1))
        if first is not None and last is not None:
            labels[first : last + 1] = ids[first : last + 1]
    return labels


def _token_at(enc, positions) -> int | None:
    """The token holding the first character in `positions` that belongs to a token."""
    for p in positions:
        t = enc.char_to_token(p)
        if t is not None:
            return t
    return None


def _with_bos_eos(tokenizer, ids: list[int]) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos + list(ids) + eos


def encode(tokenizer, messages, train_on: str, max_length: int, tools: list | None = None) -> tuple[str, Encoded]:
    """One conversation -> (rendered text, Encoded); raises BadRow."""
    item = {"messages": messages, "tools": tools} if tools else messages
    rendered = [render_with_spans(tokenizer, item, train_on)]
    return rendered[0][0], _to_encoded(tokenizer, rendered, _encode_texts(tokenizer, rendered), max_length)[0]

