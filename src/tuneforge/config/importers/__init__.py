"""Translate configs written for axolotl, LLaMA-Factory and X—LLM into tuneforge configs, key by key.

`import_file(path, source)` returns an ImportResult: the tuneforge config (validated by the schema) and one
report row per source key (mapped / ignored / secret / not mapped, with the reason), plus one "source default"
row per setting the file left to the source tool's default where tuneforge's own default differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.config.importers.table import ImportResult, print_table
from tuneforge.errors import UserError

SOURCES = ("axolotl", "llamafactory", "xllm")


def translate(data: dict, source: str, label: str | None = None) -> ImportResult:
    from tuneforge.config.importers import axolotl, llamafactory, xllm

    module = {"axolotl": axolotl, "llamafactory": llamafactory, "xllm": xllm}.get(source)
    if module is None:
        raise UserError(f"--from {source!r}: choose one of {', '.join(SOURCES)}")
    return module.translate(data, label or f"{source} config")


def import_file(path: str | Path, source: str) -> ImportResult:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found (pass the {source} config to import)")
    if source == "llamafactory":
        from tuneforge.config.importers.llamafactory import read_args

        return translate(read_args(p), source, str(p))
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({exc.__class__.__name__}): fix the syntax") from None
    if isinstance(data, dict) and isinstance(data.get("input"), dict) and "args" in data["input"]:
        data = data["input"]["args"]  # a serverless-worker request: its args are the axolotl config
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of {source} keys")
    return translate(data, source, str(p))


__all__ = ["ImportResult", "SOURCES", "import_file", "print_table", "translate"]
