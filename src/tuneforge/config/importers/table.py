"""What every importer shares: the mapping report (one row per source key) and validation against the schema.

A translation never drops a key silently: each key of the source file becomes one row that says whether it was
mapped (and to which tuneforge key), ignored because tuneforge already behaves that way, moved to the environment
(secrets), or not mapped (with the reason). Targets are checked against the live schema, so a key whose tuneforge
feature does not exist yet is reported "not supported yet" instead of producing an invalid config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from tuneforge.config.load import _section_type
from tuneforge.config.schema import Config
from tuneforge.errors import UserError

MAPPED, IGNORED, SECRET, NOT_MAPPED = "mapped", "ignored", "secret", "not mapped"


class NotMapped(Exception):
    """Raised by a rule: this key has no tuneforge translation (the message is the reason)."""


@dataclass
class Row:
    key: str
    value: Any
    status: str
    targets: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class ImportResult:
    source: str
    config: dict[str, Any]
    rows: list[Row]
    # Secrets found in the source (env var name -> value): never written into the config.
    env: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def report(self) -> list[dict[str, Any]]:
        """JSON-safe rows; secret values are masked."""
        return [{"key": r.key, "status": r.status, "tuneforge": ", ".join(r.targets), "note": r.note,
                 "value": "***" if r.status == SECRET else r.value} for r in self.rows]


def schema_has(dotted: str, root: type[BaseModel] = Config) -> bool:
    """Does the config schema have this key (list indices skipped), e.g. 'data.train.0.format'?"""
    node: type[BaseModel] | None = root
    parts = [p for p in dotted.split(".") if not p.isdigit()]
    for i, part in enumerate(parts):
        if node is None or part not in node.model_fields:
            return False
        if i < len(parts) - 1:
            node = _section_type(node.model_fields[part].annotation)
    return True


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    node: Any = cfg
    parts = dotted.split(".")
    for part, nxt in zip(parts[:-1], parts[1:]):
        if part.isdigit():
            node = node[int(part)]
            continue
        node = node.setdefault(part, [] if nxt.isdigit() else {})
        if nxt.isdigit():
            while len(node) <= int(nxt):
                node.append({})
    node[parts[-1]] = value


def del_path(cfg: dict, dotted: str) -> None:
    node: Any = cfg
    parts = dotted.split(".")
    try:
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        del node[int(last) if last.isdigit() else last]
    except (KeyError, IndexError, TypeError):
        pass


class Translator:
    """Collects rows and config keys while an importer walks its source."""

    def __init__(self, source: str):
        self.source = source
        self.cfg: dict[str, Any] = {}
        self.rows: list[Row] = []
        self.env: dict[str, str] = {}

    def apply(self, key: str, value: Any, rule: Callable[[Any], dict[str, Any]] | None, unknown_reason: str) -> None:
        """Run `rule(value)` -> {target: value}; record exactly one row for `key`."""
        if rule is None:
            self.rows.append(Row(key, value, NOT_MAPPED, note=unknown_reason))
            return
        if value is None:
            self.rows.append(Row(key, value, IGNORED, note="null: tuneforge's default applies"))
            return
        try:
            targets = rule(value)
        except NotMapped as exc:
            self.rows.append(Row(key, value, NOT_MAPPED, note=str(exc)))
            return
        except Ignored as exc:
            self.rows.append(Row(key, value, IGNORED, note=str(exc)))
            return
        except (ValueError, TypeError) as exc:  # a value of the wrong type for its rule (e.g. learning_rate: "abc")
            self.rows.append(Row(key, value, NOT_MAPPED, note=f"value not accepted by tuneforge: {exc}"))
            return
        except Secret as exc:
            if value:
                self.env[exc.env_var] = str(value)
            self.rows.append(Row(key, value, SECRET, [f"${exc.env_var}"], "moved to the job's environment, never into the config"))
            return
        missing = [t for t in targets if not schema_has(t)]
        if missing:
            self.rows.append(Row(key, value, NOT_MAPPED, missing,
                                 f"not supported yet: tuneforge has no {', '.join(missing)}"))
            return
        for target, val in targets.items():
            set_path(self.cfg, target, val)
        self.rows.append(Row(key, value, MAPPED, list(targets)))

    def finish(self, required_hint: dict[str, str]) -> ImportResult:
        """Validate; a mapped value the schema rejects becomes 'not mapped' with the schema's reason."""
        for _ in range(50):
            try:
                Config.model_validate(self.cfg)
                break
            except ValidationError as exc:
                if not self._demote(exc.errors(), required_hint):
                    raise AssertionError("unreachable")  # _demote raises when nothing can be demoted
        return ImportResult(self.source, self.cfg, self.rows, self.env)

    def _demote(self, errors: list[dict], required_hint: dict[str, str]) -> bool:
        from tuneforge.config.load import explain

        for err in errors:
            loc = ".".join(str(p) for p in err["loc"])
            row = self._row_for(loc, err.get("msg", ""))
            if row is not None:
                for t in row.targets:
                    del_path(self.cfg, t)
                row.status, row.note = NOT_MAPPED, f"value not accepted by tuneforge: {explain(err, Config)}"
                return True
        err = errors[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing" and loc in required_hint:
            raise UserError(f"{self.source}: no {required_hint[loc]} (tuneforge needs {loc})")
        raise UserError(f"{self.source}: the translated config is not valid: {explain(err, Config)}")

    def _row_for(self, loc: str, msg: str) -> Row | None:
        mapped = [r for r in self.rows if r.status == MAPPED]
        for r in reversed(mapped):  # the most specific target that the error names
            if loc and any(t == loc for t in r.targets):
                return r
        for r in reversed(mapped):
            if loc and any(loc.startswith(t + ".") or t.startswith(loc + ".") for t in r.targets):
                return r
        for r in reversed(mapped):
            if any(t in msg for t in r.targets):
                return r
        return None


class Ignored(Exception):
    """Raised by a rule: tuneforge already does this (the message says how); nothing to set."""


class Secret(Exception):
    def __init__(self, env_var: str):
        super().__init__(env_var)
        self.env_var = env_var


def ignored(reason: str) -> Callable[[Any], dict]:
    def rule(_value):
        raise Ignored(reason)

    return rule


def not_mapped(reason: str) -> Callable[[Any], dict]:
    def rule(_value):
        raise NotMapped(reason)

    return rule


def secret(env_var: str) -> Callable[[Any], dict]:
    def rule(_value):
        raise Secret(env_var)

    return rule


def to(target: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], dict]:
    return lambda v: {target: convert(v)}


def flag(target: str, when_true: Any, default_reason: str) -> Callable[[Any], dict]:
    """A boolean source key: true sets `target`, false is tuneforge's default."""

    def rule(v):
        if v is True or str(v).lower() == "true":
            return {target: when_true}
        if v is False or str(v).lower() == "false":
            raise Ignored(default_reason)
        raise NotMapped(f"expected true/false, got {v!r}")

    return rule


BUILTIN_TEMPLATES = {"chatml", "llama3", "llama2", "alpaca", "mistral", "gemma", "phi3", "vicuna"}


def print_table(result: ImportResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"import {result.source}: " + ", ".join(f"{n} {k}" for k, n in result.counts().items()))
    for col in ("key", "value", "status", "tuneforge", "note"):
        table.add_column(col, overflow="fold")
    colors = {MAPPED: "green", IGNORED: "cyan", SECRET: "magenta", NOT_MAPPED: "yellow"}
    for r in result.report():
        value = r["value"] if isinstance(r["value"], str) else repr(r["value"])
        table.add_row(r["key"], value[:40], f"[{colors[r['status']]}]{r['status']}[/]", r["tuneforge"], r["note"])
    console.print(table)


def empty_or(rule: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """Empty values ('' [] {} false) mean 'nothing to do'; anything else goes through `rule`."""

    def wrapped(v):
        if not v:
            raise Ignored("empty: nothing to do")
        return rule(v)

    return wrapped


def same_as(defaults: set, reason: str) -> Callable[[Any], dict]:
    """Values tuneforge already uses are ignored; any other value cannot be honoured."""

    def rule(v):
        if v in defaults:
            raise Ignored(reason)
        raise NotMapped(f"{v!r}: {reason}")

    return rule


def lookup(target: str, table: dict[str, Any], what: str) -> Callable[[Any], dict]:
    def rule(v):
        if v not in table:
            raise NotMapped(f"{what} {v!r} has no tuneforge equivalent (known: {', '.join(sorted(table))})")
        return {target: table[v]}

    return rule


def when(truthy: Callable[[Any], dict], falsy: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """Pick a rule by the value's truthiness (e.g. true -> not supported, false -> tuneforge's default)."""
    return lambda v: truthy(v) if v else falsy(v)
