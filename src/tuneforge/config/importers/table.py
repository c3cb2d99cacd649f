"""What every importer shares: the mapping report (one row per source key) and validation against the schema.

A translation never drops a key silently: each key of the source file becomes one row that says whether it was
mapped (and to which tuneforge key), ignored because tuneforge already behaves that way, moved to the environment
(secrets), or not mapped (with the reason). Targets are checked against the live schema, so a key whose tuneforge
feature does not exist yet is reported "not supported yet" instead of producing an invalid config.
A setting the file leaves to the source tool's default is written with that default where tuneforge's differs
("source default" rows), so the imported run trains what the source tool would have trained.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ValidationError

from tuneforge.config.load import _section_type
from tuneforge.config.schema import Config
from tuneforge.errors import UserError

MAPPED, IGNORED, SECRET, NOT_MAPPED = "mapped", "ignored", "secret", "not mapped"
SOURCE_DEFAULT = "source default"  # absent from the file: the source tool's own default, written explicitly
NOTE = "_note"  # a rule may return {NOTE: "..."} next to its targets: shown in the mapped row
MASK = "***"

# A key is a credential when its NAME says so (issue 20: known or unknown key, at any depth). "token" and "key"
# alone are too common in tokenizer and registry names, so they count only in credential-like company.
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials", "apikey",
                 "auth", "authorization", "bearer", "cookie"}
_NOT_CREDENTIAL_TOKEN = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "start", "end", "stop", "special", "image",
                         "audio", "video", "additional", "chat", "boi", "eoi", "max", "min", "new"}
_CREDENTIAL_KEY = {"api", "access", "secret", "private", "auth", "hub", "hf", "wandb", "openai", "ssh", "signing",
                   "encryption", "license", "client", "session", "service", "account"}
_NOT_CREDENTIAL_NEXT = {"id", "ids", "type", "length", "len", "count", "name", "names"}


def _words(name: str) -> list[str]:
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", name) if w]


def looks_secret(name: str) -> bool:
    """Does this key NAME look like a credential (hub_token, hf_use_auth_token, wandb_api_key, password, ...)?"""
    words = _words(str(name))
    if _SECRET_WORDS & set(words):
        return True
    for i, w in enumerate(words):
        prev, nxt = (words[i - 1] if i else ""), (words[i + 1] if i + 1 < len(words) else "")
        if w not in ("token", "key") or nxt in _NOT_CREDENTIAL_NEXT:
            continue
        if (w == "token" and prev not in _NOT_CREDENTIAL_TOKEN) or (w == "key" and (not prev or prev in _CREDENTIAL_KEY)):
            return True
    return False


def secret_env_var(name: str) -> str | None:
    """Where a credential goes in the job's environment; None = dropped (no tool of ours reads it)."""
    words = set(_words(str(name)))
    if "wandb" in words:
        return "WANDB_API_KEY"
    if words & {"ms", "om", "modelscope", "modelers", "openai", "aws", "azure", "gcp", "s3"}:
        return None  # another service's credential: no tuneforge step uses it
    if words & {"hf", "hub", "huggingface", "token", "auth"}:
        return "HF_TOKEN"
    return None


def scrub(value: Any) -> tuple[Any, Any, list[tuple[str, Any]]]:
    """Split credential-named entries out of nested mappings/lists.

    -> (value without them, value with them masked for display, [(sub.path, secret value)]).
    """
    if isinstance(value, dict):
        clean, shown, found = {}, {}, []
        for k, v in value.items():
            if looks_secret(str(k)):
                found.append((str(k), v))
                shown[k] = MASK if v not in (None, "") else v
                continue
            clean[k], shown[k], sub = scrub(v)
            found += [(f"{k}.{p}", s) for p, s in sub]
        return clean, shown, found
    if isinstance(value, list):
        parts = [scrub(v) for v in value]
        found = [(f"{i}.{p}", s) for i, part in enumerate(parts) for p, s in part[2]]
        return [p[0] for p in parts], [p[1] for p in parts], found
    return value, value, []


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
    # Secrets found in the source (env var name -> value): never written into the config or the rows.
    env: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def left_out(self) -> list[Row]:
        """Keys whose setting is not in the written config (a partial import)."""
        return [r for r in self.rows if r.status == NOT_MAPPED]

    def report(self) -> list[dict[str, Any]]:
        """JSON-safe rows. Secret values never reach a row (Translator stores them masked), so this can be stored."""
        return [{"key": r.key, "status": r.status, "tuneforge": ", ".join(r.targets), "note": r.note,
                 "value": MASK if r.status == SECRET and r.value not in (None, "", True, False) else r.value}
                for r in self.rows]


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


def schema_default(dotted: str, root: type[BaseModel] = Config) -> Any:
    """tuneforge's default for a config key, e.g. 'lora.r' -> 16."""
    node: type[BaseModel] = root
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = _section_type(node.model_fields[part].annotation)
    return node.model_fields[parts[-1]].get_default(call_default_factory=True)


def has_path(cfg: dict, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


@dataclass(frozen=True)
class Default:
    """A setting the source tool applies when its file does not name it (its documented default).

    `targets` maps tuneforge keys to the value (or `value(args)`); `also` are other source keys that decide the same
    setting; `when(args)` limits it to the files it applies to (e.g. LoRA ranks only for LoRA runs).
    """

    key: str
    targets: dict[str, Any]
    note: str = ""
    also: tuple[str, ...] = ()
    when: Callable[[dict], bool] | None = None


def positive(v: Any) -> bool:
    """A number above 0 (e.g. a validation-set size); anything else, unparsable included, is not."""
    try:
        return float(v) > 0
    except (TypeError, ValueError):
        return False


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
    """Collects rows and config keys while an importer walks its source.

    Each key is judged on its own: a value the schema refuses demotes only the key that caused the refusal (found by
    taking candidates out one at a time), never the keys that share its section.
    """

    def __init__(self, source: str, known: Iterable[str] = ()):
        self.source = source
        self.known = sorted(known)  # the source tool's own key names, for did-you-mean
        self.cfg: dict[str, Any] = {}
        self.rows: list[Row] = []
        self.env: dict[str, str] = {}

    def apply(self, key: str, value: Any, rule: Callable[[Any], dict[str, Any]] | None, unknown_reason: str,
              known: Iterable[str] | None = None) -> None:
        """Run `rule(value)` -> {target: value}; record exactly one row for `key` (plus one per nested secret)."""
        if rule is None and looks_secret(key.rsplit(".", 1)[-1].split("[")[0]):
            self._secret(key, value, secret_env_var(key.rsplit(".", 1)[-1]))
            return
        value, shown, found = scrub(value)
        for sub, secret_value in found:
            self._secret(f"{key}.{sub}", secret_value, secret_env_var(sub.rsplit(".", 1)[-1]))
        if rule is None:
            self.rows.append(Row(key, shown, NOT_MAPPED, note=unknown_reason + self._did_you_mean(key, known)))
            return
        if value is None:
            self.rows.append(Row(key, shown, IGNORED, note="null: tuneforge's default applies"))
            return
        try:
            targets = dict(rule(value))
        except NotMapped as exc:
            self.rows.append(Row(key, shown, NOT_MAPPED, note=str(exc)))
            return
        except Ignored as exc:
            self.rows.append(Row(key, shown, IGNORED, note=str(exc)))
            return
        except (ValueError, TypeError) as exc:  # a value of the wrong type for its rule (e.g. learning_rate: "abc")
            self.rows.append(Row(key, shown, NOT_MAPPED, note=f"value not accepted by tuneforge: {exc}"))
            return
        except Secret as exc:
            self._secret(key, value, exc.env_var)
            return
        note = targets.pop(NOTE, "")
        missing = [t for t in targets if not schema_has(t)]
        if missing:
            self.rows.append(Row(key, shown, NOT_MAPPED, missing, f"not supported yet: tuneforge has no {', '.join(missing)}"))
            return
        for target, val in targets.items():
            set_path(self.cfg, target, val)
        self.rows.append(Row(key, shown, MAPPED, list(targets), note))

    def source_defaults(self, args: dict[str, Any], defaults: Iterable[Default], tool: str) -> None:
        """Write the source tool's default for each setting the file leaves implicit, where tuneforge's differs.

        Without this an imported config would silently train with tuneforge's defaults (another rank, lr, length...).
        A key set to null counts as absent (the tool's default applies); a target the file already decided through
        another key is left alone.
        """
        given = {k for k, v in args.items() if v is not None}
        for d in defaults:
            if d.key in given or given & set(d.also) or (d.when is not None and not d.when(args)):
                continue
            values = {t: v(args) if callable(v) else v for t, v in d.targets.items()}
            values = {t: v for t, v in values.items() if not has_path(self.cfg, t) and v != schema_default(t)}
            if not values:
                continue
            for target, val in values.items():
                set_path(self.cfg, target, val)
            ours = ", ".join(f"{t} {schema_default(t)!r}" for t in values)
            note = f"not in the file: {tool}'s default{' (' + d.note + ')' if d.note else ''}; tuneforge's own: {ours}"
            shown = next(iter(values.values())) if len(values) == 1 else values
            self.rows = [r for r in self.rows if r.key != d.key]  # a null value's 'ignored' row
            self.rows.append(Row(d.key, shown, SOURCE_DEFAULT, list(values), note))

    def _did_you_mean(self, key: str, known: Iterable[str] | None) -> str:
        leaf = key.rsplit(".", 1)[-1]
        names = sorted(known) if known is not None else self.known
        guess = difflib.get_close_matches(leaf, names, n=1, cutoff=0.7)
        return f" (did you mean {guess[0]!r}?)" if guess else ""

    def _secret(self, key: str, value: Any, env_var: str | None) -> None:
        """A credential: moved to the job's environment (or dropped); its value never reaches a row or the config."""
        shown, targets = (value if value in (None, "", True, False) else MASK), []
        if value in (None, "", False):
            note = "empty: no credential to move"
        elif value is True:
            note = f"true: the credential comes from ${env_var} in the environment" if env_var else "true: nothing to move"
        elif env_var is None or isinstance(value, (dict, list)):
            note = "looks like a credential: dropped, never stored (set what the job needs in its environment)"
        elif self.env.get(env_var, str(value)) != str(value):
            note = f"looks like a credential: dropped (a different ${env_var} was already found), never stored"
        else:
            self.env[env_var], targets = str(value), [f"${env_var}"]
            note = "moved to the job's environment, never into the config"
        self.rows.append(Row(key, shown, SECRET, targets, note))

    def finish(self, required_hint: dict[str, str]) -> ImportResult:
        """Validate; a mapped value the schema rejects becomes 'not mapped' with the schema's reason."""
        for _ in range(len(self.rows) + 1):
            errors = _errors(self.cfg)
            if not errors:
                break
            self._demote(errors, required_hint)
        return ImportResult(self.source, self.cfg, self.rows, self.env)

    def _demote(self, errors: list[dict], required_hint: dict[str, str]) -> None:
        from tuneforge.config.load import explain

        for err in errors:
            row = None if err["type"] == "missing" else self._culprit(err, errors)
            if row is not None:
                for t in row.targets:
                    del_path(self.cfg, t)
                row.status, row.note = NOT_MAPPED, f"value not accepted by tuneforge: {explain(err, Config)}"
                return
        err = errors[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing" and loc in required_hint:
            raise UserError(f"{self.source}: no {required_hint[loc]} (tuneforge needs {loc})")
        raise UserError(f"{self.source}: the translated config is not valid: {explain(err, Config)}")

    def _culprit(self, err: dict, errors: list[dict]) -> Row | None:
        """The one mapped key whose removal makes this error go away (and breaks nothing else), if any."""
        before = {_signature(e) for e in errors}
        fallback = None
        for row in self._candidates(".".join(str(p) for p in err["loc"]), err.get("msg", "")):
            trial = copy.deepcopy(self.cfg)
            for t in row.targets:
                del_path(trial, t)
            after = {_signature(e) for e in _errors(trial)}
            # Not fixed if the same check still fails, even naming another field (e.g. the next LoRA key).
            if _signature(err) in after or any(sig[:2] == _signature(err)[:2] for sig in after - before):
                continue
            if after <= before:
                return row
            # Errors a section validator hid until this one was fixed are fine; a required key lost is not.
            if fallback is None and not any(sig[1] == "missing" for sig in after - before):
                fallback = row
        return fallback

    def _candidates(self, loc: str, msg: str) -> list[Row]:
        mapped = [r for r in reversed(self.rows) if r.status == MAPPED]  # later keys first
        words = set(re.findall(r"[A-Za-z_][\w.]*", msg))

        def named(r: Row) -> bool:
            return any(t in msg or t.rsplit(".", 1)[-1] in words for t in r.targets)

        groups = [
            [r for r in mapped if loc in r.targets],
            [r for r in mapped if named(r)],
            [r for r in mapped if any(t.startswith(loc + ".") or loc.startswith(t + ".") for t in r.targets) or not loc],
        ]
        out: list[Row] = []
        for group in groups:
            out += [r for r in group if r not in out]
        return out


def _errors(cfg: dict) -> list[dict]:
    try:
        Config.model_validate(cfg)
    except ValidationError as exc:
        return exc.errors()
    return []


def _signature(err: dict) -> tuple:
    return tuple(str(p) for p in err["loc"]), err["type"], err.get("msg", "")


class Ignored(Exception):
    """Raised by a rule: tuneforge already does this (the message says how); nothing to set."""


class Secret(Exception):
    def __init__(self, env_var: str | None):
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


def secret(env_var: str | None) -> Callable[[Any], dict]:
    """A credential key: its value goes to the job's environment as `env_var` (None: dropped)."""

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
    colors = {MAPPED: "green", IGNORED: "cyan", SECRET: "magenta", NOT_MAPPED: "yellow", SOURCE_DEFAULT: "blue"}
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


# HF TrainingArguments / axolotl optimizer names -> train.optimizer, with what differs (if anything).
_FUSED = "tuneforge's adamw is torch's AdamW, fused kernel on GPU"
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw_torch": ("adamw", ""), "adamw_torch_fused": ("adamw", _FUSED), "adamw_hf": ("adamw", "the same AdamW update (torch's)"),
    "adamw_apex_fused": ("adamw", _FUSED + " (same update as apex's)"), "adamw_torch_xla": ("adamw", "torch's AdamW"),
    "adamw": ("adamw", ""), "adamw_bnb_8bit": ("adamw_8bit", ""), "adamw_8bit": ("adamw_8bit", ""),
    "paged_adamw_8bit": ("paged_adamw_8bit", ""),
    "paged_adamw_32bit": ("adamw", "the same 32-bit AdamW update; its state is not paged to CPU (use paged_adamw_8bit to page)"),
    "paged_adamw": ("adamw", "the same 32-bit AdamW update; its state is not paged to CPU (use paged_adamw_8bit to page)"),
    "adafactor": ("adafactor", ""), "lion_8bit": ("lion_8bit", ""), "lion_32bit": ("lion", ""), "lion": ("lion", ""),
    "paged_lion_8bit": ("lion_8bit", "the same update; its state is not paged to CPU"),
    "paged_lion_32bit": ("lion", "the same update; its state is not paged to CPU"),
    "sgd": ("sgd", ""), "adagrad": ("adagrad", ""),
}


def optimizer(v: Any) -> dict:
    if v not in OPTIMIZERS:
        raise NotMapped(f"optimizer {v!r} has no tuneforge equivalent (known: {', '.join(sorted(OPTIMIZERS))})")
    name, note = OPTIMIZERS[v]
    return {"train.optimizer": name, NOTE: note}


def flash_attention() -> dict:
    """flash-attn asked for: kept where it can run here, else the best attention this machine has, said so."""
    if importlib.util.find_spec("flash_attn") is not None:
        return {"model.attn_implementation": "flash_attention_2"}
    return {"model.attn_implementation": "auto",
            NOTE: "flash-attn is not installed here: auto = the best attention available (flash_attention_2 where "
                  "flash-attn and a GPU are present, else sdpa); same results, different speed"}


def flash_on(v):
    """A source's flash-attention switch (axolotl flash_attention, X—LLM use_flash_attention_2)."""
    if v is True or str(v).lower() == "true":
        return flash_attention()
    raise Ignored("off: tuneforge picks the attention (model.attn_implementation auto)")


def fast_tokenizer_only(v):
    """A source's fast-tokenizer switch (LLaMA-Factory use_fast_tokenizer, X—LLM tokenizer_use_fast)."""
    if v is False or str(v).lower() == "false":
        raise NotMapped("tuneforge always uses the fast (Rust) tokenizer; a slow tokenizer cannot be chosen")
    raise Ignored("tuneforge always uses the fast (Rust) tokenizer")
