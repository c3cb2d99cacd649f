"""prepare(config) -> tokenized train/eval splits (and preference pairs), cached in Arrow by a hash of
everything that affects them.

Pipeline: read rows -> convert to conversations -> mix datasets -> clean -> split -> encode (one
render per conversation) -> token-length filters -> corpus blocks (optional) -> cache + report
(-> cleaned.jsonl, train.jsonl, val.jsonl in data.export_dir: data/export.py).

Phases that can take more than a few seconds (clean, tokenize, pack) show progress: a bar on a terminal,
a line about every 10 s when piped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data.clean import clean
from tuneforge.data.formats import BadRow, to_conversation
from tuneforge.data.render import IGNORE, Encoded, encode_chunks
from tuneforge.data.sources import read_spec
from tuneforge.errors import UserError

CACHE_VERSION = "4"  # bump when the encoding logic changes, so old caches are never served
PROGRESS_MIN_ITEMS = 10_000  # fewer items take under a few seconds a phase: no progress lines for them


def _stderr(message: str) -> None:
    # Progress and notes go to stderr: stdout stays the command's output (`data inspect --json`).
    print(message, file=sys.stderr, flush=True)


def progress(name: str, total: int, log):
    """tuneforge.progress.phase for work on `total` items; a silent counter for small work."""
    from tuneforge.progress import Phase, phase

    if total >= PROGRESS_MIN_ITEMS:
        return phase(name, total, log=log)
    return nullcontext(Phase(name, total, lambda *_: None, float("inf")))


class Sample:
    """Token ids + labels of one training sample, and the item it came from (decoded on first use)."""

    __slots__ = ("_ids", "_labels", "_messages", "_json", "_n_targets")

    def __init__(self, input_ids, labels, messages: Any = None, messages_json: str | None = None, n_targets: int | None = None):
        # ids/labels may arrive as (buffer, start, end) into an Arrow column; they become lists on first
        # use, so neither a cache hit nor a 1M-row preparation holds a Python object per token.
        self._ids, self._labels = input_ids, labels
        self._messages, self._json, self._n_targets = messages, messages_json, n_targets

    @property
    def input_ids(self) -> list[int]:
        if isinstance(self._ids, tuple):
            self._ids = _slice(self._ids)
        return self._ids

    def __len__(self) -> int:
        """Token count, without turning a cached slice into a list."""
        return self._ids[2] - self._ids[1] if isinstance(self._ids, tuple) else len(self._ids)

    @property
    def labels(self) -> list[int]:
        if isinstance(self._labels, tuple):
            self._labels = _slice(self._labels)
        return self._labels

    @property
    def messages(self) -> Any:
        """A conversation (list), corpus text (str) or {"messages", "tools"}."""
        if self._messages is None and self._json is not None:
            self._messages = json.loads(self._json)
        return self._messages

    def messages_json(self) -> str:
        return self._json if self._json is not None else json.dumps(self._messages)

    @property
    def n_targets(self) -> int:
        if self._n_targets is None:
            self._n_targets = len(self.labels) - self.labels.count(IGNORE)
        return self._n_targets


@dataclass
class Prepared:
    train: list[Sample]
    eval: list[Sample]
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = False
    pairs: list = field(default_factory=list)  # preference pairs / KTO rows (data.preference.Pair / Unpaired)
    eval_pairs: list = field(default_factory=list)  # held out: reward accuracy is measured on them
    units: list[list[int]] = field(default_factory=list)  # what an epoch shuffles: samples or bins
    export_dir: Path | None = None  # where cleaned.jsonl / train.jsonl / val.jsonl were written (data.export_dir)


def prepare(data_cfg: DataConfig, tokenizer, log=_stderr) -> Prepared:
    from tuneforge.data import export

    fingerprint = data_fingerprint(data_cfg, tokenizer)
    cache_dir = cache_path(data_cfg, fingerprint)
    out = _export_target(data_cfg)
    if out is not None:
        export.check_target(out, [s.path for s in data_cfg.train + data_cfg.eval if s.path])
    if (cache_dir / "report.json").is_file() and (out is None or export.is_current(out, fingerprint)):
        if out is not None:
            log(f"data already written: {out} (train.jsonl, val.jsonl, cleaned.jsonl of this data)")
        return _with_packing(_load_cache(cache_dir, fingerprint), data_cfg, log, out)
    # A cache without the requested files is prepared again: the cleaned rows before the split are not cached.
    report: dict[str, Any] = {"rows_read": 0, "dropped": Counter(), "skipped": Counter(), "bad_row_examples": [], "truncated": 0,
                              "datasets": []}
    items = _read_all(data_cfg.train, data_cfg, report)
    eval_items = _read_all(data_cfg.eval, data_cfg, report) if data_cfg.eval else []
    items = clean(items, data_cfg.clean, data_cfg.seed, report["dropped"], lambda name, n: progress(f"clean: {name}", n, log))
    report["rows_after_clean"] = len(items)
    cleaned = items
    pref_items, items = _apart(items)
    eval_pref, eval_items = _apart(eval_items)
    if not data_cfg.eval:
        items, eval_items = _split(items, data_cfg, data_cfg.seed)
        pref_items, eval_pref = _split(pref_items, data_cfg, data_cfg.seed)
    if data_cfg.max_eval_samples:
        eval_items, eval_pref = eval_items[: data_cfg.max_eval_samples], eval_pref[: data_cfg.max_eval_samples]
    train, evals, pairs, eval_pairs, pref_counts, split_items = _encode_splits(
        (items, eval_items, pref_items, eval_pref), tokenizer, data_cfg, report, log)
    if data_cfg.group_texts:
        train, evals = _blocks(train, data_cfg.block_size, report), _blocks(evals, data_cfg.block_size, report)
    if not train and not pairs:
        names = ", ".join(s.name for s in data_cfg.train)
        raise UserError(f"no training samples left in {names} (dropped: {dict(report['dropped']) or 'the input is empty'})")
    report = _finish_report(report, train, evals, pairs + eval_pairs, fingerprint)
    if pairs or eval_pairs:
        from tuneforge.data import preference

        report["preference"] = preference.report(pairs, eval_pairs, pref_counts)
    if out is not None:  # before the cache: the other ranks of a distributed run start when its report.json appears
        export.write(out, fingerprint, {"cleaned": cleaned, **split_items}, report, log)
    _save_cache(cache_dir, train, evals, (pairs, eval_pairs), report)
    return _with_packing(Prepared(train, evals, fingerprint, report, pairs=pairs, eval_pairs=eval_pairs), data_cfg, log, out)


def _encode_splits(parts: tuple, tokenizer, data_cfg: DataConfig, report: dict, log):
    """(SFT train, SFT eval, pairs train, pairs eval) items -> encoded, with truncation counts and the kept
    items of each split (what export writes as train.jsonl / val.jsonl, before corpus blocks cut across them)."""
    items, eval_items, pref_items, eval_pref = parts
    with progress("tokenize", sum(map(len, parts)), log) as bar:
        train = _encode_all(items, tokenizer, data_cfg, report, bar)
        evals = _encode_all(eval_items, tokenizer, data_cfg, report, bar)
        pairs, eval_pairs, pref_counts, kept = _encode_preference(pref_items, eval_pref, tokenizer, data_cfg, report, bar)
    report["truncated"] += pref_counts["truncated_pairs"]
    split_items = {"train": [s.messages for s in train] + kept[0], "val": [s.messages for s in evals] + kept[1]}
    return train, evals, pairs, eval_pairs, pref_counts, split_items


def _export_target(data_cfg: DataConfig) -> Path | None:
    """data.export_dir, for one process only: in a distributed run the main rank writes the files."""
    if not data_cfg.export_dir or os.environ.get("RANK", "0") != "0":
        return None
    return Path(data_cfg.export_dir).expanduser()


def _apart(items: list) -> tuple[list, list]:
    """-> (preference pairs and KTO rows, everything else)."""
    from tuneforge.data.preference import is_preference_item

    return [it for it in items if is_preference_item(it)], [it for it in items if not is_preference_item(it)]


def _with_packing(data: Prepared, data_cfg: DataConfig, log=_stderr, export_dir: Path | None = None) -> Prepared:
    # Packing is not part of the cached data (it is not in the fingerprint): it is planned here, once.
    from tuneforge.data.packing import packing_stats, units

    lengths = [len(s) for s in data.train]
    with progress("pack", len(lengths) if data_cfg.packing == "bins" else 0, log):
        data.units = units(lengths, data_cfg.packing, data_cfg.bin_tokens)
    data.export_dir = export_dir
    stats = packing_stats(lengths, data_cfg.packing, data_cfg.bin_tokens, data.units if data_cfg.packing == "bins" else None)
    data.report = {**data.report, "packing": stats}
    return data


def cache_path(data_cfg: DataConfig, fingerprint: str) -> Path:
    return Path(data_cfg.cache_dir) / fingerprint


def data_fingerprint(data_cfg: DataConfig, tokenizer) -> str:
    """Hash of input contents, tokenizer (vocab, merges, specials), template text, every data option."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for spec in data_cfg.train + data_cfg.eval:
        h.update(_source_digest(spec))
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    options = data_cfg.model_dump(exclude={"cache_dir", "packing", "num_proc", "export_dir"})
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _source_digest(spec: DatasetSpec) -> bytes:
    if spec.custom:
        # Custom code can change without a file changing: hash its rows (they are read anyway).
        from tuneforge.data.registry import custom_rows

        return hashlib.sha256(json.dumps([r.data for r in custom_rows(spec.custom, spec.options)], sort_keys=True, default=str).encode()).digest()
    p = Path(spec.path)
    if not p.exists():
        if "/" in spec.path and not spec.path.startswith((".", "/", "~")):
            return f"hub:{spec.path}:{spec.subset}:{spec.split}".encode()  # hub datasets are versioned by `datasets`
        raise UserError(f"data file not found: {spec.path} (check data.train / data.eval paths)")
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
        h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.digest()


def _read_all(specs: list[DatasetSpec], data_cfg: DataConfig, report: dict) -> list:
    items = []
    where = report.setdefault("_where", {})  # id(item) -> "file:row", so encoding errors name the row
    for index, spec in enumerate(specs):
        got = []
        for row in read_spec(spec):
            report["rows_read"] += 1
            try:
                got.append(to_conversation(row, spec.format, data_cfg.system_prompt, spec.columns, spec.roles))
                where[id(got[-1])] = row.where
            except BadRow as exc:
                _bad_row(f"{row.where}: {exc}", str(exc), data_cfg, report)
        used = _mix(got, spec, data_cfg.seed + index)
        report["datasets"].append({"name": spec.name, "converted": len(got), "used": len(used)})
        items += used
    return items


def _mix(items: list, spec: DatasetSpec, seed: int) -> list:
    """Resample one dataset to `samples` rows, or weight x its size; deterministic for a seed."""
    target = spec.samples if spec.samples else round(len(items) * spec.weight)
    if target == len(items) or not items:
        return items
    rng = random.Random(seed)
    whole, rest = divmod(target, len(items))
    return items * whole + rng.sample(items, rest)


def _bad_row(where: str, reason: str, data_cfg: DataConfig, report: dict) -> None:
    if data_cfg.on_bad_row == "error":
        raise UserError(f"{where} (fix the row, or set data.on_bad_row: skip)")
    key = reason.split(" (")[0].split(":")[0][:48]
    report["dropped"][key] += 1
    report["skipped"][key] += 1  # the bad rows alone (`dropped` also counts cleaning and length filters)
    if len(report["bad_row_examples"]) < 5:
        report["bad_row_examples"].append(where)


def _split(items: list, data_cfg: DataConfig, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if data_cfg.eval_size:
        if items and data_cfg.eval_size >= len(items):  # never shrink it silently
            raise UserError(f"data.eval_size ({data_cfg.eval_size}) leaves no training data: {len(items)} samples "
                            "remain after cleaning (lower data.eval_size)")
        n_eval = data_cfg.eval_size
    elif data_cfg.eval_split > 0 and len(items) > 1:
        n_eval = max(1, round(len(items) * data_cfg.eval_split))
    else:
        n_eval = 0
    held = set(order[:n_eval])
    return [c for i, c in enumerate(items) if i not in held], [items[i] for i in order[:n_eval]]


def _encode_all(items: list, tokenizer, data_cfg: DataConfig, report: dict, bar) -> list[Sample]:
    """Encode, drop bad/too-long rows (counted), and keep tokens in Arrow buffers, not Python ints."""
    ids, labels, messages, kept, n_targets = [], [], [], [], []
    for offset, ch in _encoded_chunks(items, tokenizer, data_cfg):
        bar.advance(len(ch.bad) + sum(ch.dropped.values()) + len(ch.kept))
        for k, msg in ch.bad:
            _bad_row(f"{report.get('_where', {}).get(id(items[offset + k]), 'conversation')}: {msg}", msg, data_cfg, report)
        report["dropped"].update(ch.dropped)
        report.setdefault("changed_by_template", Counter()).update(ch.changed)
        report["truncated"] += ch.truncated
        ids.append(ch.ids)
        labels.append(ch.labels)
        messages += ch.messages
        kept += [items[offset + k] for k in ch.kept]
        n_targets += ch.n_targets
    if not kept:
        return []
    import pyarrow as pa

    id_refs, label_refs = _lists(pa.concat_arrays(ids)), _lists(pa.concat_arrays(labels))
    return [Sample(*refs, item, m, n) for *refs, item, m, n in zip(id_refs, label_refs, kept, messages, n_targets)]


@dataclass
class _Chunk:
    """One encoded chunk after the per-row checks: what a worker process sends back (Arrow arrays
    pickle as flat buffers, unlike lists of Python ints)."""
    kept: list[int]  # positions in the chunk
    ids: Any
    labels: Any
    n_targets: list[int]
    messages: list[str]
    bad: list[tuple[int, str]]  # (position in the chunk, reason)
    dropped: Counter
    truncated: int
    changed: Counter = field(default_factory=Counter)  # what the template changed in kept rows (render notes)


def _check_chunk(items: list, encoded: list, data_cfg: DataConfig) -> _Chunk:
    ch = _Chunk([], None, None, [], [], [], Counter(), 0)
    keep = []
    for k, (item, enc) in enumerate(zip(items, encoded)):
        if data_cfg.empty_replies == "bad_row" and not isinstance(enc, BadRow) and _empty_reply(item):
            enc = BadRow("empty assistant reply: the row has an assistant turn with no text (or set data.empty_replies: train_end_token)")
        if isinstance(enc, BadRow):
            ch.bad.append((k, str(enc)))
            continue
        n = len(enc.labels) - enc.labels.count(IGNORE)
        reason = _length_problem(enc, n, data_cfg)
        if reason:
            ch.dropped[reason] += 1
            continue
        ch.truncated += enc.truncated
        ch.changed.update(enc.notes)
        ch.kept.append(k)
        ch.n_targets.append(n)
        keep.append((enc, item))
    ch.ids, ch.labels = int_lists([e.input_ids for e, _ in keep]), int_lists([e.labels for e, _ in keep])
    ch.messages = [json.dumps(item) for _, item in keep]
    return ch


def _empty_reply(item) -> bool:
    msgs = item["messages"] if isinstance(item, dict) and "messages" in item else item
    return isinstance(msgs, list) and any(m.get("role") == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_calls") for m in msgs)


def _chunks_of(items: list, tokenizer, data_cfg: DataConfig):
    """(offset, _Chunk) per chunk, pipelined in this process."""
    offset = 0
    for encoded in encode_chunks(tokenizer, items, data_cfg.train_on, data_cfg.max_length):
        yield offset, _check_chunk(items[offset : offset + len(encoded)], encoded, data_cfg)
        offset += len(encoded)


def _worker_part(items: list, tokenizer, data_cfg: DataConfig) -> list:
    return list(_chunks_of(items, tokenizer, data_cfg))


def _encoded_chunks(items: list, tokenizer, data_cfg: DataConfig):
    """(offset, _Chunk) in item order: in this process, or from num_proc worker processes."""
    if data_cfg.num_proc <= 1 or len(items) < 2000:
        yield from _chunks_of(items, tokenizer, data_cfg)
        return
    from concurrent.futures import ProcessPoolExecutor

    size = -(-len(items) // (data_cfg.num_proc * 2))
    starts = list(range(0, len(items), size))
    with ProcessPoolExecutor(data_cfg.num_proc) as pool:
        parts = pool.map(_worker_part, [items[i : i + size] for i in starts], [tokenizer] * len(starts), [data_cfg] * len(starts))
        for start, part in zip(starts, parts):
            for offset, ch in part:
                yield start + offset, ch


def int_lists(lists: list[list[int]]):
    """Python int lists -> Arrow list<int32>, ~3x faster than pa.array(lists) (one flat buffer + offsets)."""
    import itertools

    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _length_problem(enc: Encoded, n_targets: int, data_cfg: DataConfig) -> str | None:
    c = data_cfg.clean
    if c.max_tokens and enc.full_length > c.max_tokens:
        return f"longer than clean.max_tokens ({c.max_tokens})"
    if c.min_tokens and enc.full_length < c.min_tokens:
        return f"shorter than clean.min_tokens ({c.min_tokens})"
    if n_targets == 0:
        return "no trained tokens within max_length"
    return None


def _encode_preference(items: list, eval_items: list, tokenizer, data_cfg: DataConfig, report: dict, bar):
    """Pairs / KTO rows of both splits -> (train, eval, truncation counts, (kept train items, kept eval items));
    bad ones follow on_bad_row."""
    from tuneforge.data.preference import encode_items

    counts: Counter = Counter()
    out, kept_items = [], []
    for part in (items, eval_items):
        kept, kept_part = [], []
        for it, enc in zip(part, encode_items(part, tokenizer, data_cfg.max_length, data_cfg.pair_truncation, counts)):
            bar.advance()
            if isinstance(enc, BadRow):
                _bad_row(f"{report.get('_where', {}).get(id(it), 'preference pair')}: {enc}", str(enc), data_cfg, report)
            else:
                kept.append(enc)
                kept_part.append(it)
        out.append(kept)
        kept_items.append(kept_part)
    return out[0], out[1], counts, kept_items


def _blocks(samples: list[Sample], block: int, report: dict) -> list[Sample]:
    """Corpus mode: concatenate every sample and cut into `block`-token blocks (the tail is dropped)."""
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    n = len(ids) // block
    report["group_texts_tokens_dropped"] = report.get("group_texts_tokens_dropped", 0) + len(ids) - n * block
    # A block cuts across documents: it has no source item (messages None; inspect shows its decoded text).
    return [Sample(ids[i * block : (i + 1) * block], labels[i * block : (i + 1) * block], None) for i in range(n)]


def _finish_report(report: dict, train: list[Sample], evals: list[Sample], pairs: list, fingerprint: str) -> dict:
    lengths = [len(s) for s in train] or [0]
    return {
        "fingerprint": fingerprint,
        "rows_read": report["rows_read"],
        "datasets": report["datasets"],
        "rows_after_clean": report["rows_after_clean"],
        "dropped": dict(report["dropped"]),
        "skipped": dict(report["skipped"]),  # rows skipped under on_bad_row: skip, by reason (also in dropped)
        "bad_row_examples": report["bad_row_examples"],
        "truncated": report["truncated"],  # samples and preference pairs cut to fit max_length
        **({"changed_by_template": dict(report["changed_by_template"])} if report.get("changed_by_template") else {}),
        "train_samples": len(train),
        "eval_samples": len(evals),
        "preference_pairs": len(pairs),
        "train_tokens": sum(lengths),
        "train_target_tokens": sum(s.n_targets for s in train),
        "max_sample_tokens": max(lengths),
        "mean_sample_tokens": round(sum(lengths) / max(1, len(train)), 1),
        "padding_efficiency_batch8": padding_efficiency(lengths, 8),
        **({"group_texts_tokens_dropped": report["group_texts_tokens_dropped"]} if "group_texts_tokens_dropped" in report else {}),
    }


def padding_efficiency(lengths: list[int], batch: int, seed: int = 0) -> float:
    """Real tokens / (batch x longest) over random batches: the compute padded batches waste.
    Padding-free packing (data.packing) computes on real tokens only (efficiency 1.0)."""
    order = lengths[:]
    random.Random(seed).shuffle(order)
    real = padded = 0
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        real += sum(chunk)
        padded += len(chunk) * max(chunk)
    return round(real / padded, 4) if padded else 1.0


def _save_cache(cache_dir: Path, train: list[Sample], evals: list[Sample], pairs: tuple[list, list], report: dict) -> None:
    from tuneforge.data import preference

    import pyarrow as pa
    import pyarrow.feather as feather

    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, samples in (("train", train), ("eval", evals)):
        feather.write_feather(pa.table({
            "input_ids": _column(samples, "_ids", "input_ids"),
            "labels": _column(samples, "_labels", "labels"),
            "messages": pa.array([s.messages_json() for s in samples], pa.string()),
        }), tmp / f"{name}.arrow")
    preference.save(tmp, *pairs)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    # Rename last: a crash mid-write never leaves a half cache that a later run would trust.
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)


def _column(samples: list[Sample], slot: str, name: str):
    """A list<int32> column. Samples that are consecutive slices of one Arrow buffer (a freshly encoded
    split) are written from that buffer without a round trip through Python ints."""
    import numpy as np
    import pyarrow as pa

    refs = [getattr(s, slot) for s in samples]
    if refs and all(isinstance(r, tuple) and r[0] is refs[0][0] for r in refs):
        starts = np.array([r[1] for r in refs] + [refs[-1][2]], dtype=np.int64)
        if all(r[2] == nxt for r, nxt in zip(refs, starts[1:].tolist())):
            return pa.ListArray.from_arrays(pa.array((starts - starts[0]).astype(np.int32)), pa.array(refs[0][0][starts[0] : starts[-1]]))
    return int_lists([getattr(s, name) for s in samples])


def _lists(column) -> list:
    """Arrow list<int32> column -> (shared numpy buffer, start, end) per row; Sample slices on use."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    values, offsets = arr.values.to_numpy(), arr.offsets.to_numpy().tolist()
    return [(values, a, b) for a, b in zip(offsets[:-1], offsets[1:])]


def _slice(ref: tuple) -> list[int]:
    values, a, b = ref
    return values[a:b].tolist()


def _load_cache(cache_dir: Path, fingerprint: str) -> Prepared:
    import pyarrow.feather as feather

    splits = {}
    for name in ("train", "eval"):
        t = feather.read_table(cache_dir / f"{name}.arrow")
        ids, labels = _lists(t.column("input_ids")), _lists(t.column("labels"))
        # Messages stay JSON until asked for: a cache hit must not pay for decoding 100k conversations.
        splits[name] = [Sample(i, lab, messages_json=m) for i, lab, m in zip(ids, labels, t.column("messages").to_pylist())]
    from tuneforge.data import preference

    pairs, eval_pairs = preference.load(cache_dir)
    report = json.loads((cache_dir / "report.json").read_text())
    return Prepared(splits["train"], splits["eval"], fingerprint, report, cache_hit=True, pairs=pairs, eval_pairs=eval_pairs)
