"""prepare(config) -> tokenized train/eval splits, cached in Arrow by a hash of everything that affects them."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data.formats import BadRow, Messages, to_conversation
from tuneforge.data.render import IGNORE, encode, encode_text
from tuneforge.data.sources import read_rows
from tuneforge.errors import UserError

CACHE_VERSION = "1"  # bump when the encoding logic changes, so old caches are never served


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    messages: Messages | str  # a conversation, or plain corpus text

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Prepared:
    train: list[Sample]
    eval: list[Sample]
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = False


def prepare(data_cfg: DataConfig, tokenizer, log=print) -> Prepared:
    fingerprint = data_fingerprint(data_cfg, tokenizer)
    cache_dir = cache_path(data_cfg, fingerprint)
    if (cache_dir / "report.json").is_file():
        return _load_cache(cache_dir, fingerprint)
    report: dict[str, Any] = {"rows_read": 0, "dropped": Counter(), "bad_row_examples": [], "truncated": 0}
    train_convs = _read_specs(data_cfg.train, data_cfg, report)
    eval_convs = _read_specs(data_cfg.eval, data_cfg, report) if data_cfg.eval else []
    if not data_cfg.eval and data_cfg.eval_split > 0:
        train_convs, eval_convs = _split(train_convs, data_cfg.eval_split, data_cfg.seed)
    if data_cfg.max_eval_samples:
        eval_convs = eval_convs[: data_cfg.max_eval_samples]
    train = _encode_all(train_convs, tokenizer, data_cfg, report)
    evals = _encode_all(eval_convs, tokenizer, data_cfg, report)
    if not train:
        raise UserError(f"no training samples left in {', '.join(s.path for s in data_cfg.train)} (dropped: {dict(report['dropped']) or 'file is empty'})")
    report = _finish_report(report, train, evals, fingerprint)
    _save_cache(cache_dir, train, evals, report)
    return Prepared(train, evals, fingerprint, report)


def cache_path(data_cfg: DataConfig, fingerprint: str) -> Path:
    return Path(data_cfg.cache_dir) / fingerprint


def data_fingerprint(data_cfg: DataConfig, tokenizer) -> str:
    """Hash of input file contents, tokenizer (vocab, merges, specials), template text, every data option."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for spec in data_cfg.train + data_cfg.eval:
        p = Path(spec.path)
        if not p.exists():
            raise UserError(f"data file not found: {spec.path} (check data.train / data.eval paths)")
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    options = data_cfg.model_dump(exclude={"cache_dir", "packing"})
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _read_specs(specs: list[DatasetSpec], data_cfg: DataConfig, report: dict) -> list[Messages]:
    convs = []
    for spec in specs:
        for row in read_rows(spec.path, spec.text_unit):
            report["rows_read"] += 1
            try:
                convs.append(to_conversation(row, spec.format, data_cfg.system_prompt, spec.columns))
            except BadRow as exc:
                _bad_row(f"{row.where}: {exc}", str(exc), data_cfg, report)
    return convs


def _bad_row(where: str, reason: str, data_cfg: DataConfig, report: dict) -> None:
    if data_cfg.on_bad_row == "error":
        raise UserError(f"{where} (fix the row, or set data.on_bad_row: skip)")
    report["dropped"][reason.split(" (")[0].split(":")[0][:48]] += 1
    if len(report["bad_row_examples"]) < 5:
        report["bad_row_examples"].append(where)


def _split(convs: list[Messages], ratio: float, seed: int) -> tuple[list[Messages], list[Messages]]:
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(convs) * ratio)) if len(convs) > 1 else 0
    held = set(order[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [convs[i] for i in order[:n_eval]]


def _encode_all(convs: list[Messages], tokenizer, data_cfg: DataConfig, report: dict) -> list[Sample]:
    out = []
    for i, msgs in enumerate(convs):
        try:
            if isinstance(msgs, str):
                enc = encode_text(tokenizer, msgs, data_cfg.max_length)
            else:
                _, enc = encode(tokenizer, msgs, data_cfg.train_on, data_cfg.max_length)
        except BadRow as exc:
            _bad_row(f"conversation {i}: {exc}", str(exc), data_cfg, report)
            continue
        report["truncated"] += enc.truncated
        sample = Sample(enc.input_ids, enc.labels, msgs)
        if sample.n_targets == 0:
            report["dropped"]["no trained tokens within max_length"] += 1
            continue
        out.append(sample)
    return out


def _finish_report(report: dict, train: list[Sample], evals: list[Sample], fingerprint: str) -> dict:
    lengths = [len(s.input_ids) for s in train]
    return {
        "fingerprint": fingerprint,
        "rows_read": report["rows_read"],
        "dropped": dict(report["dropped"]),
        "bad_row_examples": report["bad_row_examples"],
        "truncated": report["truncated"],
        "train_samples": len(train),
        "eval_samples": len(evals),
        "train_tokens": sum(lengths),
        "train_target_tokens": sum(s.n_targets for s in train),
        "max_sample_tokens": max(lengths),
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
    }


def _save_cache(cache_dir: Path, train: list[Sample], evals: list[Sample], report: dict) -> None:
    import pyarrow as pa
    import pyarrow.feather as feather

    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, samples in (("train", train), ("eval", evals)):
        table = pa.table({
            "input_ids": pa.array([s.input_ids for s in samples], pa.list_(pa.int32())),
            "labels": pa.array([s.labels for s in samples], pa.list_(pa.int32())),
            "messages": pa.array([json.dumps(s.messages) for s in samples], pa.string()),
        })
        feather.write_feather(table, tmp / f"{name}.arrow")
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    # Rename last: a crash mid-write never leaves a half cache that a later run would trust.
    if cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    tmp.rename(cache_dir)


def _load_cache(cache_dir: Path, fingerprint: str) -> Prepared:
    import pyarrow.feather as feather

    splits = {}
    for name in ("train", "eval"):
        t = feather.read_table(cache_dir / f"{name}.arrow").to_pydict()
        splits[name] = [Sample(i, lab, json.loads(m)) for i, lab, m in zip(t["input_ids"], t["labels"], t["messages"])]
    report = json.loads((cache_dir / "report.json").read_text())
    return Prepared(splits["train"], splits["eval"], fingerprint, report, cache_hit=True)
