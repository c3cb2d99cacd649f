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


def read_rows(path: str) -> Iterator[Row]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {path} (check data.train / data.eval paths)")
    if p.suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif p.suffix == ".json":
        yield from _read_json(p)
    else:
        raise UserError(f"{path}: unsupported file type '{p.suffix}' (use .jsonl or .json)")


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
