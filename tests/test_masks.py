"""Loss masks located by the template's structure (issue 10): a property-style suite over every fixture
tokenizer, every built-in template and real templates tests have never been written for (Qwen3, Gemma-3,
Gemma-2, Mistral v0.3, Phi-4-mini, SmolLM2), plus the issue's cases verbatim.

The oracle is independent of the implementation: for each assistant message it renders the conversation
with only that reply replaced by a marker, reads the reply's rendered text off the real render from the
marker's position, and takes the first end-of-turn token of the template text that follows (up to the next
message). The assertion is the mask, token by token.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest

import tiny
from conftest import FIXTURES
from helpers import run_cli, write_config
from tuneforge.data.formats import BadRow
from tuneforge.data.render import IGNORE, encode, with_call_ids
from tuneforge.data.templates import END_OF_TURN_TOKENS, builtin_names, resolve_template

# ---- real templates ---------------------------------------------------------------------------------------

# Mistral-7B-Instruct-v0.3's template (mistralai "v3"), as shipped in its tokenizer_config.json.
MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# microsoft/Phi-4-mini-instruct tokenizer_config.json (tools only as a system-message field; no tool_calls).
PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
             "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
             "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# HuggingFaceTB/SmolLM2-*-Instruct: ChatML with a default system prompt.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def trl_template(name: str) -> str | None:
    """The original model templates TRL ships (Qwen3, Gemma-3, Gemma/Gemma-2), read without importing TRL."""
    spec = importlib.util.find_spec("trl")
    path = Path(spec.origin).parent / "chat_templates" / f"{name}.jinja" if spec and spec.origin else None
    return path.read_text() if path and path.is_file() else None


# name -> (template source, bos, eos, extra special tokens)
CONSTRUCTED = {
    "qwen3": (lambda: trl_template("qwen3"), None, "<|im_end|>", ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "gemma3": (lambda: trl_template("gemma3"), "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma2": (lambda: trl_template("gemma"), "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "mistral_v03": (lambda: MISTRAL_V03, "<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "phi4_mini": (lambda: PHI4_MINI, None, "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]),
    "smollm2": (lambda: SMOLLM2, None, "<|im_end|>", []),
}
FIXTURE_NAMES = ["llama-3.2-instruct", "qwen2.5-instruct", "mistral-7b-instruct-v0.2", "phi-3-mini-4k-instruct", "tinyllama-1.1b-chat-v1.0"]


@functools.lru_cache(maxsize=None)
def fixture_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / name)


def constructed(llama_dir: Path, name: str):
    """The tiny test tokenizer with a real template's text and that template's special tokens."""
    from transformers import PreTrainedTokenizerFast

    source, bos, eos, extra = CONSTRUCTED[name]
    template = source()
    if template is None:
        pytest.skip(f"the {name} template ships with trl, which is not installed")
    tok = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    tok.add_special_tokens({"eos_token": eos, **({"bos_token": bos} if bos else {}), "additional_special_tokens": extra})
    tok.chat_template = template
    return tok


def builtin(llama_dir: Path, name: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    tok.chat_template = resolve_template(name)
    return tok


def get_tokenizer(llama_dir: Path, kind: str, name: str):
    if kind == "fixture":
        if not (FIXTURES / "tokenizers" / name).is_dir():
            pytest.skip(f"fixture tokenizer {name} not present")
        return fixture_tokenizer(name)
    return builtin(llama_dir, name) if kind == "builtin" else constructed(llama_dir, name)


ALL = [("fixture", n) for n in FIXTURE_NAMES] + [("builtin", n) for n in builtin_names()] + [("constructed", n) for n in CONSTRUCTED]

# ---- the oracle ---------------------------------------------------------------------------------------------

MARK, NEXT = "\u27e6reply\u27e7", "\u27e6next\u27e7"


def _with(msgs: list, replace: dict) -> list:
    return [{**m, "content": replace[i]} if i in replace else m for i, m in enumerate(msgs)]


def expected_spans(tok, msgs: list) -> list[tuple[int, int]] | None:
    """Per assistant message: [start, end) of its rendered reply + its own end-of-turn token. None when the
    template does not reproduce a reply where it put the marker (it rewrites the reply)."""
    text = tok.apply_chat_template(msgs, tokenize=False)
    ends = END_OF_TURN_TOKENS + ((tok.eos_token,) if tok.eos_token else ())
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        one = tok.apply_chat_template(_with(msgs, {i: MARK}), tokenize=False)
        p = one.index(MARK)
        tail = one[p + len(MARK):]
        if not (text.startswith(one[:p]) and text.endswith(tail)) or len(text) - len(tail) < p:
            return None
        reply = text[p : len(text) - len(tail)]
        c = m["content"]
        if reply not in {c, c.strip(), c.lstrip(), c.rstrip(), c.strip("\n"), c.lstrip("\n"), c.rstrip("\n")}:
            return None
        between = tail
        if i + 1 < len(msgs):
            two = tok.apply_chat_template(_with(msgs, {i: MARK, i + 1: NEXT}), tokenize=False)
            a, b = two.index(MARK) + len(MARK), two.find(NEXT)
            between = two[a:b] if b >= a else tail
        found = [(between.find(t), len(t)) for t in ends if t in between]
        end = p + len(reply) + (min(found)[0] + min(found)[1] if found else 0)
        spans.append((p, end))
    return spans


def expected_labels(tok, text: str, spans: list) -> tuple[list[int], list[int]]:
    """Tokens overlapping a span are trained, except a special token that starts before it (a header that
    swallowed the reply's leading whitespace is template text)."""
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    added = set(tok.added_tokens_decoder)
    labels = [t if any(a < e and b > s and not (t in added and a < s) for s, e in spans) else IGNORE
              for t, (a, b) in zip(enc.ids, enc.offsets)]
    return enc.ids, labels


def trained(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def check(tok, msgs: list, failures: list, train_on: str = "assistant") -> None:
    try:
        reference = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - the template rejects this conversation: so must we, as a bad row
        with pytest.raises(BadRow):
            encode(tok, msgs, train_on, 1 << 16)
        return
    spans = expected_spans(tok, msgs)
    if spans is None:  # the template rewrites a reply: a bad row, never a guessed mask
        try:
            encode(tok, msgs, train_on, 1 << 16)
            failures.append(("expected a bad row", msgs))
        except BadRow:
            pass
        return
    try:
        text, enc = encode(tok, msgs, train_on, 1 << 16)
    except BadRow as exc:
        failures.append((f"bad row: {exc}", msgs))
        return
    assert text == reference
    ids, labels = expected_labels(tok, text, spans[-1:] if train_on == "last_assistant" else spans)
    assert enc.input_ids == ids
    if enc.labels != labels:
        failures.append((f"trained {trained(tok, ids, enc.labels)!r}, expected {trained(tok, ids, labels)!r}", msgs))


def template_words(tok) -> list[str]:
    """Replies drawn from the template's own fixed text: special-token text, header words, single letters."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": MARK}, {"role": "assistant", "content": NEXT}], tokenize=False)
    except Exception:  # noqa: BLE001
        return ["a", "assistant"]
    fixed = text.replace(MARK, " ").replace(NEXT, " ")
    specials = sorted(set(re.findall(r"<\|?/?[\w]+\|?>|\[/?[A-Z_]+\]", fixed)))
    words = sorted(set(re.findall(r"[A-Za-z]{2,}", fixed)))
    letters = sorted(set(re.findall(r"[A-Za-z]", fixed)))
    return specials[:6] + words[:8] + letters[::max(1, len(letters) // 6)][:6]


EDGE_REPLIES = ["a", "", " ", "\n", "  padded  ", "\tx = 1", "trailing\n", "\n\nleading newlines"]


def conversations(reply: str) -> list[list[dict]]:
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    return [
        [u("Pick one"), a(reply)],
        [u(reply if reply.strip() else "q"), a(reply)],  # the reply equals the user's text
        [{"role": "system", "content": "Be brief."}, u("q"), a(reply), u("again")],  # system + ends with user
        [u("q"), a(reply), u("q"), a(reply)],  # repeated identical turns
    ]


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_mask_is_exactly_each_reply_and_its_end_token(llama_dir, kind, name):
    tok = get_tokenizer(llama_dir, kind, name)
    failures: list = []
    for reply in EDGE_REPLIES + template_words(tok):
        for msgs in conversations(reply):
            check(tok, msgs, failures)
    check(tok, conversations("x")[3][:3] + [{"role": "assistant", "content": ""}], failures, "last_assistant")
    assert not failures, "\n".join(f"{why}: {json.dumps(m)}" for why, m in failures[:8])


# ---- the issue's cases, verbatim ------------------------------------------------------------------------

def conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns)]


def trained_text(tok, msgs, train_on="assistant") -> str:
    _, enc = encode(tok, msgs, train_on, 4096)
    return trained(tok, enc.input_ids, enc.labels)


def test_issue_single_letter_and_header_word_replies(llama_dir):
    qwen3 = constructed(llama_dir, "qwen3")
    assert trained_text(qwen3, conv("Pick a letter", "a")) == "a<|im_end|>"
    assert trained_text(qwen3, conv("a", "a")) == "a<|im_end|>"
    _, enc = encode(qwen3, conv("a", "a"), "assistant", 4096)
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE)
    assert qwen3.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the user's "a" is not trained
    gemma3 = constructed(llama_dir, "gemma3")
    assert trained_text(gemma3, conv("q", "e")) == "e<end_of_turn>"
    assert trained_text(gemma3, conv("q", "model")) == "model<end_of_turn>"
    mistral = constructed(llama_dir, "mistral_v03")
    assert trained_text(mistral, conv("q", "INST")).strip() == "INST</s>"
    phi4 = constructed(llama_dir, "phi4_mini")
    assert trained_text(phi4, conv("q", "a")) == "a<|end|>"


def test_issue_empty_reply_trains_its_own_end_token(llama_dir):
    qwen3 = constructed(llama_dir, "qwen3")
    msgs = conv("First question", "")
    _, enc = encode(qwen3, msgs, "last_assistant", 4096)
    trained_at = [i for i, lab in enumerate(enc.labels) if lab != IGNORE]
    assert len(trained_at) == 1 and trained_at[0] == len(enc.input_ids) - 2  # <|im_end|> before the final "\n"
    assert qwen3.decode(enc.input_ids[: trained_at[0]]).endswith("</think>\n\n")
    mistral = constructed(llama_dir, "mistral_v03")
    _, enc = encode(mistral, conv("q", ""), "assistant", 4096)
    assert [i for i, lab in enumerate(enc.labels) if lab != IGNORE] == [len(enc.input_ids) - 1]  # its own </s>, not [/INST]


def test_issue_leading_whitespace_is_trained_where_the_template_keeps_it(llama_dir):
    for tok in (constructed(llama_dir, "qwen3"), constructed(llama_dir, "smollm2")):
        assert trained_text(tok, conv("q", "\tx = 1")) == "\tx = 1<|im_end|>"
    if (FIXTURES / "tokenizers" / "phi-3-mini-4k-instruct").is_dir():
        phi3 = fixture_tokenizer("phi-3-mini-4k-instruct")
        _, enc = encode(phi3, conv("q", "\tx = 1"), "assistant", 4096)
        ids, labels = expected_labels(phi3, phi3.apply_chat_template(conv("q", "\tx = 1"), tokenize=False),
                                      expected_spans(phi3, conv("q", "\tx = 1")))
        assert enc.labels == labels
        # This tokenizer's <|assistant|> strips the whitespace after it (rstrip=True): no token carries the tab.
        assert trained(phi3, ids, labels) == "x = 1<|end|>"


def test_issue_mistral_v03_system_message(llama_dir):
    mistral = constructed(llama_dir, "mistral_v03")
    ends_with_user = [{"role": "system", "content": "Be brief."}] + conv("q", "fine", "again")
    assert trained_text(mistral, ends_with_user).strip() == "fine</s>"  # accepted: the system text sits in the last user turn
    _, enc = encode(mistral, [{"role": "system", "content": "Be brief."}] + conv("q", "fine"), "assistant", 4096)
    assert enc.notes == ("system message dropped by the chat template",)
    assert encode(mistral, ends_with_user, "assistant", 4096)[1].notes == ()


def test_reasoning_replies_train_what_the_template_keeps(llama_dir):
    qwen3 = constructed(llama_dir, "qwen3")  # parses <think>: keeps reasoning in the last turn only
    last = "<think>\nreason here\n</think>\n\nthe answer"
    assert trained_text(qwen3, conv("q", last)) == "<think>\nreason here\n</think>\n\nthe answer<|im_end|>"
    _, enc = encode(qwen3, conv("q", "<think>\nr1\n</think>\n\nA1", "q2", "<think>\nr2\n</think>\n\nA2"), "assistant", 4096)
    runs = qwen3.decode([t if lab != IGNORE else qwen3.pad_token_id for t, lab in zip(enc.input_ids, enc.labels)])
    assert [r for r in runs.split("<pad>") if r] == ["A1<|im_end|>", "<think>\nr2\n</think>\n\nA2<|im_end|>"]
    chatml = builtin(llama_dir, "chatml")  # prints the content as is
    assert trained_text(chatml, conv("q", last)) == last + "<|im_end|>"


def tool_row(call_id=None):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    return [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{**call, **({"id": call_id} if call_id else {})}]},
            {"role": "tool", "content": '{"temp": 3}', **({"tool_call_id": call_id} if call_id else {})},
            {"role": "assistant", "content": "It is 3 degrees."}]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls_only_where_the_template_renders_them(llama_dir):
    phi4 = constructed(llama_dir, "phi4_mini")  # mentions "tools" but cannot render a call
    with pytest.raises(BadRow, match="does not support tool calls"):
        encode(phi4, tool_row(), "assistant", 4096, tools=TOOLS)
    qwen3 = constructed(llama_dir, "qwen3")
    text, enc = encode(qwen3, tool_row(), "assistant", 4096, tools=TOOLS)
    out = trained(qwen3, enc.input_ids, enc.labels)
    assert out == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>It is 3 degrees.<|im_end|>'


def test_mistral_call_ids_are_generated_when_the_template_demands_them(llama_dir):
    mistral = constructed(llama_dir, "mistral_v03")
    text, enc = encode(mistral, tool_row("call_8f2a41c"), "assistant", 4096, tools=TOOLS)
    assert '"id": "call00001"' in text and '"call_id": "call00001"' in text
    assert "tool call ids generated for the chat template" in enc.notes
    out = trained(mistral, enc.input_ids, enc.labels)
    assert out.startswith("[TOOL_CALLS]") and '"name": "get_weather"' in out and out.endswith("It is 3 degrees.</s>")
    assert "[/INST]" not in out and "Oslo?" not in out and "temp" not in out
    assert [m.get("tool_call_id") for m in with_call_ids(tool_row())] == [None, None, "call00001", None]


# ---- prepare: file and row in every error, skipped rows counted by reason ----------------------------------

def _prepare(tmp_path, tok, rows, **data):
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.prepare import prepare

    path = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig.model_validate({"train": [{"path": str(path)}], "cache_dir": str(tmp_path / "cache"), "eval_split": 0.0, **data})
    return prepare(cfg, tok)


def test_prepare_names_file_and_row_and_counts_skips(tmp_path, llama_dir):
    from tuneforge.errors import UserError

    gemma2 = constructed(llama_dir, "gemma2")  # rejects system messages
    good = {"messages": conv("q", "fine")}
    bad = {"messages": [{"role": "system", "content": "s"}] + conv("q", "x")}
    with pytest.raises(UserError, match=r"rows\.jsonl\W+(row )?2: the chat template rejected this conversation"):
        _prepare(tmp_path, gemma2, [good, bad, good])
    data = _prepare(tmp_path, gemma2, [good, bad, {"messages": conv("p", "y")}], on_bad_row="skip")
    assert data.report["dropped"] == {"the chat template rejected this conversation": 1}
    assert data.report["train_samples"] == 2
    mistral = constructed(llama_dir, "mistral_v03")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}] + conv(f"q{i}", "fine")} for i in range(3)]
    assert _prepare(tmp_path / "m", mistral, rows).report["changed_by_template"] == {"system message dropped by the chat template": 3}


def test_a_rejected_preference_pair_names_file_and_row(tmp_path, llama_dir):
    from tuneforge.errors import UserError

    pair = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError, match=r"rows\.jsonl\W+(row )?1: the chat template rejected this conversation"):
        _prepare(tmp_path, constructed(llama_dir, "gemma2"), [pair])


def test_empty_replies_train_their_end_token_or_follow_on_bad_row(tmp_path, tokenizer):
    rows = [{"messages": conv("q", "", "again", "fine")}, {"messages": conv("p", "ok")}]
    data = _prepare(tmp_path, tokenizer, rows)
    assert trained(tokenizer, data.train[0].input_ids, data.train[0].labels) == "<|im_end|>fine<|im_end|>"
    skipped = _prepare(tmp_path / "s", tokenizer, rows, empty_replies="bad_row", on_bad_row="skip")
    assert skipped.report["dropped"] == {"empty assistant reply": 1} and skipped.report["train_samples"] == 1


def test_openai_tool_calls_in_a_messages_row_are_kept_or_named(tmp_path, llama_dir):
    from tuneforge.errors import UserError

    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}],
           "tools": TOOLS}
    data = _prepare(tmp_path, constructed(llama_dir, "qwen3"), [row], clean={"min_tokens": 1})
    assert "get_weather" in trained(constructed(llama_dir, "qwen3"), data.train[0].input_ids, data.train[0].labels)
    with pytest.raises(UserError, match=r"rows\.jsonl\W+(row )?1: the chat template does not support tool calls"):
        _prepare(tmp_path / "p", constructed(llama_dir, "phi4_mini"), [row])


@pytest.mark.slow
def test_prepare_table_shows_skips_by_reason(tmp_path, llama_dir):
    rows = [{"messages": conv("q", "fine")}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}]
    cfg = write_config(tmp_path / "c.yaml", llama_dir, tiny.write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "run",
                       data={"on_bad_row": "skip", "eval_split": 0.0})
    proc = run_cli("prepare", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dropped: the chat template does not support tool calls" in proc.stdout
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["dropped"] == {"the chat template does not support tool calls": 1}
    assert re.match(re.escape(str(tmp_path / "t.jsonl")) + r"\W+(row )?2: the chat template", report["bad_row_examples"][0])


# ---- tokenizer folders ----------------------------------------------------------------------------------------

def test_a_folder_without_vocabulary_is_refused(tmp_path):
    from tuneforge.config.schema import ModelConfig
    from tuneforge.errors import UserError
    from tuneforge.model.load import load_tokenizer, resolve_model_dir

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}))
    cfg = ModelConfig(path=str(tmp_path))
    with pytest.raises(UserError, match="no tokenizer vocabulary .missing tokenizer.json or tokenizer.model"):
        load_tokenizer(resolve_model_dir(cfg, need_weights=False), cfg)


def test_a_sentencepiece_only_folder_loads(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = FIXTURES / "tokenizers" / "mistral-7b-instruct-v0.2" / "tokenizer.model"
    if not model.is_file():
        pytest.skip("fixture tokenizer.model not present")
    from tuneforge.config.schema import ModelConfig
    from tuneforge.model.load import load_tokenizer, resolve_model_dir

    (tmp_path / "tokenizer.model").write_bytes(model.read_bytes())
    cfg = ModelConfig(path=str(tmp_path), chat_template="mistral")
    tok = load_tokenizer(resolve_model_dir(cfg, need_weights=False), cfg)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for s in ["Hello, how are you?", "x = 1\n\tif y:\n\t\treturn", "Grüße aus Köln"]:
        assert tok(s, add_special_tokens=False)["input_ids"] == sp.encode(s)
    assert len(tok) == 32000 and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert trained_text(tok, conv("q", "fine")).endswith("fine</s>")
