"""The prepared data as JSONL files a user keeps, reads and shares (the Novice guide's cleaned dataset and its
`train.jsonl` / `val.jsonl` split), and a push of those files to the Hub as a dataset repo.

`data.export_dir: PATH` writes
    cleaned.jsonl  every row after reading, conversion, mixing and cleaning, before the split
    train.jsonl    the rows that train (after the token-length filters)
    val.jsonl      the rows held out for evaluation
    export.json    what was written: row counts, the data fingerprint and the data report
One row per line, in a format tuneforge (and `datasets`) reads back: {"messages": [...]}, {"text": ...},
{"prompt", "chosen", "rejected"} pairs, KTO {"messages", "label"}, tool conversations {"messages", "tools"}.
The rows are conversations as trained: a `data.system_prompt` is already in them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from tuneforge.errors import UserError

FILES = ("cleaned.jsonl", "train.jsonl", "val.jsonl")
MANIFEST = "export.json"


def as_row(item: Any) -> dict:
    """A prepared item (conversation list, corpus text, or a dict form) -> the JSON row that reads back as it."""
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, list):
        return {"messages": item}
    return item


def check_target(folder: Path, sources: list[str]) -> None:
    """Before any work: the folder can hold the export without replacing a file tuneforge did not write,
    and it lies outside every source folder (else the next preparation would read the export as data)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"data.export_dir: {folder} exists and is not a folder (pick another path)")
    ours = (folder / MANIFEST).is_file()
    foreign = [name for name in FILES if (folder / name).exists() and not ours]
    if foreign:
        raise UserError(f"data.export_dir: {folder} already holds {foreign[0]}, not written by tuneforge "
                        "(pick an empty folder: nothing was overwritten)")
    target = folder.resolve()
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir() and target.is_relative_to(p.resolve()):
            raise UserError(f"data.export_dir: {folder} is inside the data folder {src}, which would read the exported "
                            "files back as training data (pick a folder outside it)")


def is_current(folder: Path, fingerprint: str) -> bool:
    """The folder already holds the export of exactly this prepared data."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("fingerprint") == fingerprint and all((folder / name).is_file() for name in FILES)


def write(folder: Path, fingerprint: str, parts: dict[str, list], report: dict, log: Callable[[str], None]) -> dict:
    """parts: {"cleaned": items, "train": items, "val": items} -> the files; returns the manifest."""
    from tuneforge.data.prepare import progress

    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    total = sum(len(items) for items in parts.values())
    with progress("write jsonl", total, log) as p:
        for name, items in parts.items():
            tmp = folder / f"{name}.jsonl.tmp"
            with tmp.open("w", encoding="utf-8") as f:
                for item in items:
                    # ensure_ascii=False keeps the text readable; its raw U+2028 / U+0085 are fine, rows split at "\n" only.
                    f.write(json.dumps(as_row(item), ensure_ascii=False) + "\n")
                    p.advance()
            os.replace(tmp, folder / f"{name}.jsonl")  # a crash mid-write never leaves a half file under the real name
            counts[name] = len(items)
    manifest = {"fingerprint": fingerprint, "rows": counts, "report": report}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"data written: {folder}/cleaned.jsonl ({counts['cleaned']} rows), train.jsonl ({counts['train']}), "
        f"val.jsonl ({counts['val']})")
    return manifest


def card(manifest: dict) -> str:
    """The dataset card: splits for `datasets.load_dataset(repo)` and where the rows came from."""
    rows = manifest["rows"]
    splits = [("train", "train.jsonl")] + ([("validation", "val.jsonl")] if rows["val"] else [])
    data_files = "".join(f"  - split: {split}\n    path: {path}\n" for split, path in splits)
    report = manifest.get("report", {})
    lines = [
        "---", "configs:", "- config_name: default", "  data_files:", data_files.rstrip("\n"),
        "- config_name: cleaned", "  data_files:", "  - split: train", "    path: cleaned.jsonl", "---", "",
        "# Training data prepared by [tuneforge]", "",
        f"- train.jsonl: {rows['train']} rows; val.jsonl: {rows['val']} rows (held out)",
        f"- cleaned.jsonl: {rows['cleaned']} rows after cleaning, before the split",
        f"- rows read: {report.get('rows_read', '?')}; removed: {json.dumps(report.get('dropped') or {})}",
        f"- data fingerprint: {manifest['fingerprint']}", "",
    ]
    return "\n".join(lines)


def check_push(repo: str) -> None:
    """What can be known before preparing: a valid repo id, a token, not offline."""
    from tuneforge.hub import check_ready

    check_ready(f"--push-to {repo}", repo, ", or drop --push-to")


def push(folder: Path, repo: str, private: bool = False, log: Callable[[str], None] = print) -> dict:
    """One commit of the exported files + card to the dataset repo `repo`. Hub and network failures are one line."""
    from tuneforge.hub import upload

    check_push(repo)
    manifest = json.loads((folder / MANIFEST).read_text())
    files: dict = {name: folder / name for name in (*FILES, MANIFEST)}
    files["README.md"] = card(manifest).encode("utf-8")
    return upload(f"--push-to {repo}", repo, folder, files, "tuneforge prepare: cleaned and split data",
                  f"the files stay in {folder}; push again when it is fixed", repo_type="dataset", private=private, log=log)
