"""Row formats -> conversations (a list of {"role", "content"} messages)."""

from __future__ import annotations

from typing import Any, Callable

from tuneforge.data.sources import Row

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRow(ValueError):
    """A row that cannot become a conversation; the message says which field and why."""


IO_PAIRS = (("prompt", "completion"), ("input", "output"), ("prompt", "generation"), ("prompt", "response"))


def detect_format(data: dict[str, Any]) -> str:
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if any(a in data and b in data for a, b in IO_PAIRS):
        return "input_output"
    if "text" in data:
        return "text"
    raise BadRow(f"cannot detect the format from keys {sorted(data)} (expected messages, conversations, or instruction+output; or set format:)")


def from_messages(data: dict[str, Any]) -> Messages:
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRow("field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"messages[{i}] must have 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRow(f"messages[{i}].role is {m['role']!r} (expected system, user or assistant)")
        if not isinstance(m["content"], str):
            raise BadRow(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def from_sharegpt(data: dict[str, Any]) -> Messages:
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("field 'conversations' must be a non-empty list of {from, value}")
    out = []
    if isinstance(data.get("system"), str) and data["system"]:
        out.append({"role": "system", "content": data["system"]})
    for i, t in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise BadRow(f"conversations[{i}] needs 'from' (human/gpt/system) and a string 'value'")
        out.append({"role": role, "content": t["value"]})
    return out


def from_alpaca(data: dict[str, Any]) -> Messages:
    instruction, output = data.get("instruction"), data.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise BadRow("alpaca rows need string fields 'instruction' and 'output'")
    prompt = instruction if not data.get("input") else f"{instruction}\n\n{data['input']}"
    out: Messages = []
    if data.get("system"):
        out.append({"role": "system", "content": str(data["system"])})
    for pair in data.get("history") or []:  # [[user, assistant], ...] earlier turns
        out += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    return out + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def from_input_output(data: dict[str, Any]) -> Messages:
    for a, b in IO_PAIRS:
        if a in data and b in data:
            if not isinstance(data[a], str) or not isinstance(data[b], str):
                raise BadRow(f"fields '{a}' and '{b}' must be strings")
            return [{"role": "user", "content": data[a]}, {"role": "assistant", "content": data[b]}]
    raise BadRow("input-output rows need prompt/completion, input/output, prompt/generation or prompt/response")


def from_text(data: dict[str, Any]) -> str:
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRow("field 'text' must be a non-empty string")
    return text


CONVERTERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "input_output": from_input_output,
}


def to_conversation(row: Row, fmt: str, system_prompt: str | None, columns: dict[str, str] | None = None) -> Messages | str:
    """Convert one row to messages (or a plain string for `text` rows); raises BadRow with a reason."""
    data = {columns.get(k, k): v for k, v in row.data.items()} if columns else row.data
    name = detect_format(data) if fmt == "auto" else fmt
    if name == "text":
        return from_text(data)
    msgs = CONVERTERS[name](data)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRow("no assistant turn with content: nothing to train on")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs
