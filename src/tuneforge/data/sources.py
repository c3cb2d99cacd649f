"""Read rows from local files. Each row keeps its origin (file, 1-based row number) for error messages."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tuneforge.errors import UserError, decode_utf8


@dataclass
class Row:
    data: dict[str, Any]
    file: str
    number: int  # 1-based line (jsonl) or element index (json)
    problem: str | None = None  # a shape problem found while reading (e.g. a CSV row with extra fields): a bad row

    @property
    def where(self) -> str:
        return f"{self.file} row {self.number}"


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".html", ".htm", ".db", ".sqlite", ".sqlite3", ".sql")


def read_spec(spec) -> Iterator[Row]:
    """All rows of one `data.train`/`data.eval` entry: a custom dataset, a file/dir, or an HF dataset."""
    if spec.custom:
        from tuneforge.data.registry import custom_rows

        yield from custom_rows(spec.custom, spec.options)
    elif Path(spec.path).exists() and not _is_hf_disk_dataset(Path(spec.path)):
        yield from read_rows(spec.path, spec.text_unit, spec.query)
    else:
        yield from read_hf(spec.path, spec.subset, spec.split)


def read_rows(path: str, text_unit: str = "file", query: str | None = None) -> Iterator[Row]:
    """Rows of a file, or of every supported file in a directory (sorted, so the order is stable)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in SUFFIXES)
        if not files:
            raise UserError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
        for f in files:
            yield from read_rows(str(f), text_unit, query)
        return
    if not p.is_file():
        if p.exists():  # a pipe would block forever, a device never ends
            raise UserError(f"{path}: a pipe, socket or device, not a data file (give a regular file or folder)")
        raise UserError(f"data file not found: {path} (check data.train / data.eval paths)")
    suffix = _suffix(p)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet}
    if suffix == ".txt":
        yield from _read_txt(p, text_unit)
    elif suffix in (".html", ".htm"):
        yield from _read_html(p)
    elif suffix in (".db", ".sqlite", ".sqlite3", ".sql"):
        yield from _read_sql(p, query)
    elif suffix in readers:
        yield from readers[suffix](p)
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}' (use {', '.join(SUFFIXES)}, optionally .gz, or a directory)")


def _suffix(p: Path) -> str:
    """The format suffix, looking through a trailing .gz (data.jsonl.gz -> .jsonl)."""
    return Path(p.stem).suffix if p.suffix == ".gz" else p.suffix


def _read_text(p: Path) -> str:
    """The file's text: gunzipped when it ends in .gz; a one-line error when it is not gzip or not UTF-8."""
    raw = p.read_bytes()
    if p.suffix == ".gz":
        import gzip
        import zlib

        try:
            if not raw:
                raise EOFError("the file is empty")
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{p}: not a valid gzip file ({exc}) (re-compress it, or drop the .gz suffix)") from None
    return decode_utf8(raw, p)


def _read_csv(p: Path) -> Iterator[Row]:
    import csv
    import io

    # strict: an unclosed quote is an error, not the rest of the file swallowed into one field.
    reader = csv.reader(io.StringIO(_read_text(p), newline=""), delimiter="\t" if _suffix(p) == ".tsv" else ",", strict=True)
    try:
        header = next(reader, None)
        if not header:
            return
        if len(set(header)) != len(header) or not all(h.strip() for h in header):
            raise UserError(f"{p} line 1: the header needs unique, non-empty column names (got {header})")
        for fields in reader:
            n = reader.line_num
            if not fields:
                continue
            problem = None if len(fields) == len(header) else (
                f"has {len(fields)} fields but the header has {len(header)} (quote fields that contain the delimiter)")
            yield Row(dict(zip(header, fields)), str(p), n, problem)
    except csv.Error as exc:
        raise UserError(f"{p} line {reader.line_num}: malformed CSV ({exc}) (check for an unclosed quote)") from None


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{p}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    for n, rec in enumerate(table.to_pylist(), start=1):
        yield Row(rec, str(p), n)


def _read_txt(p: Path, unit: str) -> Iterator[Row]:
    text = _read_text(p)
    if unit == "file":
        yield Row({"text": text}, str(p), 1)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield Row({"text": line}, str(p), n)


def _read_jsonl(p: Path) -> Iterator[Row]:
    # Lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085 and other characters that
    # json.dumps(ensure_ascii=False) writes raw inside strings, which would cut valid rows in two.
    for n, line in enumerate(_read_text(p).split("\n"), start=1):
        if not line.strip():
            continue
        obj = _json_value(line, f"{p} row {n}")
        if not isinstance(obj, dict):
            raise UserError(f"{p} row {n}: expected a JSON object per line, got {type(obj).__name__}")
        yield Row(obj, str(p), n, _surrogate_problem(obj) if SURROGATE_ESCAPE.search(line) else None)


def _json_value(text: str, where: str, whole_file: bool = False) -> Any:
    """json.loads, with every way it fails on a user's file turned into one line naming the place."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if whole_file:
            raise UserError(f"{where}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        raise UserError(f"{where}: invalid JSON ({exc.msg}): fix or remove the line") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to be training data (flatten it)") from None
    except ValueError as exc:  # an integer longer than sys.get_int_max_str_digits() (4300 digits)
        raise UserError(f"{where}: a JSON number too long to read ({str(exc).split(';')[0]}) (quote it as a string, or remove it)") from None


# A \uD800-\uDFFF escape: json.loads turns an unpaired one into a lone surrogate, a str that no encoder
# (the tokenizer, hashing, the cache) can write. Only escapes can produce one: the file itself is valid UTF-8.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _surrogate_problem(obj: Any) -> str | None:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"a lone UTF-16 surrogate ({exc.object[exc.start:exc.end].encode('utf-8', 'backslashreplace').decode()}) "
                "in a string: not text (fix the escape)")
    return None


def _read_json(p: Path) -> Iterator[Row]:
    text = _read_text(p)
    obj = _json_value(text, str(p), whole_file=True)
    if isinstance(obj, dict):  # dict of columns -> rows
        keys = list(obj)
        lengths = {len(v) for v in obj.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in obj.values()):
            raise UserError(f"{p}: a JSON object must map column names to equal-length lists")
        obj = [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if not isinstance(obj, list):
        raise UserError(f"{p}: expected a JSON array of rows")
    escapes = bool(SURROGATE_ESCAPE.search(text))
    for n, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{p} row {n}: expected a JSON object, got {type(item).__name__}")
        yield Row(item, str(p), n, _surrogate_problem(item) if escapes else None)


def _read_html(p: Path) -> Iterator[Row]:
    """Main text of a page, boilerplate (menus, footers, cookie banners) removed by trafilatura."""
    trafilatura = _optional("trafilatura")
    html = p.read_text(encoding="utf-8", errors="replace")
    text = trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=True)
    meta = trafilatura.extract_metadata(html)
    yield Row({"text": text or "", "title": (meta.title if meta else None) or ""}, str(p), 1)


def _read_sql(p: Path, query: str | None) -> Iterator[Row]:
    """SQLite database file (opened read-only), or a .sql dump loaded into an in-memory SQLite; rows of `query`.
    Neither the dump nor the query may reach another file: ATTACH (and VACUUM INTO, which attaches), DETACH
    and extension loading are refused by an authorizer."""
    import sqlite3

    if not query:
        raise UserError(f"{p}: SQL sources need a query, e.g. query: \"SELECT question AS prompt, answer AS completion FROM faq\"")
    if p.suffix == ".sql":
        con = _sqlite(":memory:", p)
        try:
            con.executescript(_read_text(p))
        except (sqlite3.Error, ValueError) as exc:  # ValueError: a NUL byte in the script
            raise UserError(f"{p}: the SQL dump does not load into SQLite ({_sql_reason(exc)})") from None
    else:
        con = _sqlite(p.resolve().as_uri() + "?mode=ro", p)  # read-only: never touch the user's database
    con.row_factory = sqlite3.Row
    try:
        cursor = con.execute(query)
        for n, rec in enumerate(cursor, start=1):
            yield Row(dict(rec), str(p), n)
    except (sqlite3.Error, ValueError) as exc:
        raise UserError(f"{p}: query failed ({_sql_reason(exc)}): check the query {_short(query)}") from None
    finally:
        con.close()


_SQL_REFUSED = "ATTACH, DETACH and load_extension are refused: a data source reads its own file only"


def _sqlite(target: str, p: Path):
    import sqlite3

    def authorize(action: int, arg1, arg2, _db, _trigger) -> int:
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() == "load_extension":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    try:
        con = sqlite3.connect(target, uri=target.startswith("file:"))
    except sqlite3.Error as exc:
        raise UserError(f"{p}: cannot open the SQLite database ({exc})") from None
    con.set_authorizer(authorize)
    return con


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _sql_reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{text}: {_SQL_REFUSED}" if ("not authorized" in text or "authorization denied" in text) else text


def _is_hf_disk_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def read_hf(path: str, subset: str | None, split: str) -> Iterator[Row]:
    """A `save_to_disk` directory, or a hub dataset id (downloaded by `datasets`; needs network)."""
    import datasets

    p = Path(path)
    try:
        if _is_hf_disk_dataset(p):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{path}: no split '{split}' (has {', '.join(ds)}); set split:")
                ds = ds[split]
        elif "/" in path and not path.startswith((".", "/", "~")):
            ds = datasets.load_dataset(path, subset, split=split)
        else:
            raise UserError(f"data file not found: {path} (check data.train / data.eval paths)")
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the dataset ({str(exc).splitlines()[0]})") from None
    for n, rec in enumerate(ds, start=1):
        yield Row(dict(rec), path, n)


def _optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"this source needs the '{name}' package: pip install 'tuneforge[data]'") from None
