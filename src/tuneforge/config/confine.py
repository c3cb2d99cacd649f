"""One rule for every path of a job on a shared server, found from the schema's `PathField` markers.

Resolved (symlinks followed, `file:` URIs percent-decoded), each path must lie inside the submitting user's
workspace or a read-only root the server names (its model cache). The job server applies it when a job is
submitted (the user writes relative paths); the job's own child applies it again when it loads its config
(TUNEFORGE_JOB=1), so a link planted in the workspace after submission is caught too. Nothing here imports
the server: arrows point down the pipeline.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel

from tuneforge.config.schema import PathField

# Keys inside a referenced JSON file (DeepSpeed) whose string values are paths: monitor output_path, nvme_path,
# flops_profiler output_file, autotuning results_dir / exps_dir, ... ; any value with a '/' is checked as well.
JSON_PATH_KEY = re.compile(r"(^|_)(path|dir|directory|file|folder|filename)$", re.I)
MAX_JSON_BYTES = 1 << 20


class GuestError(ValueError):
    """A job value the server refuses: HTTP `status`, the dotted field `loc`, and one line saying why."""

    def __init__(self, status: int, loc: str, msg: str):
        super().__init__(f"{loc}: {msg}")
        self.status, self.loc, self.msg = status, loc, msg


@dataclass(frozen=True)
class Slot:
    loc: tuple  # ("data", "train", 0, "path")
    value: str
    marker: PathField

    @property
    def dotted(self) -> str:
        return ".".join(str(p) for p in self.loc)


@dataclass
class Rooms:
    """Where a job may read and write: its user's workspace, plus folders the server names (its model cache to
    read, the user's data cache to write), and the tracker URLs the operator allows. A relative path is read
    from the workspace (the job's working directory)."""

    workspace: Path
    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    trackers: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"workspace": str(self.workspace), "read_only": [str(p) for p in self.read_only],
                           "writable": [str(p) for p in self.writable], "trackers": list(self.trackers)})

    @classmethod
    def from_json(cls, text: str) -> "Rooms":
        d = json.loads(text)
        return cls(Path(d["workspace"]), tuple(map(Path, d["read_only"])), tuple(map(Path, d["writable"])), tuple(d["trackers"]))

    def roots(self, write: bool) -> list[Path]:
        return [_resolved(p) for p in (self.workspace, *self.writable, *(() if write else self.read_only))]


def path_slots(model: BaseModel, loc: tuple = ()) -> Iterator[Slot]:
    """Every marked value in a validated config (sections, lists and mappings walked to any depth)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        marker = next((m for m in info.metadata if isinstance(m, PathField)), None)
        if marker is None:
            yield from _nested(value, (*loc, name))
        elif isinstance(value, str) and (marker.when is None or value.lower().endswith(marker.when)):
            yield Slot((*loc, name), value, marker)


def _nested(value: Any, loc: tuple) -> Iterator[Slot]:
    if isinstance(value, BaseModel):
        yield from path_slots(value, loc)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _nested(item, (*loc, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nested(item, (*loc, key))


VARIABLE = re.compile(r"\$\{")


def find_variable(obj: Any, loc: str = "") -> str | None:
    """The dotted place of the first `${` in any key or string of `obj` (a job expands nothing)."""
    if isinstance(obj, str):
        return loc or "<value>" if VARIABLE.search(obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        here = f"{loc}.{key}" if loc else str(key)
        if isinstance(key, str) and VARIABLE.search(key):
            return here
        found = find_variable(value, here)
        if found:
            return found
    return None


def refuse_variables(obj: Any, loc: str = "") -> None:
    where = find_variable(obj, loc)
    if where:
        raise GuestError(422, where, "'${' found: a job's values are never expanded from the server's environment "
                                     "(write the value out)")


def confine_config(cfg: BaseModel, rooms: Rooms) -> list[tuple[Slot, str]]:
    """Apply the rule to every marked path of `cfg`; returns each slot with the resolved value to run with."""
    out = []
    for slot in path_slots(cfg):
        checker = {"read": _read, "write": _write, "uri": _uri}[slot.marker.role]
        value = checker(slot.value, slot.dotted, rooms)
        if slot.marker.contents == "json" and os.path.isfile(value):
            _json_paths(Path(value), slot.dotted, rooms)
        out.append((slot, value))
    return out


# ---- the rule ------------------------------------------------------------------------------------------
def _lexical(value: str, loc: str, rooms: Rooms) -> Path:
    """The value as a path (relative ones under the workspace), refused if it uses `..` or `~`."""
    if not value.strip() or "\0" in value:
        raise GuestError(400, loc, "expected a path relative to your workspace")
    text = value.replace("\\", "/")
    p = PurePosixPath(text)
    if re.match(r"^[A-Za-z]:", text):
        raise GuestError(400, loc, f"{_short(value)}: a drive letter is not a path on this server; give a path relative to your workspace")
    if text.startswith("~"):
        raise GuestError(400, loc, f"{_short(value)}: '~' is not expanded; give a path relative to your workspace")
    if ".." in p.parts:
        raise GuestError(400, loc, f"{_short(value)}: '..' is not allowed; paths stay inside your workspace")
    return rooms.workspace / p if not p.is_absolute() else Path(text)


def _inside(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: refused as leading nowhere allowed
        return Path("/nonexistent-link-loop")


def _read(value: str, loc: str, rooms: Rooms) -> str:
    if "://" in value:  # datasets and hub loaders fetch URLs: the job would contact an address it chose
        raise GuestError(400, loc, f"{_short(value)}: a URL is not read by a job; put the file in your workspace")
    candidate = _lexical(value, loc, rooms)
    real = _resolved(candidate)
    if not _inside(real, rooms.roots(write=False)):
        why = "is a link that leads" if os.path.lexists(candidate) and real != candidate else "is"
        raise GuestError(400, loc, f"{_short(value)} {why} outside your workspace (give a path relative to your workspace)")
    if not os.path.lexists(candidate) and not PurePosixPath(value).is_absolute():
        return value  # no such file: a hub id (or a file the run reports missing), read relative to the workspace
    return str(real)


def _write(value: str, loc: str, rooms: Rooms) -> str:
    real = _resolved(_lexical(value, loc, rooms))  # the deepest existing part decides where writes land
    if not _inside(real, rooms.roots(write=True)):
        raise GuestError(400, loc, f"{_short(value)} leads outside your workspace (give a path relative to your workspace)")
    return str(real)


def _uri(value: str, loc: str, rooms: Rooms) -> str:
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if ".." in unquote(unquote(parts.path)).split("/"):
            raise GuestError(422, loc, f"{_short(value)}: '..' in a tracker URL (give the tracker's URL as allowed)")
        if not any(_same_destination(value, allowed) for allowed in rooms.trackers):
            allowed = ", ".join(rooms.trackers) or "none"
            raise GuestError(422, loc, f"{_short(value)}: this server contacts only the trackers its operator allows "
                                       f"(serve --allow-tracker; allowed: {allowed})")
        return value
    if scheme == "file" or (not scheme and not parts.netloc):
        if parts.netloc not in ("", "localhost"):
            raise GuestError(400, loc, f"{_short(value)}: a file URI names a path on this server, not on a host")
        path = value if not scheme else parts.path
        while unquote(path) != path:  # %2e%2e -> .. (decoded as often as a reader might)
            path = unquote(path)
        return "file:" + _write(path, loc, rooms)
    raise GuestError(422, loc, f"{_short(value)}: scheme {scheme!r} is not allowed in a job (use file:PATH in your "
                               "workspace, or a tracker URL the operator allows)")


def _same_destination(uri: str, allowed: str) -> bool:
    """`uri` is the allowed URL or below it ('/' boundary: https://ok.example.evil.com never matches)."""
    a = allowed.rstrip("/")
    return uri.rstrip("/") == a or uri.startswith(a + "/")


def _json_paths(path: Path, loc: str, rooms: Rooms) -> None:
    """Paths inside a JSON file the config names (DeepSpeed monitors, NVMe offload, profiler output)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise GuestError(400, loc, f"{path.name}: larger than {MAX_JSON_BYTES} bytes (a DeepSpeed JSON is a few KB)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return  # not JSON: the run reports it with the file's name
    def walk(node: Any, where: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            here = f"{where}.{key}"
            if isinstance(value, str):
                if VARIABLE.search(value):
                    raise GuestError(422, f"{loc}{here}", "'${' in the JSON file: a job's values are never expanded")
                if JSON_PATH_KEY.search(str(key)) or "/" in value or "\\" in value:
                    _write(value, f"{loc}{here}", rooms)  # relative to the run's working directory: the workspace
            else:
                walk(value, here)

    try:
        walk(data, "")
    except RecursionError:
        raise GuestError(400, loc, f"{path.name}: nested too deeply to be a DeepSpeed JSON") from None


def _short(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:117] + "...")
