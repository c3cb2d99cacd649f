"""Row formats -> conversations (a list of {"role", "content"} messages)."""

from __future__ import annotations

from typing import Any, Callable

from tuneforge.data.sources import Row

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRow(ValueError):
    """A row that cannot become a conversation; the message says which field and why."""


def detect_format(data: dict[str, Any]) -> str:
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
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


CONVERTERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
}


def to_conversation(row: Row, fmt: str, system_prompt: str | None) -> Messages:
    """Convert one row; raises BadRow with a reason (the caller adds file and row number)."""
    name = detect_format(row.data) if fmt == "auto" else fmt
    msgs = CONVERTERS[name](row.data)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRow("no assistant turn with content: nothing to train on")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs
