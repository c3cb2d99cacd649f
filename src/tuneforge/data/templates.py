"""Chat templates: the tokenizer's own by default; built-ins for tokenizers without one."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tuneforge.errors import UserError

# Tokens that end a turn in common templates; the first one after an assistant reply is trained
# so the model learns to stop.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>")


def _folder():
    return resources.files("tuneforge.data").joinpath("chat_templates")


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".jinja") for p in _folder().iterdir() if p.name.endswith(".jinja"))


def resolve_template(spec: str) -> str:
    """A built-in name, a path to a .jinja file, or a literal jinja string -> template text."""
    if spec in builtin_names():
        return _folder().joinpath(f"{spec}.jinja").read_text(encoding="utf-8")
    if spec.endswith(".jinja"):
        p = Path(spec)
        if not p.is_file():
            raise UserError(f"model.chat_template: file not found: {spec}")
        return p.read_text(encoding="utf-8")
    if "{{" in spec or "{%" in spec:
        return spec
    raise UserError(f"model.chat_template: '{spec}' is not a built-in ({', '.join(builtin_names())}), a .jinja file, or a jinja string")


def apply_template_override(tokenizer, spec: str | None) -> None:
    if spec:
        tokenizer.chat_template = resolve_template(spec)
    if not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer has no chat template: set model.chat_template to one of {', '.join(builtin_names())}"
        )


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every end-of-turn token the vocabulary has (generation stops on any)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab and tok in (tokenizer.chat_template or "") and vocab[tok] not in ids:
            ids.append(vocab[tok])
    return ids
