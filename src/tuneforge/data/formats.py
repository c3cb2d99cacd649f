"""Row formats -> conversations (a list of {"role", "content"} messages)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from tuneforge.data.sources import Row

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRow(ValueError):
    """A row that cannot become a conversation; the message says which field and why."""


IO_PAIRS = (("prompt", "completion"), ("input", "output"), ("prompt", "generation"), ("prompt", "response"))


def detect_format(data: dict[str, Any]) -> str:
    if "chosen" in data or "rejected" in data:  # a pair missing a side is a bad pair, not an SFT row
        return "preference"
    if isinstance(data.get("label"), bool) and ("messages" in data or "completion" in data):
        return "kto"
    if isinstance(data.get("prompt"), dict) and "replies" in data["prompt"]:
        return "oasst"
    if "conversations" in data and (data.get("tools") or _has_tool_turns(data["conversations"])):
        return "tool_calls"
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
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise BadRow(f"messages[{i}].role is {m['role']!r} (expected system, user, assistant or tool)")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        content = "" if m["content"] is None and calls else m["content"]  # OpenAI: content null beside tool_calls
        if not isinstance(content, str):
            raise BadRow(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content, **_openai_tool_fields(m, calls, i)})
    return out


def _openai_tool_fields(m: dict, calls: Any, i: int) -> dict:
    """OpenAI-style tool calls and tool results kept on the message, for the chat template to render."""
    if calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance((c.get("function") or c).get("name"), str) for c in calls):
            raise BadRow(f"messages[{i}].tool_calls must be a list of {{function: {{name, arguments}}}}")
        return {"tool_calls": calls}
    return {"tool_call_id": str(m["tool_call_id"])} if m["role"] == "tool" and m.get("tool_call_id") is not None else {}


def from_sharegpt(data: dict[str, Any], roles: dict[str, str] | None = None) -> Messages:
    role_map = {**SHAREGPT_ROLES, **(roles or {})}
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("field 'conversations' must be a non-empty list of {from, value}")
    out = []
    if isinstance(data.get("system"), str) and data["system"]:
        out.append({"role": "system", "content": data["system"]})
    for i, t in enumerate(turns):
        role = role_map.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise BadRow(f"conversations[{i}] needs 'from' (human/gpt/system) and a string 'value'")
        out.append({"role": role, "content": t["value"]})
    return out


def from_alpaca(data: dict[str, Any]) -> Messages:
    instruction, output = data.get("instruction"), data.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise BadRow("alpaca rows need string fields 'instruction' and 'output'")
    for key in ("input", "system"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise BadRow(f"alpaca field '{key}' must be a string, got {type(data[key]).__name__}")
    history = data.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in history):
        raise BadRow("alpaca field 'history' must be a list of [user, assistant] string pairs")
    prompt = instruction if not data.get("input") else f"{instruction}\n\n{data['input']}"
    out: Messages = []
    if data.get("system"):
        out.append({"role": "system", "content": data["system"]})
    for user, assistant in history:  # earlier turns
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
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


def from_oasst(data: dict[str, Any]) -> Messages:
    """An OpenAssistant message tree -> the conversation along the best-ranked reply at every level."""
    node, out, depth = data.get("prompt"), [], 0
    if not isinstance(node, dict):
        raise BadRow("oasst rows need a 'prompt' message tree ({role, text, replies})")
    while node:
        if not isinstance(node, dict):
            raise BadRow(f"oasst message at depth {depth} must be an object with role and text")
        if node.get("deleted"):
            break
        if not isinstance(node.get("text"), str):
            raise BadRow(f"oasst message at depth {depth} has no string 'text' (got {type(node.get('text')).__name__})")
        if node.get("role") not in ("prompter", "assistant"):
            raise BadRow(f"oasst message at depth {depth} has role {node.get('role')!r} (expected prompter or assistant)")
        out.append({"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]})
        replies = node.get("replies") or []
        if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
            raise BadRow(f"oasst message at depth {depth}: 'replies' must be a list of messages")
        replies = [r for r in replies if not r.get("deleted")]
        depth += 1
        node = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0)) if replies else None
    while out and out[-1]["role"] != "assistant":  # a conversation ends on an answer
        out.pop()
    return out


def _side(value: Any, where: str) -> Messages:
    """One side of a preference pair: a string, a ShareGPT turn, a message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict) and "from" in value:
        return from_sharegpt({"conversations": [value]})
    if isinstance(value, dict) and "role" in value:
        return from_messages({"messages": [value]})
    if isinstance(value, list):
        return from_messages({"messages": value})
    raise BadRow(f"field '{where}' must be a string, a message or a list of messages")


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_transcript(text: str) -> Messages:
    """'\n\nHuman: ...\n\nAssistant: ...' (Anthropic hh-rlhf) -> messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        raise BadRow("transcript has no 'Human:'/'Assistant:' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def from_preference(data: dict[str, Any]) -> dict[str, Messages]:
    """prompt + chosen/rejected, conversations + chosen/rejected, or two full hh-rlhf transcripts."""
    for side in ("chosen", "rejected"):
        if data.get(side) in (None, "", []):
            raise BadRow(f"missing {side}: a preference pair needs both chosen and rejected")
    if "prompt" in data:
        if not isinstance(data["prompt"], (str, list)):
            raise BadRow("field 'prompt' must be a string or a list of messages")
        prompt = [{"role": "user", "content": data["prompt"]}] if isinstance(data["prompt"], str) else from_messages({"messages": data["prompt"]})
    elif "conversations" in data:
        prompt = from_sharegpt(data)
    elif isinstance(data["chosen"], str) and isinstance(data["rejected"], str):
        chosen, rejected = _hh_transcript(data["chosen"]), _hh_transcript(data["rejected"])
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    else:
        raise BadRow("preference rows need prompt or conversations, plus chosen and rejected")
    return {"prompt": prompt, "chosen": _side(data["chosen"], "chosen"), "rejected": _side(data["rejected"], "rejected")}


def _has_tool_turns(turns: Any) -> bool:
    return isinstance(turns, list) and any(isinstance(t, dict) and t.get("from") in ("function_call", "observation") for t in turns)


def from_tool_calls(data: dict[str, Any]) -> dict[str, Any]:
    """ShareGPT with function_call / observation turns and a `tools` list -> messages with tool_calls."""
    tools = data.get("tools") or []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError:
            raise BadRow("field 'tools' is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("field 'tools' must be a list of function schemas (objects)")
    tools = [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise BadRow("field 'conversations' must be a non-empty list of {from, value}")
    out: Messages = []
    for i, t in enumerate(turns):
        kind, value = t.get("from"), t.get("value")
        if kind == "function_call":
            try:
                call = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                raise BadRow(f"conversations[{i}]: function_call value is not JSON") from None
            except RecursionError:
                raise BadRow(f"conversations[{i}]: function_call value is nested too deeply") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise BadRow(f"conversations[{i}]: function_call value must be a JSON object with a string 'name'")
            out.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": call.get("name"), "arguments": call.get("arguments", {})}}]})
        elif kind == "observation":
            if not isinstance(value, str):
                raise BadRow(f"conversations[{i}]: observation value must be a string")
            out.append({"role": "tool", "content": value})
        else:
            out += from_sharegpt({"conversations": [t]})
    return {"messages": out, "tools": tools}


CONVERTERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "input_output": from_input_output,
    "oasst": from_oasst,
}


def to_conversation(row: Row, fmt: str, system_prompt: str | None, columns: dict[str, str] | None = None,
                    roles: dict[str, str] | None = None) -> Messages | str | dict:
    """One row -> messages; a plain string (`text`); {"messages", "tools"} (`tool_calls`); or
    {"prompt", "chosen", "rejected"} (`preference`). Raises BadRow with a reason."""
    if row.problem:
        raise BadRow(row.problem)
    data = {columns.get(k, k): v for k, v in row.data.items()} if columns else row.data
    name = detect_format(data) if fmt == "auto" else fmt
    if name == "text":
        return from_text(data)
    if name == "kto":
        from tuneforge.data.preference import from_kto_row

        row = from_kto_row(data)
        return {**row, "messages": _with_system(row["messages"], system_prompt)}
    if name == "preference":
        pair = from_preference(data)
        pair["prompt"] = _with_system(pair["prompt"], system_prompt)
        return pair
    if name == "tool_calls":
        conv = from_tool_calls(data)
        _require_answer(conv["messages"], tool_ok=True)
        return {**conv, "messages": _with_system(conv["messages"], system_prompt)}
    msgs = from_sharegpt(data, roles) if name == "sharegpt" else CONVERTERS[name](data)
    if name == "messages" and (data.get("tools") or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs)):
        # OpenAI-style tool use: kept whole, so a template that cannot render it is an error, never a silent drop.
        _require_answer(msgs, tool_ok=True)
        return {"messages": _with_system(msgs, system_prompt), "tools": _tool_list(data.get("tools"))}
    _require_answer(msgs)
    return _with_system(msgs, system_prompt)


def _tool_list(tools: Any) -> list:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError:
            raise BadRow("field 'tools' is not valid JSON") from None
    if not isinstance(tools or [], list) or not all(isinstance(t, dict) for t in tools or []):
        raise BadRow("field 'tools' must be a list of function schemas (objects)")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools or []]


def _require_answer(msgs: Messages, tool_ok: bool = False) -> None:
    if not any(m["role"] == "assistant" and (m["content"].strip() or (tool_ok and m.get("tool_calls"))) for m in msgs):
        raise BadRow("no assistant turn with content: nothing to train on")


def _with_system(msgs: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + msgs
    return msgs
