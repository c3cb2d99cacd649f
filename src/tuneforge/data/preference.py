"""Preference data: pairs (prompt + chosen/rejected) and KTO rows (a conversation + a desirable label) ->
prompt tokens shared by both completions, completion tokens and their loss mask.

Each side is rendered ONCE with the chat template (prompt + completion together, so the template sees
the whole conversation), tokenized once, and cut where the completion's first reply begins: the prompt
tokens (up to and including the assistant header) are stored once per pair; a completion's trained
tokens are its replies' content + end-of-turn token, as in SFT (render.trained_spans).

Too long: `data.pair_truncation` says what is cut first. keep_end (default) keeps the prompt whole and
cuts the completions' ends; a prompt that alone fills max_length keeps its end (its newest turns and the
reply header, as TRL's keep_end) in half of max_length: a cut and counted pair, as SFT cuts and counts a
sample, not a stopped run. completion_first is the same except that such a prompt is a bad pair (on_bad_row: the error option).
prompt_first drops the prompt's oldest tokens (down to half of max_length) before cutting completions.
Counts land in the data report under `preference` (and in its top-level `truncated`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tuneforge.data.formats import BadRow, Messages, from_messages, _side
from tuneforge.data.render import IGNORE, Encoded, label_tokens, render_with_spans


@dataclass
class Completion:
    ids: list[int]  # tokens after the prompt
    labels: list[int]  # per token: its id where trained, IGNORE elsewhere

    @property
    def n_targets(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class Pair:
    """A preference pair: one prompt, two completions that continue the same prompt tokens."""
    prompt: list  # the prompt messages
    prompt_ids: list[int]
    chosen_completion: Completion
    rejected_completion: Completion

    @property
    def chosen(self) -> Encoded:
        return _full(self.prompt_ids, self.chosen_completion)

    @property
    def rejected(self) -> Encoded:
        return _full(self.prompt_ids, self.rejected_completion)


@dataclass
class Unpaired:
    """A KTO example: prompt + one completion, desirable or not."""
    prompt: list
    prompt_ids: list[int]
    completion: Completion
    desirable: bool

    @property
    def encoded(self) -> Encoded:
        return _full(self.prompt_ids, self.completion)


def _full(prompt_ids: list[int], c: Completion) -> Encoded:
    return Encoded(prompt_ids + c.ids, [IGNORE] * len(prompt_ids) + c.labels, False, len(prompt_ids) + len(c.ids))


# ---- rows -> items -------------------------------------------------------------------------------------


def is_preference_item(item: Any) -> bool:
    return isinstance(item, dict) and ("chosen" in item or "label" in item)


def from_kto_row(data: dict[str, Any]) -> dict[str, Any]:
    """{"messages": [...], "label": bool} or {"prompt", "completion", "label"} -> {"messages", "label"}.
    The completion is the conversation's last assistant reply; everything before it is the prompt."""
    label = data.get("label")
    if not isinstance(label, bool):
        raise BadRow("field 'label' must be true (desirable) or false (undesirable)")
    if "messages" in data:
        msgs = from_messages(data)
    elif "prompt" in data and "completion" in data:
        prompt = [{"role": "user", "content": data["prompt"]}] if isinstance(data["prompt"], str) else from_messages({"messages": data["prompt"]})
        msgs = prompt + _side(data["completion"], "completion")
    else:
        raise BadRow("KTO rows need messages (or prompt + completion) and a boolean label")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise BadRow("a KTO row must end with a non-empty assistant reply (the completion that is labelled)")
    return {"messages": msgs, "label": label}


def pairs_to_unpaired(pairs: list[Pair]) -> list[Unpaired]:
    """KTO from pair data: each chosen completion is desirable, each rejected one undesirable."""
    return [Unpaired(p.prompt, p.prompt_ids, c, ok) for p in pairs for c, ok in ((p.chosen_completion, True), (p.rejected_completion, False))]


# ---- encoding ------------------------------------------------------------------------------------------


def _sides(item: dict) -> tuple[Messages, list[Messages]]:
    """(prompt messages, completion message lists) of a pair or a KTO item."""
    if "chosen" in item:
        return item["prompt"], [item["chosen"], item["rejected"]]
    msgs = item["messages"]
    return msgs[:-1], [msgs[-1:]]


def encode_items(items: list[dict], tokenizer, max_length: int, truncation: str, counts: Counter) -> list:
    """Pair / KTO items -> Pair / Unpaired, or BadRow for a bad one. `counts` gets truncation counts."""
    rendered: list = []
    for item in items:
        try:
            rendered.append(_render_item(tokenizer, item))
        except BadRow as exc:
            rendered.append(exc)
    texts = [t for r in rendered if not isinstance(r, BadRow) for t, _ in r[1]]
    # The template already wrote special tokens: add none (same as apply_chat_template(tokenize=True)).
    encodings = iter(tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else [])
    out = []
    for item, r in zip(items, rendered):
        if isinstance(r, BadRow):
            out.append(r)
            continue
        encs = [next(encodings) for _ in r[1]]
        try:
            out.append(_build(item, r, encs, max_length, truncation, counts))
        except BadRow as exc:
            out.append(exc)
    return out


def _render_item(tokenizer, item: dict) -> tuple[Messages, list[tuple[str, tuple[int, list]]]]:
    """Render prompt + each completion once -> per side: (text, (cut char, completion trained spans))."""
    prompt, completions = _sides(item)
    if "chosen" in item:
        for side, msgs in zip(("chosen", "rejected"), completions):
            if not any(m["role"] == "assistant" and (m.get("content") or "").strip() for m in msgs):
                raise BadRow(f"empty {side}: no assistant reply with content")
        if completions[0] == completions[1]:
            raise BadRow("chosen and rejected are identical: the pair teaches nothing")
    sides = []
    for msgs in completions:
        if msgs[0]["role"] != "assistant":
            raise BadRow("a completion must start with an assistant reply (chosen/rejected differ before the reply)")
        # One span per assistant reply, in order (+ its end-of-turn token): the completion's are the last ones.
        text, spans = render_with_spans(tokenizer, prompt + msgs, "assistant")
        replies = sum(m["role"] == "assistant" and bool((m.get("content") or "").strip()) for m in msgs)
        spans = spans[-replies:]
        sides.append((text, (spans[0][0], spans)))
    if len(sides) == 2:  # the prompt is the text both sides share before either reply (whitespace a reply begins with may differ)
        (tc, (cc, sc)), (tr, (cr, sr)) = sides
        cut = min(cc, cr, len(os.path.commonprefix([tc, tr])))
        sides = [(tc, (cut, sc)), (tr, (cut, sr))]
    return prompt, sides


def _build(item: dict, rendered, encs: list, max_length: int, truncation: str, counts: Counter):
    prompt, sides = rendered
    prompt_ids, completions = None, []
    for (text, (cut, spans)), enc in zip(sides, encs):
        ids = enc.ids
        k = _token_at_or_after(enc, cut, len(text), len(ids))
        labels = label_tokens(enc, ids, spans)
        trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
        if not trained:
            raise BadRow("no trained completion tokens")
        last = trained[-1]  # tokens after the last trained one (e.g. the newline after <|im_end|>) teach nothing
        if prompt_ids is None:
            prompt_ids = ids[:k]
        elif ids[:k] != prompt_ids:
            counts["prompt_tokens_differ"] += 1  # a tokenizer merged across the cut; the first side's prompt is kept
        completions.append(Completion(ids[k : last + 1], labels[k : last + 1]))
    prompt_ids, completions = _truncate(prompt_ids, completions, max_length, truncation, counts)
    if "chosen" in item:
        return Pair(prompt, prompt_ids, completions[0], completions[1])
    return Unpaired(prompt, prompt_ids, completions[0], item["label"])


def _token_at_or_after(enc, char: int, n_chars: int, n_tokens: int) -> int:
    for c in range(char, n_chars):
        t = enc.char_to_token(c)
        if t is not None:
            return t
    return n_tokens


def _truncate(prompt_ids: list[int], completions: list[Completion], max_length: int, truncation: str, counts: Counter):
    if truncation == "completion_first" and len(prompt_ids) >= max_length:
        raise BadRow(f"prompt longer than max_length ({len(prompt_ids)} >= {max_length} tokens; raise data.max_length "
                     "or set data.pair_truncation: prompt_first)")
    longest = max(len(c.ids) for c in completions)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, completions
    counts["truncated_pairs"] += 1  # pairs (or KTO rows) cut in any way: the data report's top-level `truncated`
    if truncation == "keep_end" and len(prompt_ids) >= max_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_length // 2 :]  # the oldest turns go; the reply header stays
        counts["truncated_prompt"] += 1
    if truncation == "prompt_first":
        keep = max(max_length - longest, min(len(prompt_ids), max_length // 2))
        if keep < len(prompt_ids):
            prompt_ids = prompt_ids[len(prompt_ids) - keep :]  # the oldest turns go first; the reply header stays
            counts["truncated_prompt"] += 1
    room = max_length - len(prompt_ids)
    if longest > room:
        completions = [Completion(c.ids[:room], c.labels[:room]) for c in completions]
        counts["truncated_completion"] += 1
    if any(c.n_targets == 0 for c in completions):
        raise BadRow("no trained completion tokens within max_length")
    return prompt_ids, completions


# ---- cache ---------------------------------------------------------------------------------------------


def save(folder, train: list, evals: list) -> None:
    """Pairs and KTO rows of both splits -> one Arrow table (preference.arrow)."""
    import pyarrow as pa
    import pyarrow.feather as feather

    from tuneforge.data.prepare import int_lists

    rows = [(split, x) for split, xs in (("train", train), ("eval", evals)) for x in xs]
    comps = [(x.chosen_completion, x.rejected_completion) if isinstance(x, Pair) else (x.completion, None) for _, x in rows]
    table = {
        "split": pa.array([s for s, _ in rows], pa.string()),
        "prompt": pa.array([json.dumps(x.prompt) for _, x in rows], pa.string()),
        "desirable": pa.array([x.desirable if isinstance(x, Unpaired) else None for _, x in rows], pa.bool_()),
        "prompt_ids": int_lists([x.prompt_ids for _, x in rows]),
    }
    for i, side in enumerate(("chosen", "rejected")):
        table[f"{side}_ids"] = int_lists([c[i].ids if c[i] else [] for c in comps])
        table[f"{side}_labels"] = int_lists([c[i].labels if c[i] else [] for c in comps])
    feather.write_feather(pa.table(table), folder / "preference.arrow")


def load(folder) -> tuple[list, list]:
    import pyarrow.feather as feather

    path = folder / "preference.arrow"
    if not path.is_file():
        return [], []
    t = feather.read_table(path).to_pydict()
    out: dict[str, list] = {"train": [], "eval": []}
    for i, split in enumerate(t["split"]):
        prompt, pids = json.loads(t["prompt"][i]), t["prompt_ids"][i]
        chosen = Completion(t["chosen_ids"][i], t["chosen_labels"][i])
        if t["desirable"][i] is None:
            out[split].append(Pair(prompt, pids, chosen, Completion(t["rejected_ids"][i], t["rejected_labels"][i])))
        else:
            out[split].append(Unpaired(prompt, pids, chosen, t["desirable"][i]))
    return out["train"], out["eval"]


def report(train: list, evals: list, counts: Counter) -> dict:
    pairs = [x for x in train + evals if isinstance(x, Pair)]
    kto = [x for x in train + evals if isinstance(x, Unpaired)]
    lengths = [len(p.prompt_ids) + max(len(p.chosen_completion.ids), len(p.rejected_completion.ids)) for p in pairs]
    return {
        "train": len(train), "eval": len(evals), "pairs": len(pairs), "kto_rows": len(kto),
        "kto_desirable": sum(x.desirable for x in kto),
        "max_pair_tokens": max(lengths, default=0),
        "truncated_prompt": counts["truncated_prompt"], "truncated_completion": counts["truncated_completion"],
        **({"prompt_tokens_differ": counts["prompt_tokens_differ"]} if counts["prompt_tokens_differ"] else {}),
    }


# ---- inspect -------------------------------------------------------------------------------------------


def inspect(items: list, tokenizer, as_json: bool, report: dict) -> None:
    """`tuneforge data inspect` for preference data: each pair's prompt, chosen and rejected spans (KTO rows:
    prompt and completion), token by token; trained tokens highlighted."""
    def side(c: Completion) -> dict:
        return {"text": tokenizer.decode(c.ids), "ids": c.ids, "labels": c.labels}

    if as_json:
        rows = []
        for x in items:
            row = {"prompt": tokenizer.decode(x.prompt_ids), "prompt_ids": x.prompt_ids}
            if isinstance(x, Pair):
                row.update(chosen=side(x.chosen_completion), rejected=side(x.rejected_completion))
            else:
                row.update(completion=side(x.completion), desirable=x.desirable)
            rows.append(row)
        print(json.dumps(rows, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console()
    console.print(f"preference data: {json.dumps(report.get('preference', {}))}, dropped {report.get('dropped') or 'none'}", highlight=False)

    def show(label: str, ids: list[int], labels: list[int] | None, style: str) -> None:
        text = Text(f"{label}: ", style="bold")
        for k, tid in enumerate(ids):
            text.append(tokenizer.decode([tid]), style=style if labels is not None and labels[k] != IGNORE else "dim")
        console.print(text)

    for i, x in enumerate(items):
        sides = [("chosen", x.chosen_completion, "bold green"), ("rejected", x.rejected_completion, "bold red")] if isinstance(x, Pair) \
            else [("desirable" if x.desirable else "undesirable", x.completion, "bold green" if x.desirable else "bold red")]
        console.rule(f"{'pair' if isinstance(x, Pair) else 'KTO row'} {i}: prompt {len(x.prompt_ids)} tokens, "
                     + ", ".join(f"{name} {len(c.ids)} ({c.n_targets} trained)" for name, c, _ in sides))
        show("prompt", x.prompt_ids, None, "dim")
        for name, c, style in sides:
            show(name, c.ids, c.labels, style)
