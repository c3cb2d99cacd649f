"""Chat-template parity and loss masks: one render per conversation, labels on assistant content + end token."""

import pytest

from conftest import FIXTURES
from tuneforge.data.formats import BadRow
from tuneforge.data.render import IGNORE, encode

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
CASES = {"single": TURNS[:2], "multi": TURNS, "system_single": [SYSTEM] + TURNS[:2], "system_multi": [SYSTEM] + TURNS}
REAL = ["llama-3.2-instruct", "qwen2.5-instruct", "mistral-7b-instruct-v0.2", "phi-3-mini-4k-instruct", "tinyllama-1.1b-chat-v1.0"]
END = {"llama-3.2-instruct": "<|eot_id|>", "qwen2.5-instruct": "<|im_end|>", "mistral-7b-instruct-v0.2": "</s>",
       "phi-3-mini-4k-instruct": "<|end|>", "tinyllama-1.1b-chat-v1.0": "</s>"}


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_tiny_tokenizer_masks_exactly_assistant_and_end(tokenizer):
    text, enc = encode(tokenizer, TURNS, "assistant", 1024)
    assert text == tokenizer.apply_chat_template(TURNS, tokenize=False)
    assert trained_text(tokenizer, enc) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # Prompt tokens never carry loss: the first labelled token comes after the first assistant header.
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE)
    assert tokenizer.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_train_on_last_assistant_and_all(tokenizer):
    _, last = encode(tokenizer, TURNS, "last_assistant", 1024)
    assert trained_text(tokenizer, last) == "4<|im_end|>"
    _, everything = encode(tokenizer, TURNS, "all", 1024)
    assert everything.labels == everything.input_ids


def test_truncation_is_reported(tokenizer):
    _, enc = encode(tokenizer, TURNS, "assistant", 8)
    assert enc.truncated and len(enc.input_ids) == 8 == len(enc.labels)


def test_template_that_rewrites_content_is_a_bad_row(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(BadRow, match="not reproduced verbatim"):
        encode(tokenizer, TURNS, "assistant", 1024)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", REAL)
def test_real_tokenizer_parity(name, case):
    folder = FIXTURES / "tokenizers" / name
    if not folder.is_dir():
        pytest.skip(f"fixture tokenizer {name} not present")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    msgs = CASES[case]
    text, enc = encode(tok, msgs, "assistant", 4096)
    assert text == tok.apply_chat_template(msgs, tokenize=False)
    ref_ids = tok.apply_chat_template(msgs, tokenize=True)
    ref_ids = list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert enc.input_ids == ref_ids
    expected = "".join(m["content"] + END[name] for m in msgs if m["role"] == "assistant")
    assert trained_text(tok, enc) == expected
