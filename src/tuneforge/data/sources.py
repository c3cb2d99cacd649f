"""Read rows from local files. Each row keeps its origin (file, 1-based row number) for error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tuneforge.errors import UserError


@dataclass
class Row:
    data: dict[str, Any]
    file: str
    number: int  # 1-based line (jsonl) or element index (json)

    @property
    def where(self) -> str:
        return f"{self.file} row {self.number}"


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


def read_rows(path: str, text_unit: str = "file") -> Iterator[Row]:
    """Rows of a file, or of every supported file in a directory (sorted, so the order is stable)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise UserError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
        for f in files:
            yield from read_rows(str(f), text_unit)
        return
    if not p.is_file():
        raise UserError(f"data file not found: {path} (check data.train / data.eval paths)")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet}
    if p.suffix == ".txt":
        yield from _read_txt(p, text_unit)
    elif p.suffix in readers:
        yield from readers[p.suffix](p)
    else:
        raise UserError(f"{path}: unsupported file type '{p.suffix}' (use {', '.join(SUFFIXES)} or a directory)")


def _read_csv(p: Path) -> Iterator[Row]:
    import csv

    with p.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if p.suffix == ".tsv" else ",")
        for n, rec in enumerate(reader, start=2):  # row 1 is the header
            yield Row(dict(rec), str(p), n)


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{p}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    for n, rec in enumerate(table.to_pylist(), start=1):
        yield Row(rec, str(p), n)


def _read_txt(p: Path, unit: str) -> Iterator[Row]:
    text = p.read_text(encoding="utf-8")
    if unit == "file":
        yield Row({"text": text}, str(p), 1)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield Row({"text": line}, str(p), n)


def _read_jsonl(p: Path) -> Iterator[Row]:
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p} row {n}: invalid JSON ({exc.msg}): fix or remove the line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p} row {n}: expected a JSON object per line, got {type(obj).__name__}")
            yield Row(obj, str(p), n)


def _read_json(p: Path) -> Iterator[Row]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(obj, dict):  # dict of columns -> rows
        keys = list(obj)
        lengths = {len(v) for v in obj.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in obj.values()):
            raise UserError(f"{p}: a JSON object must map column names to equal-length lists")
        obj = [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if not isinstance(obj, list):
        raise UserError(f"{p}: expected a JSON array of rows")
    for n, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{p} row {n}: expected a JSON object, got {type(item).__name__}")
        yield Row(item, str(p), n)
