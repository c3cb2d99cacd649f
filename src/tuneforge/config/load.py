"""Load a config file, apply `--set key=value` overrides, validate, and explain errors in one line."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.schema import Config
from tuneforge.errors import UserError


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML/JSON, apply overrides, validate. Relative paths in the config are relative to the working directory."""
    raw = read_config_file(path)
    for item in overrides or []:
        key, value = parse_overrides([item])[0]
        set_dotted(raw, key, value)
    load_dotenv_secrets(Path(path).parent)
    cfg = validate(raw, source=str(path))
    cfg._config_path = Path(path)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p} (pass the path to a .yaml or .json config)")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        where = getattr(exc, "problem_mark", None) or getattr(exc, "lineno", None)
        raise UserError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({where}): fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: the config must be a mapping of sections (model:, data:, train:, ...)")
    return data


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001); values are parsed as YAML scalars/lists."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, _, value = item.partition("=")
        out.append((key.strip(), yaml.safe_load(value) if value != "" else None))
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def load_dotenv_secrets(folder: Path) -> None:
    """Secrets (HF_TOKEN, WANDB_API_KEY) come from the environment or a .env file; never from the config."""
    from dotenv import load_dotenv

    for candidate in (folder / ".env", Path.cwd() / ".env"):
        if candidate.is_file():
            load_dotenv(candidate, override=False)


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelled key also makes the real key "missing": report the typo, it is the cause.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise UserError(f"{source}: {explain(first, Config)}") from None


def explain(err: dict[str, Any], root: type[BaseModel]) -> str:
    """One pydantic error -> 'section.key: what is wrong (fix)'."""
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<top level>"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = section_at(root, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(loc[:-1] + [guess[0]])}'?" if guess else f"valid keys: {', '.join(valid)}"
        return f"unknown key '{dotted}' ({hint})"
    if kind == "missing":
        return f"missing required key '{dotted}'"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def section_at(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """Walk the schema along `loc` (skipping list indices) to the section class there."""
    node: Any = root
    for part in loc:
        if part.isdigit():
            continue
        field = node.model_fields.get(part)
        if field is None:
            return None
        node = _section_type(field.annotation)
        if node is None:
            return None
    return node


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found:
            return found
    return None

