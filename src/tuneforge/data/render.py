"""Render a conversation ONCE with the chat template and derive the loss mask from the template's structure.

Where each message sits is learned from a second render of the same conversation in which every content
(and every tool-call name) is a unique sentinel: the text between sentinels is the template's own text
(headers, end-of-turn tokens, default system prompts, moved system messages). The real render is then read
left to right against that structure, each content checked in place (verbatim, or trimmed the way templates
trim). No content is ever searched for in the rendered text, so a reply that also occurs in the template
("a", "model", "INST") or in another message cannot be misplaced. The sentinel render depends only on the
conversation's shape (its roles), so for plain chats it is cached per shape: one real render per
conversation, as before.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from tuneforge.data.formats import BadRow, Messages
from tuneforge.data.templates import END_OF_TURN_TOKENS

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    truncated: bool
    full_length: int = 0  # tokens before truncation
    notes: tuple[str, ...] = ()  # what the template changed (e.g. dropped the system message), for the data report


def render(tokenizer, messages: Messages, tools: list | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception() from templates, e.g. role alternation rules
        raise BadRow(f"the chat template rejected this conversation: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


_HEADERS: dict[tuple, str] = {}


def assistant_header(tokenizer) -> str:
    """The text a template puts before an assistant reply (the generation prompt), found by probing."""
    key = _template_key(tokenizer)
    if key not in _HEADERS:
        probe = [{"role": "user", "content": "probe"}]
        try:
            with_prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            without = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn has no probe-able header
            with_prompt = without = ""
        _HEADERS[key] = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    return _HEADERS[key]


def _template_key(tokenizer) -> tuple:
    # Everything a render depends on besides the messages: template text and the special tokens it may print.
    return (tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))


# ---- the template's structure -------------------------------------------------------------------------

_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template treats them specially


def _sentinel(k: int) -> str:
    return f"\ue000{k}\ue001"


@dataclass
class Structure:
    """A sentinel render cut at its sentinels: fixed[0] slot fixed[1] slot ... fixed[-1]. Everything a
    conversation of this shape needs besides its contents is computed here, once per shape."""
    text: str
    fixed: list[str]
    order: list[int]  # slot ids in the order they appear
    marks: list[tuple[int, int]]  # (start, end) of each appearance in `text`
    slots: list[tuple[int, str, int]]  # slot id -> (message index or -1 for the tools list, kind, index among its kind)
    ends: list[int] = field(default_factory=list)  # per fixed piece: length up to its first end-of-turn token, 0 if none
    appear: dict[int, list[int]] = field(default_factory=dict)  # message index -> its appearances, in text order


def _marked(messages: Messages, tools: list | None, keep_empty: bool) -> tuple[list, list | None, list[tuple[int, str, int]]]:
    """The conversation with every content / tool-call name / tool name replaced by a sentinel. Tools are
    marked first so a prefix of the conversation numbers its slots the same way."""
    slots: list[tuple[int, str, int]] = []
    count: dict[tuple[int, str], int] = {}

    def mark(owner: int, kind: str) -> str:
        n = count.get((owner, kind), 0)
        count[(owner, kind)] = n + 1
        slots.append((owner, kind, n))
        return _sentinel(len(slots) - 1)

    marked_tools = [_rename(t, lambda: mark(-1, "tool")) for t in tools] if tools else None
    out = []
    for i, m in enumerate(messages):
        m2 = dict(m)
        content = m.get("content")
        # An empty content is marked too (its slot says where the reply would be), unless the message carries
        # tool calls (templates print a separator only when there is content) or this is the fallback render.
        if isinstance(content, str) and not keep_empty and "</think>" in content and _THINK_SPLIT.sub("", content):
            # Reasoning: the tags stay (templates parse them: Qwen3 moves the reasoning, drops it from earlier
            # turns); each text between them is its own slot.
            m2["content"] = "".join(p if _THINK.fullmatch(p) else mark(i, "part") if p else "" for p in _THINK_SPLIT.split(content))
        elif isinstance(content, str) and (content.strip() or not (keep_empty or m.get("tool_calls"))):
            m2["content"] = mark(i, "content")
        if m.get("tool_calls"):
            m2["tool_calls"] = [_rename(c, lambda i=i: mark(i, "call")) for c in m["tool_calls"]]
        out.append(m2)
    return out, marked_tools, slots


_THINK = re.compile(r"</?think>")
_THINK_SPLIT = re.compile(r"(</?think>)")


def _rename(obj, new_name) -> dict:
    """A tool or tool call ({"function": {"name"}} or flat {"name"}) with its name replaced."""
    if not isinstance(obj, dict):
        return obj
    if isinstance(obj.get("function"), dict):
        return {**obj, "function": {**obj["function"], "name": new_name()}}
    return {**obj, "name": new_name()} if "name" in obj else obj


def _slot_value(slot: tuple[int, str, int], messages: Messages, tools: list | None) -> str:
    owner, kind, k = slot
    if kind == "content":
        return messages[owner]["content"]
    if kind == "part":
        return [p for p in _THINK_SPLIT.split(messages[owner]["content"]) if p and not _THINK.fullmatch(p)][k]
    return _name_of(messages[owner]["tool_calls"][k] if kind == "call" else tools[k])


def _name_of(obj) -> str:
    inner = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    return str(inner.get("name", ""))


def _structure(tokenizer, messages: Messages, tools: list | None, keep_empty: bool) -> Structure:
    marked, marked_tools, slots = _marked(messages, tools, keep_empty)
    try:
        text = tokenizer.apply_chat_template(marked, tools=marked_tools, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - content-dependent template checks (e.g. ids, alternation)
        raise BadRow(f"the chat template rejected this conversation: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    fixed, order, marks, pos = [], [], [], 0
    for m in _MARK.finditer(text):
        fixed.append(text[pos : m.start()])
        order.append(int(m.group(1)))
        marks.append((m.start(), m.end()))
        pos = m.end()
    fixed.append(text[pos:])
    appear: dict[int, list[int]] = {}
    for k, sid in enumerate(order):
        appear.setdefault(slots[sid][0], []).append(k)
    ends = END_OF_TURN_TOKENS + ((tokenizer.eos_token,) if tokenizer.eos_token else ())
    return Structure(text, fixed, order, marks, slots, [_end_of_turn(piece, ends) for piece in fixed], appear)


def _end_of_turn(piece: str, ends: tuple[str, ...]) -> int:
    """A reply is trained up to the first end-of-turn token in the template text that follows it (only
    there: never into the next message)."""
    found = [(piece.find(t), -len(t)) for t in ends if t in piece]
    return min(found)[0] - min(found)[1] if found else 0


_SHAPES: dict[tuple, Structure] = {}


def _shape_structure(tokenizer, key: tuple | None, messages: Messages, tools: list | None, keep_empty: bool, fresh: bool = False) -> Structure:
    """Cached per conversation shape for plain chats (the sentinel render depends on roles only); rendered
    per conversation when messages carry tool calls or other fields."""
    if key is None or tools or not all(m.keys() <= {"role", "content"} and "think>" not in m["content"] for m in messages):
        return _structure(tokenizer, messages, tools, keep_empty)
    shape = (key, keep_empty, tuple((m["role"], keep_empty and not m["content"].strip()) for m in messages))
    if fresh or shape not in _SHAPES:
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        _SHAPES[shape] = _structure(tokenizer, messages, tools, keep_empty)
    return _SHAPES[shape]


def _renderings(value: str):
    """How templates print a content besides as is: trimmed (jinja `trim`, Python strip / lstrip('\\n')) or
    JSON-escaped. Computed only when the content is not found as is."""
    seen = {value}
    for f in (str.strip, str.lstrip, str.rstrip, lambda v: v.strip("\n"), lambda v: v.lstrip("\n"), lambda v: v.rstrip("\n"),
              lambda v: json.dumps(v, ensure_ascii=False)[1:-1]):
        v = f(value)
        if v not in seen:
            seen.add(v)
            yield v


def _read(text: str, st: Structure, messages: Messages, tools: list | None) -> list[tuple[int, int]] | int | None:
    """(start, end) in `text` of every slot appearance. When `text` does not follow the structure: the index
    of the message whose slot does not fit (-1: the tools list), or None. Each slot is checked at the one
    place the structure puts it: nothing is searched for."""
    fixed, slots, size = st.fixed, st.slots, len(text)
    if not text.startswith(fixed[0]):
        return None
    pos, found, n = len(fixed[0]), [], len(st.order)
    for k, sid in enumerate(st.order):
        after = fixed[k + 1]
        value = _slot_value(slots[sid], messages, tools)
        end = pos + len(value)
        if not (text.startswith(value, pos) and text.startswith(after, end) and (k + 1 < n or end + len(after) == size)):
            for cand in _renderings(value):
                end = pos + len(cand)
                if text.startswith(cand, pos) and text.startswith(after, end) and (k + 1 < n or end + len(after) == size):
                    break
            else:
                return slots[sid][0]
        found.append((pos, end))
        pos = end + len(after)
    return found if pos == size else None


# ---- spans ----------------------------------------------------------------------------------------------

def locate(tokenizer, messages: Messages, tools: list | None, text: str, train_on: str, key: tuple | None = None) -> tuple[list[tuple[int, int]], tuple[str, ...]]:
    """Trained character spans [start, end) of `text` (each assistant message's content + its end-of-turn
    token), and notes on what the template changed. Raises BadRow naming the message it cannot place."""
    if train_on == "all":
        return [(0, len(text))], ()
    failed = None
    # The cached shape first; a fresh render if the template printed something time-dependent (a date);
    # then with empty contents left empty, for templates that branch on an empty message.
    for keep_empty, fresh in ((False, False), (False, True), (True, True)):
        if keep_empty and not any(isinstance(m.get("content"), str) and not m["content"].strip() for m in messages):
            break
        st = _shape_structure(tokenizer, key, messages, tools, keep_empty, fresh)
        found = _read(text, st, messages, tools)
        if isinstance(found, list):
            spans, notes = _spans(tokenizer, text, st, found, messages, tools, keep_empty)
            return (spans[-1:] if train_on == "last_assistant" else spans), notes
        failed = found if failed is None else failed
    where = ("the tools list" if failed == -1 else f"message {failed} ({messages[failed]['role']})") if failed is not None else "its fixed text"
    raise BadRow(f"the chat template rewrites a message: {where} is not reproduced verbatim (or trimmed) where the template puts it")


def _spans(tokenizer, text: str, st: Structure, found: list, messages: Messages, tools: list | None, keep_empty: bool):
    appear = st.appear
    if tools and -1 not in appear:
        raise BadRow("the chat template does not support tool calls: it does not render the tools list")
    spans, notes = [], []
    for i, m in enumerate(messages):
        ks = appear.get(i, [])
        if m["role"] != "assistant":
            if not ks and isinstance(m.get("content"), str) and m["content"].strip():
                notes.append(f"{m['role']} message dropped by the chat template")
            continue
        kinds = [st.slots[st.order[k]][1] for k in ks]
        if m.get("tool_calls") and "call" not in kinds:
            raise BadRow(f"the chat template does not support tool calls: message {i} (assistant) has tool calls the template does not render")
        if not ks:
            if keep_empty and not (m.get("content") or "").strip():
                raise BadRow(f"empty assistant reply: message {i} is rendered differently when empty")
            raise BadRow(f"the chat template does not render a message: message {i} (assistant) is missing from the text")
        if kinds.count("content") > 1:
            raise BadRow(f"the chat template renders a message twice: message {i} (assistant) appears {kinds.count('content')} times")
        first, last = ks[0], ks[-1]
        start = found[first][0] if kinds[0] != "call" else _call_start(tokenizer, st, found, first, messages[:i], tools, keep_empty)
        if kinds[0] == "part":  # a reply that opens with reasoning: its opening tag (printed by the template) is trained too
            at = st.fixed[first].rfind("<think>")
            start -= len(st.fixed[first]) - at if at >= 0 else 0
        spans.append((start, found[last][1] + st.ends[last + 1]))
    return spans, tuple(dict.fromkeys(notes))


def _call_start(tokenizer, st: Structure, found: list, first: int, before: Messages, tools, keep_empty: bool) -> int:
    """Where an assistant turn that is only tool calls starts: where the render of the conversation so far
    stops matching (the template's own text, compared sentinel render to sentinel render), after the
    assistant header. Bounded by the previous slot and the first call's name."""
    lo = st.marks[first - 1][1] if first else 0
    hi = st.marks[first][0]
    marked, marked_tools, _ = _marked(before, tools, keep_empty)
    try:
        prefix = tokenizer.apply_chat_template(marked, tools=marked_tools, tokenize=False) if marked else ""
    except Exception:  # noqa: BLE001 - a template that refuses the shorter conversation: start after the previous slot
        prefix = ""
    cut = len(os.path.commonprefix([prefix, st.text]))  # character-wise, despite the module name
    cut = min(max(cut, lo), hi)
    header = assistant_header(tokenizer)
    if header and st.text.startswith(header, cut) and cut + len(header) <= hi:
        cut += len(header)
    piece_start = found[first - 1][1] if first else 0  # the same fixed text starts here in the real render
    return piece_start + (cut - lo)


def trained_spans(tokenizer, text: str, messages: Messages, train_on: str, tools: list | None = None) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` that carry loss."""
    return locate(tokenizer, messages, tools, text, train_on, _template_key(tokenizer))[0]


def render_with_spans(tokenizer, item, train_on: str, text: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """A conversation (list) or {"messages", "tools"} -> (rendered text, trained character spans)."""
    return _render_item(tokenizer, item, train_on, text, _template_key(tokenizer))[:2]


def _render_item(tokenizer, item, train_on: str, text: str | None, key: tuple) -> tuple[str, list, tuple]:
    messages, tools = (item["messages"], item.get("tools")) if isinstance(item, dict) else (item, None)
    extra: tuple[str, ...] = ()
    if text is None:
        try:
            text = render(tokenizer, messages, tools)
        except BadRow:
            # Some templates demand call ids of their own shape (Mistral: 9 alphanumeric characters) that
            # datasets rarely carry: retry once with generated ones, linked to the tool results.
            fixed = with_call_ids(messages)
            if fixed is None:
                raise
            text, messages, extra = render(tokenizer, fixed, tools), fixed, ("tool call ids generated for the chat template",)
    spans, notes = locate(tokenizer, messages, tools, text, train_on, key)
    return text, spans, notes + extra


def with_call_ids(messages: Messages) -> Messages | None:
    """The conversation with every tool call given a 9-character alphanumeric id and every tool result the
    id of the call it answers (its own id mapped, else the oldest unanswered call). None: no tool calls."""
    if not any(m.get("tool_calls") for m in messages):
        return None
    out, renamed, waiting, n = [], {}, [], 0
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                n += 1
                calls.append({**c, "id": f"call{n:05d}"})
                if c.get("id") is not None:
                    renamed[str(c["id"])] = calls[-1]["id"]
                waiting.append(calls[-1]["id"])
            m["tool_calls"] = calls
        elif m["role"] == "tool":
            own = renamed.get(str(m.get("tool_call_id")))
            cid = own if own in waiting else (waiting[0] if waiting else None)
            if cid is not None:
                waiting.remove(cid)
                m["tool_call_id"] = cid
        out.append(m)
    return out


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
    """Items -> (text, trained spans, notes) per conversation, (text, None, ()) per corpus text, or BadRow."""
    plain = [i for i, it in enumerate(items) if isinstance(it, list) and not any(m.get("tool_calls") for m in it)]
    texts: dict[int, str] = {}
    if plain:
        try:  # one batched template call: the template is compiled and set up once per chunk
            texts = dict(zip(plain, tokenizer.apply_chat_template([items[i] for i in plain], tokenize=False)))
        except Exception:  # noqa: BLE001 - a template rejected one conversation: render one by one to name it
            texts = {}
    out: list = []
    key = _template_key(tokenizer)
    for i, item in enumerate(items):
        try:
            out.append((item, None, ()) if isinstance(item, str) else _render_item(tokenizer, item, train_on, texts.get(i), key))
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
    added = frozenset(tokenizer.added_tokens_decoder)
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
            labels = label_tokens(enc, ids, r[1], added)
        out.append(Encoded(ids[:max_length], labels[:max_length], len(ids) > max_length, len(ids), r[2]))
    return out


def label_tokens(enc, ids: list[int], spans: list[tuple[int, int]], added: frozenset = frozenset()) -> list[int]:
    """Labels = token ids for every token that overlaps a trained character span, IGNORE elsewhere; except
    a special token (`added`) that starts before the span: a header that swallowed the reply's leading
    whitespace (rstrip=True) is template text. `ids` is enc.ids, passed in because every enc.ids call
    builds a new Python list."""
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        first = _token_at(enc, range(s, e))
        last = _token_at(enc, range(e - 1, s - 1, -1))
        if first is not None and ids[first] in added and enc.offsets[first][0] < s:
            first += 1
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
    rendered = [_render_item(tokenizer, item, train_on, None, _template_key(tokenizer))]
    return rendered[0][0], _to_encoded(tokenizer, rendered, _encode_texts(tokenizer, rendered), max_length)[0]

