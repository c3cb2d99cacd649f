"""Prompt-only rows for online RL (train.method: grpo): the model writes the reply, reward functions score it.

A row is one of
    {"prompt": "text", ...}                      a user turn
    {"prompt": [{"role": ..., "content": ...}]}  a conversation (TRL's conversational prompt)
    {"messages": [...]}                          a conversation that ends before the assistant's reply
and any other columns (e.g. "answer") travel with the prompt to the reward functions. data.train[].columns
renames columns first (e.g. {question: prompt}).

Each prompt is rendered ONCE with the model's chat template plus its generation prompt (the assistant header),
exactly as inference renders it, and tokenized without adding special tokens (the template wrote them). A
completion's loss mask covers the generated tokens only: the prompt tokens are never trained.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tuneforge.config.schema import DataConfig
from tuneforge.data.formats import BadRow, Messages, _with_system, from_messages
from tuneforge.data.sources import Row, read_spec
from tuneforge.errors import UserError

PROMPT_KEYS = ("prompt", "messages")
RESERVED = ("completions", "completion_ids", "prompts")  # keyword names of a reward call


@dataclass
class Prompt:
    messages: Messages  # the conversation the model continues
    prompt_ids: list[int]  # rendered with the chat template and its generation prompt
    columns: dict[str, Any]  # the row's other fields, passed to reward functions
    where: str  # "file row n", for errors

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class PreparedPrompts:
    """What the training loop reads of prepared data, for prompt rows."""
    train: list[Prompt]
    eval: list[Prompt]
    fingerprint: str
    report: dict[str, Any]
    eval_pairs: list = field(default_factory=list)  # prompt data has no preference pairs
    cache_hit: bool = False  # rendered at every start, never cached (cheap)
    export_dir: str | None = None


def from_row(row: Row, system_prompt: str | None, columns: dict[str, str] | None = None) -> tuple[Messages, dict]:
    """One row -> (prompt messages, the other columns). Raises BadRow with a reason."""
    if row.problem:
        raise BadRow(row.problem)
    data = {columns.get(k, k): v for k, v in row.data.items()} if columns else row.data
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("field 'prompt' is empty")
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        msgs = from_messages({"messages": prompt})
    elif "messages" in data:
        msgs = from_messages(data)
    else:
        raise BadRow(f"a prompt row needs 'prompt' (text or messages) or 'messages' (keys: {sorted(data)}; rename with data.train[].columns)")
    if msgs[-1]["role"] == "assistant":
        raise BadRow("the prompt ends with an assistant turn: for grpo the model writes the reply (drop that turn; keep a "
                     "reference answer in a column, e.g. answer, for the rewards)")
    clash = [k for k in RESERVED if k in data]
    if clash:
        raise BadRow(f"column {clash[0]!r} clashes with a reward argument of the same name (rename it with data.train[].columns)")
    return _with_system(msgs, system_prompt), {k: v for k, v in data.items() if k not in PROMPT_KEYS}


def encode(tokenizer, messages: Messages) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception() from templates, e.g. role alternation rules
        raise BadRow(f"the chat template rejected this prompt: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def prepare_prompts(data_cfg: DataConfig, tokenizer, max_completion_length: int) -> PreparedPrompts:
    """data.train / data.eval -> rendered prompts, split like every dataset (data.eval_split / eval_size / eval)."""
    from tuneforge.data.prepare import _bad_row, _mix, _split, data_fingerprint

    report: dict[str, Any] = {"rows_read": 0, "dropped": Counter(), "bad_row_examples": [], "truncated": 0, "datasets": []}
    room = data_cfg.max_length - max_completion_length  # a prompt plus its longest completion fits data.max_length
    splits = []
    for specs in (data_cfg.train, data_cfg.eval):
        items = []
        for index, spec in enumerate(specs):
            got = []
            for row in read_spec(spec):
                report["rows_read"] += 1
                try:
                    msgs, cols = from_row(row, data_cfg.system_prompt, spec.columns)
                    ids = encode(tokenizer, msgs)
                    if len(ids) > room:
                        raise BadRow(f"prompt of {len(ids)} tokens leaves no room for grpo.max_completion_length ({max_completion_length}) "
                                     f"in data.max_length ({data_cfg.max_length}): raise data.max_length")
                    got.append(Prompt(msgs, ids, cols, row.where))
                except BadRow as exc:
                    _bad_row(f"{row.where}: {exc}", str(exc), data_cfg, report)
            used = _mix(got, spec, data_cfg.seed + index)
            report["datasets"].append({"name": spec.name, "converted": len(got), "used": len(used)})
            items += used
        splits.append(items)
    train, evals = splits
    if not data_cfg.eval:
        train, evals = _split(train, data_cfg, data_cfg.seed)
    if data_cfg.max_eval_samples:
        evals = evals[: data_cfg.max_eval_samples]
    if not train:
        names = ", ".join(s.name for s in data_cfg.train)
        raise UserError(f"no prompts left in {names} (dropped: {dict(report['dropped']) or 'the input is empty'})")
    lengths = [len(p) for p in train]
    report.update(dropped=dict(report["dropped"]), train_prompts=len(train), eval_prompts=len(evals),
                  max_prompt_tokens=max(lengths), mean_prompt_tokens=round(sum(lengths) / len(lengths), 1),
                  columns=sorted({k for p in train for k in p.columns}))
    fingerprint = data_fingerprint(data_cfg, tokenizer)
    report["fingerprint"] = fingerprint
    return PreparedPrompts(train, evals, fingerprint, json.loads(json.dumps(report, default=str)))
