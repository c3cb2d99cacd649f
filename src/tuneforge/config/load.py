"""Load a config file, apply `--set key=value` overrides, validate, and explain errors in one line."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.schema import Config
from tuneforge.errors import UserError, decode_utf8


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML/JSON, apply overrides, validate. Relative paths in the config are relative to the working directory.

    A job of the server (TUNEFORGE_JOB=1, set by its worker) is a guest: no `.env` is read, nothing is expanded,
    and every path is checked again against the job's workspace (TUNEFORGE_JOB_ROOMS), so a link planted after
    the job was accepted is refused here."""
    import os

    raw = read_config_file(path)
    for key, value in parse_overrides(overrides or []):
        set_dotted(raw, key, value)
    job = os.environ.get("TUNEFORGE_JOB") == "1"
    if job:
        refuse_job_variables(raw, str(path))
    else:
        load_dotenv_secrets(Path(path).parent)
        expand_env_paths(raw, str(path))
    cfg = validate(raw, source=str(path))
    if job:
        confine_job(cfg, str(path))
    refuse_special_files(cfg)
    cfg._config_path = Path(path)
    return cfg


def refuse_job_variables(raw: dict[str, Any], source: str) -> None:
    from tuneforge.config.confine import find_variable

    where = find_variable(raw)
    if where:
        raise UserError(f"{source}: {where}: '${{' in a job config: a job's values are never expanded (write the value out)")


def confine_job(cfg: Config, source: str) -> None:
    """The server's path rule, applied again by the job itself just before it reads anything."""
    import os

    from tuneforge.config.confine import GuestError, Rooms, confine_config

    rooms = os.environ.get("TUNEFORGE_JOB_ROOMS")
    if not rooms:
        raise UserError(f"{source}: TUNEFORGE_JOB=1 without TUNEFORGE_JOB_ROOMS: a job is started by `tuneforge serve`")
    try:
        confine_config(cfg, Rooms.from_json(rooms))
    except GuestError as exc:
        raise UserError(f"{source}: {exc.loc}: {exc.msg}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file not found: {p} (pass the path to a .yaml or .json config)")
    if not p.is_file():
        raise UserError(f"{p}: not a regular file (a config is a .yaml or .json file, not a folder, pipe or device)")
    text = decode_utf8(p.read_bytes(), p)
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        data = json.loads(text, object_pairs_hook=_json_no_duplicates(p)) if kind == "JSON" else yaml.load(text, Loader=StrictLoader)
    except RecursionError:
        raise UserError(f"{p}: nested too deeply to be a config (check the brackets)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} (fix the syntax)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: the config must be a mapping of sections (model:, data:, train:, ...)")
    if expanded_size(data) > MAX_CONFIG_VALUES:
        raise UserError(f"{p}: YAML anchors/aliases expand to more than {MAX_CONFIG_VALUES:,} values (a config never needs "
                        "that many: remove the nested aliases)")
    return data


MAX_CONFIG_VALUES = 1_000_000


def expanded_size(obj: Any) -> int:
    """Values in `obj` with every alias expanded, counted without expanding (shared nodes are memoised):
    a few nested YAML aliases ("billion laughs") would otherwise hang validation or hashing."""
    memo: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in memo:
            children = node.values() if isinstance(node, dict) else node
            memo[id(node)] = min(1 + sum(size(c) for c in children), MAX_CONFIG_VALUES + 1)
        return memo[id(node)]

    return size(obj)


def yaml_problem(exc: Exception) -> str:
    """One line: where and what, from a PyYAML error (its str() spans several lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if "constructor for the tag" in what:
        what += "; configs use plain YAML, no !tags"
    return f"not valid YAML{where}: {what} (fix the syntax)"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML lets the last one silently win)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolves `<<: *anchor` merges first: a merge may be overridden on purpose
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {seen[key]}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _json_no_duplicates(p: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise UserError(f"{p}: duplicate key '{key}' in one JSON object (keep one)")
            out[key] = value
        return out

    return hook


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001); values are parsed as YAML scalars/lists."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=1e-4")
        try:
            parsed = yaml.load(value, Loader=StrictLoader) if value != "" else None
        except (yaml.YAMLError, RecursionError) as exc:
            raise UserError(f"--set {key}: value {value!r} is {yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else 'nested too deeply'}") from None
        out.append((key, parsed))
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists (a number indexes a list, e.g. data.train.0.path)."""
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: {'.'.join(parts[:depth])} is a list of {len(node)}; use an index 0..{len(node) - 1}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UserError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section (cannot set {where})")


def _path_slots(raw: Any, section: type[BaseModel] = Config, loc: str = ""):
    """(place, mapping, key) of every file or folder path in a raw config: where `${VAR}` and `~` are expanded.
    Found from the schema's PathField markers (URIs aside), as the job server finds them (config/confine.py)."""
    from tuneforge.config.schema import PathField

    if not isinstance(raw, dict):
        return
    for name, info in section.model_fields.items():
        value, place = raw.get(name), f"{loc}{name}"
        marker = next((m for m in info.metadata if isinstance(m, PathField)), None)
        if marker is not None:
            if marker.role != "uri" and isinstance(value, str) and (marker.when is None or value.lower().endswith(marker.when)):
                yield place, raw, name
            continue
        sub = _section_type(info.annotation)
        if sub is not None:
            for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
                yield from _path_slots(item, sub, f"{place}.{i}." if i is not None else f"{place}.")


def expand_env_paths(raw: dict[str, Any], source: str) -> None:
    """`${VAR}`, `$VAR` and a leading `~` in the config's paths, from this environment (and .env). An unset
    variable is an error: never a folder literally named '${OUTPUT_DIR}'. Only configs the CLI reads from a
    file get here; the schema refuses a variable left in a path (a job API request never expands one)."""
    import os

    from tuneforge.config.schema import ENV_REF

    for place, node, key in _path_slots(raw):
        value = node.get(key)
        if not isinstance(value, str):
            continue

        def sub(m: re.Match, value: str = value, place: str = place) -> str:
            name = m.group(1) if m.group(1) is not None else m.group(2)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise UserError(f"{source}: {place}: {m.group(0)!r} in {value!r} is not an environment variable reference (write ${{NAME}})")
            if name not in os.environ:
                raise UserError(f"{source}: {place}: environment variable {name} in {value!r} is not set (export it, or write the path out)")
            return os.environ[name]

        node[key] = os.path.expanduser(ENV_REF.sub(sub, value))


def load_dotenv_secrets(folder: Path) -> None:
    """Secrets (HF_TOKEN, WANDB_API_KEY) come from the environment or a .env file; never from the config."""
    import io

    from dotenv import load_dotenv

    for candidate in (folder / ".env", Path.cwd() / ".env"):
        if candidate.is_file():
            text = decode_utf8(candidate.read_bytes(), candidate)  # a non-UTF-8 .env is named, not a traceback
            load_dotenv(stream=io.StringIO(text), override=False)


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelled key also makes the real key "missing": report the typo, it is the cause. Likewise a
        # bad value the user wrote explains more than a key they have not written yet.
        first = min(errors, key=lambda e: {"extra_forbidden": 0, "missing": 2}.get(e["type"], 1))
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
    if kind in ("value_error", "assertion_error"):
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        # Section validators name fields relative to their section: put the section's path in front.
        if not loc or msg.startswith((dotted, loc[0] + ".", loc[0] + ":")):
            return msg
        return f"{dotted}.{msg}" if _names_field(msg) else f"{dotted}: {msg}"
    got = _short_repr(err.get("input"))
    return f"{dotted}: {err['msg']} (got {got})"


def _short_repr(value: Any) -> str:
    """repr() bounded in depth and length (the value may be huge or built from YAML aliases)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, 60, 60
    return r.repr(value)


def _names_field(msg: str) -> bool:
    """'query: ...' or 'lr ...' -> the message starts with a field name (a lowercase identifier)."""
    head = msg.split(":", 1)[0].split(" ", 1)[0]
    return head.isidentifier() and head.islower() and ":" in msg[: len(head) + 1]


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



HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".html", ".htm", ".db", ".sqlite", ".sqlite3", ".sql", ".gz", ".gguf")


def is_hub_id(path: str) -> bool:
    """'org/name' (one slash, no file suffix): a hub id rather than a missing local path."""
    return bool(HUB_ID.match(path)) and not path.lower().endswith(DATA_SUFFIXES)


def _input_paths(cfg: Config) -> list[tuple[str, str]]:
    """(config place, path) of every local file or folder the config reads: the fields the schema marks
    PathField("read"), so one added later (lora.init_from, train.deepspeed, ...) is checked and mounted too."""
    from tuneforge.config.confine import path_slots

    return [(slot.dotted, slot.value) for slot in path_slots(cfg) if slot.marker.role == "read"]


def _is_special(p: Path) -> bool:
    import stat

    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def refuse_special_files(cfg: Config) -> None:
    """A pipe or device as an input would block forever (or read without end): refuse it up front."""
    places = _input_paths(cfg) + [("data.cache_dir", cfg.data.cache_dir), ("output.dir", cfg.output.dir)]
    for place, path in places:
        if _is_special(Path(path).expanduser()):
            raise UserError(f"{place}: {path} is a pipe, socket or device, not a file or folder (give a regular file or folder)")


def check_paths(cfg: Config) -> list[str]:
    """What `config validate` can check without loading anything heavy: local inputs exist and are
    readable. Returns the checks it had to skip (hub ids, custom datasets, file contents)."""
    import os

    skipped = []
    for place, path in _input_paths(cfg):
        p = Path(path).expanduser()
        if not p.exists():
            if is_hub_id(path) and place != "model.chat_template":
                skipped.append(f"{place} {path}: a hub id (not downloaded by validate)")
                continue
            raise UserError(f"{place}: {path} does not exist (check the path; relative paths start at the working directory)")
        unreadable = not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK))
        if unreadable:
            raise UserError(f"{place}: {path} is not readable (check its permissions)")
        if place == "model.path" and p.is_dir() and not any((p / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            raise UserError(f"{place}: {path} is not a model directory (no config.json or tokenizer files)")
    for place, path in (("output.dir", cfg.output.dir), ("data.cache_dir", cfg.data.cache_dir)):
        _check_writable(place, Path(path).expanduser())
    for section in ("train", "eval"):
        for i, spec in enumerate(getattr(cfg.data, section)):
            if spec.custom:
                skipped.append(f"data.{section}.{i}.custom {spec.custom}: custom code is not run by validate")
    skipped.append("file contents (rows, tokenizer, weights): run `tuneforge prepare` or `tuneforge data inspect` to check them")
    return skipped


def _check_writable(place: str, p: Path) -> None:
    """A folder a command will create or write into: it must be a folder (or not exist yet) under a writable parent."""
    import os

    if p.exists() and not p.is_dir():
        raise UserError(f"{place}: {p} exists and is not a folder (pick another path)")
    existing = next((a for a in (p, *p.absolute().parents) if a.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{place}: {existing} is a file, so {p} cannot be created (pick another path)")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{place}: {existing} is not writable (check its permissions, or pick another path)")
