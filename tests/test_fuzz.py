"""Fuzz suite for bad input (issue 11): several hundred malformed command lines, configs, rows and files.

Every case asserts the README's promise: exit code 2, no traceback, exactly one `error:` line that names
the place (the command, the config key, or the file and row). Cases run in-process through the CLI's real
error boundary (`tuneforge.errors.run_cli`), each under an alarm so a hang fails instead of blocking CI;
a few run as real subprocesses. Most need no model: only `prepare`-level cases load a tiny local tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import typing
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import tiny
from helpers import run_cli, run_cli_inprocess

HANG_SECONDS = 60
GOOD_ROW = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]}


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def fail(*_):
        raise TimeoutError(f"hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli(*args, stdin: str | None = None):
    with no_hang():
        return run_cli_inprocess(*map(str, args), stdin=stdin)


def assert_one_error(proc, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line, mentioning every needle. Returns that line."""
    text = proc.stderr + proc.stdout
    assert "Traceback" not in text, text[-3000:]
    assert proc.returncode == 2, (proc.returncode, text[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a tokenizer-only model dir and a valid tiny dataset (no weights: no torch needed)."""
    root = tmp_path_factory.mktemp("fuzz")
    tiny.build_tokenizer(root / "tok")
    tiny.write_jsonl(root / "good.jsonl", [GOOD_ROW] * 6)
    return root


def base_config(work: Path, **sections) -> dict:
    cfg = {
        "model": {"path": str(work / "tok")},
        "data": {"train": [{"path": str(work / "good.jsonl")}], "cache_dir": str(work / "cache")},
        "output": {"dir": str(work / "run")},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def config_file(work: Path, name: str = "c.yaml", **sections) -> Path:
    return write(work / name, yaml.safe_dump(base_config(work, **sections)))


def test_base_config_is_valid(work):
    proc = cli("config", "validate", config_file(work))
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout and "not checked" in proc.stdout


# ---------------------------------------------------------------------------------------------- 1. command lines
def _commands():
    import typer

    from tuneforge import cli as cli_module

    def walk(command, path):
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, path + [name])
        else:
            yield path, command

    return list(walk(typer.main.get_command(cli_module.app), []))


def _option_kind(p):
    """(python type, min, max) of an option, on typer's vendored click (>= 0.29) or on click itself."""
    if hasattr(p, "bare_type"):
        return p.bare_type(), getattr(p, "min", None), getattr(p, "max", None)
    kind = {"integer": int, "float": float}.get(getattr(p.type, "name", ""), str)
    kind = int if "int" in getattr(p.type, "name", "") else kind
    return kind, getattr(p.type, "min", None), getattr(p.type, "max", None)


COMMANDS = _commands()
USAGE_CASES = []
for _path, _command in COMMANDS:
    _name = " ".join(["tuneforge", *_path])
    USAGE_CASES.append(([*_path, "--no-such-option"], _name))
    if any(p.required for p in _command.params):
        USAGE_CASES.append((list(_path), _name))  # a missing argument or required option
    for _p in _command.params:
        if _p.param_type_name != "option" or getattr(_p, "is_flag", False):
            continue
        USAGE_CASES.append(([*_path, _p.opts[0]], "tuneforge"))  # the option's value is missing
        kind, lo, hi = _option_kind(_p)
        if kind in (int, float):
            USAGE_CASES.append(([*_path, _p.opts[0], "abc"], _name))
        if kind is float:
            USAGE_CASES += [([*_path, _p.opts[0], "nan"], _name), ([*_path, _p.opts[0], "inf"], _name)]
        if kind in (int, float) and lo is not None:
            USAGE_CASES.append(([*_path, _p.opts[0], str(lo - 1)], _name))
        if kind in (int, float) and hi is not None:
            USAGE_CASES.append(([*_path, _p.opts[0], str(hi * 10 + 1)], _name))
USAGE_CASES += [(["bogus"], "No such command"), (["trian"], "No such command"), (["config", "bogus"], "No such command"),
                (["data", "bogus"], "No such command"), (["--bogus"], "tuneforge")]


@pytest.mark.parametrize("args,needle", USAGE_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_command_line_errors(args, needle):
    line = assert_one_error(cli(*args), needle)
    assert "--help" in line  # says where to look


def test_usage_case_count():
    assert len(USAGE_CASES) >= 80


# ---------------------------------------------------------------------------------------------- 2. config values
def _unwrap(annotation):
    """(kind, args) of a field annotation with Optional removed."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _unwrap(args[0])
    return origin or annotation, args


def _bounds(field):
    lo = hi = None
    for m in field.metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else getattr(m, "gt", lo)
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else getattr(m, "lt", hi)
    return lo, hi


def _bad_values(field) -> list[str]:
    """YAML texts (for --set) that the field must refuse."""
    from pydantic import BaseModel

    kind, args = _unwrap(field.annotation)
    lo, hi = _bounds(field)
    if kind is bool:
        return ["maybe", "[1]"]
    if kind in (int, float):
        out = ["abc", "[1]", "{a: 1}", ".nan"] + ([".inf", "-.inf"] if kind is float else ["1.5"])
        if lo is not None:
            out.append(str(lo - 1))
        if hi is not None:
            out.append(str(hi * 10 + 1))
        return out
    if kind is str:
        return ["[1, 2]", "{a: 1}"]
    if kind is typing.Literal:
        return ["not-a-choice", "[1]"]
    if kind is tuple:
        return ["abc", "[0.5]", "[.nan, 0.5]", "[0.5, 1.5]", "[-0.1, 0.5]"]
    if kind in (list, dict):
        return ["5", "abc"] if kind is dict else ["5"]
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return ["5", "[1]"]
    return []


def _schema_cases():
    from pydantic import BaseModel

    from tuneforge.config import Config

    cases = []

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            dotted = f"{prefix}{name}"
            kind, args = _unwrap(field.annotation)
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, dotted + ".")
            if kind is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel) and dotted == "data.train":
                walk(args[0], dotted + ".0.")
                continue
            cases.extend((dotted, value) for value in _bad_values(field))
            if kind is typing.Union and dotted == "lora.target_modules":
                cases.extend([(dotted, "[]"), (dotted, "5"), (dotted, "not-all-linear")])

    walk(Config, "")
    # one misspelled key per section
    for section in ("model", "data", "data.train.0", "data.clean", "train", "train.generate_eval", "lora", "output", "tracking"):
        cases.append((f"{section}.nosuchkey", "1"))
    return [c for c in cases if not c[0].startswith("data.eval.")]


SCHEMA_CASES = _schema_cases()


@pytest.mark.parametrize("key,value", SCHEMA_CASES, ids=lambda v: str(v))
def test_every_config_field_refuses_bad_values(work, key, value):
    if key == "data.train.0.path" and value == "abc":
        pytest.skip("'abc' is a valid (missing) path: covered by test_config_paths")
    assert_one_error(cli("config", "validate", config_file(work), "--set", f"{key}={value}"), key.removesuffix(".nosuchkey"))


def test_schema_case_count():
    assert len(SCHEMA_CASES) >= 200


CONFLICTS = [
    # (overrides, needles): combinations that used to be accepted without a word
    (["train.finetune=full", "lora.r=8"], ["lora.r", "finetune: full"]),
    (["data.clean.min_tokens=100", "data.clean.max_tokens=10"], ["min_tokens (100) > max_tokens (10)"]),
    (["data.eval_size=5", "data.eval_split=0.1"], ["eval_size", "eval_split"]),
    (["data.eval=[{path: e.jsonl}]", "data.eval_split=0.2"], ["data.eval", "eval_split"]),
    (["data.eval=[{path: e.jsonl}]", "data.eval_size=3"], ["data.eval", "eval_size"]),
    (["data.train.0.samples=5", "data.train.0.weight=2"], ["data.train.0", "samples and weight"]),
    (["data.train.0.query=SELECT 1"], ["data.train.0.query", "SQL"]),
    (["model.path=./local-model", "model.revision=main"], ["model.revision", "local"]),
    (["train.warmup_steps=10", "train.max_steps=5"], ["warmup_steps (10) >= max_steps (5)"]),
    (["train.warmup_steps=10", "train.warmup_ratio=0.1"], ["warmup_steps and warmup_ratio"]),
    (["train.eval_every=5", "data.eval_split=0"], ["eval_every needs eval data"]),
    (["train.generate_eval.samples=3", "data.eval_split=0"], ["generate_eval.samples needs eval data"]),
    (["data.clean.max_per_cluster=3"], ["max_per_cluster needs data.clean.clusters"]),
    (["data.packing=padding_free", "data.pack_length=2048"], ["data.pack_length"]),
    (["data.packing=bins", "data.pack_length=16"], ["data.pack_length (16)"]),
    (["data.train.0.text_unit=line"], ["data.train.0.text_unit"]),
    (["data.train.0.custom=x"], ["data.train.0", "exactly one"]),
    (["train.lr=1e30"], ["train.lr"]),
    (["train.lr=1.0e+30"], ["train.lr"]),
    (["lora.alpha=1.0e+30"], ["lora.alpha"]),
    (["data.max_length=100000000"], ["data.max_length"]),
    (["train.betas=[0.9, 1.0]"], ["train.betas", "[0, 1)"]),
    (["output.dir=${TUNEFORGE_FUZZ_UNSET}/run"], ["output.dir", "TUNEFORGE_FUZZ_UNSET", "not set"]),
    (["data.cache_dir=${TUNEFORGE_FUZZ_UNSET}"], ["data.cache_dir", "TUNEFORGE_FUZZ_UNSET"]),
    (["model.path=$TUNEFORGE_FUZZ_UNSET/m"], ["model.path", "TUNEFORGE_FUZZ_UNSET"]),
    (["data.train.0.path=${TUNEFORGE_FUZZ_UNSET}/t.jsonl"], ["data.train.0.path", "TUNEFORGE_FUZZ_UNSET"]),
    (["output.dir=${}"], ["output.dir", "environment variable"]),
    (["output.dir=''"], ["output.dir", "empty"]),
    (["output.dir='   '"], ["output.dir", "empty"]),
    (["model.path=''"], ["model.path", "empty"]),
    (["data.train.0.path=''"], ["data.train.0.path", "empty"]),
    (["data.cache_dir=''"], ["data.cache_dir", "empty"]),
    (["data.train=[]"], ["data.train"]),
    (["lora.target_modules=[]"], ["lora.target_modules"]),
    (["lora.target_modules=['']"], ["lora.target_modules"]),
]


@pytest.mark.parametrize("sets,needles", CONFLICTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_conflicting_and_out_of_range_options(work, monkeypatch, sets, needles):
    monkeypatch.delenv("TUNEFORGE_FUZZ_UNSET", raising=False)
    args = [a for s in sets for a in ("--set", s)]
    assert_one_error(cli("config", "validate", config_file(work), *args), *needles)


def test_env_vars_in_paths_are_expanded(work, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_FUZZ_OUT", str(work / "expanded"))
    proc = cli("config", "show", config_file(work), "--set", "output.dir=${TUNEFORGE_FUZZ_OUT}/run")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["output"]["dir"] == str(work / "expanded" / "run")


OVERRIDES = [
    ("train.lr", "KEY=VALUE"), ("=1", "KEY=VALUE"), ("train..lr=1", "KEY=VALUE"), (".lr=1", "KEY=VALUE"),
    ("train.lr=[1", "--set train.lr"), ("train.lr={a: [1}", "--set train.lr"), ("train.lr=!!python/object:os.system x", "--set train.lr"),
    ("data.train.9.path=x", "data.train is a list"), ("data.train.x.path=x", "data.train is a list"),
    ("train.lr.x=1", "train.lr"), ("data.train.0.path.x=1", "data.train.0.path"), ("train=5", "train"),
    ("model=[1]", "model"), ("nosuch.section=1", "nosuch"), ("train.lr=a: b: c", "--set train.lr"),
]


@pytest.mark.parametrize("item,needle", OVERRIDES)
def test_bad_overrides(work, item, needle):
    assert_one_error(cli("config", "validate", config_file(work), "--set", item), needle)


# ---------------------------------------------------------------------------------------------- 3. config files
CONFIG_FILES = [
    ("bad-utf8.yaml", b"model:\n  path: \xff\xfe\n", "not UTF-8"),
    ("latin1.yaml", "model: {path: caf\u00e9}\n".encode("latin-1"), "line 1"),
    ("tab.yaml", "model:\n\tpath: x\n", "line 2"),
    ("unclosed.yaml", "model: {path: x\ndata: [\n", "not valid YAML"),
    ("indent.yaml", "model:\n  path: x\n bad: 1\n", "not valid YAML"),
    ("python-tag.yaml", "model: !!python/object/apply:os.system ['echo hi']\n", "no !tags"),
    ("custom-tag.yaml", "model: !include other.yaml\n", "no !tags"),
    ("dup-top.yaml", "model: {path: a}\nmodel: {path: b}\n", "duplicate key 'model'"),
    ("dup-nested.yaml", "model:\n  path: a\n  path: b\n", "duplicate key 'path'"),
    ("dup-train.yaml", "train:\n  lr: 1.0e-4\n  epochs: 1\n  lr: 1.0\n", "duplicate key 'lr' (first at line 2)"),
    ("list.yaml", "- model\n- data\n", "must be a mapping"),
    ("scalar.yaml", "just a string\n", "must be a mapping"),
    ("empty.yaml", "", "must be a mapping"),
    ("null.yaml", "~\n", "must be a mapping"),
    ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml"),
    ("bad.json", '{"model": {"path": "x"},}', "not valid JSON"),
    ("dup.json", '{"model": {"path": "x"}, "model": {"path": "y"}}', "duplicate key 'model'"),
    ("deep.json", "[" * 100000, "nested too deeply"),
    ("list.json", "[1, 2]", "must be a mapping"),
    ("bad-utf8.json", b'{"model": "\xc3\x28"}', "not UTF-8"),
    ("aliases.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
     + "model: {path: org/m}\ndata: {train: [{path: x.jsonl, custom: null, options: {k: *i}}]}\n", "anchors/aliases"),
    ("huge-value.yaml", "model: {path: org/m}\ndata: {train: [{path: x.jsonl}]}\ntrain: {lr: [" + ", ".join(["[1, 2, 3]"] * 5000) + "]}\n",
     "train.lr"),

    ("unhashable.yaml", "? [a, b]\n: 1\n", "not valid YAML"),
    ("no-model.yaml", "data: {train: [{path: x.jsonl}]}\n", "missing required key 'model'"),
    ("no-data.yaml", "model: {path: org/m}\n", "missing required key 'data'"),
    ("top-typo.yaml", "model: {path: org/m}\ndata: {train: [{path: x.jsonl}]}\ntrian: {lr: 1}\n", "did you mean 'train'"),
]


@pytest.mark.parametrize("name,content,needle", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_malformed_config_files(work, name, content, needle):
    path = write(work / name, content)
    line = assert_one_error(cli("config", "validate", path), needle)
    assert name in line


def test_config_paths_that_are_not_files(work):
    assert_one_error(cli("config", "validate", work / "nope.yaml"), "config file not found", "nope.yaml")
    assert_one_error(cli("config", "validate", work), "not a regular file")
    fifo = work / "pipe.yaml"
    if not fifo.exists():
        os.mkfifo(fifo)
    assert_one_error(cli("config", "validate", fifo), "not a regular file")  # would block forever if opened
    assert_one_error(cli("config", "validate", "/dev/null"), "not a regular file")


def test_config_validate_checks_local_paths(work):
    cfg = config_file(work)
    assert_one_error(cli("config", "validate", cfg, "--set", f"data.train.0.path={work}/missing.jsonl"), "data.train.0.path", "does not exist")
    assert_one_error(cli("config", "validate", cfg, "--set", f"model.path={work}/no-model"), "model.path", "does not exist")
    assert_one_error(cli("config", "validate", cfg, "--set", f"model.path={work}"), "model.path", "not a model directory")
    assert_one_error(cli("config", "validate", cfg, "--set", f"model.chat_template={work}/t.jinja"), "model.chat_template", "does not exist")
    afile = write(work / "a-file", "x")
    assert_one_error(cli("config", "validate", cfg, "--set", f"output.dir={afile}"), "output.dir", "not a folder")
    assert_one_error(cli("config", "validate", cfg, "--set", f"data.cache_dir={afile}/cache"), "data.cache_dir", "is a file")
    proc = cli("config", "validate", cfg, "--set", "model.path=org/some-model", "--set", "data.train.0.path=org/some-data")
    assert proc.returncode == 0, proc.stderr
    assert "not checked: model.path org/some-model" in proc.stdout and "not checked: data.train.0.path org/some-data" in proc.stdout
    if os.geteuid() != 0:  # root reads everything
        locked = write(work / "locked.jsonl", json.dumps(GOOD_ROW) + "\n")
        locked.chmod(0)
        try:
            assert_one_error(cli("config", "validate", cfg, "--set", f"data.train.0.path={locked}"), "data.train.0.path", "not readable")
        finally:
            locked.chmod(0o644)


def test_special_files_as_inputs_are_refused_without_hanging(work):
    fifo = work / "pipe.jsonl"
    if not fifo.exists():
        os.mkfifo(fifo)
    for command in (("config", "validate"), ("prepare",), ("config", "show")):
        assert_one_error(cli(*command, config_file(work), "--set", f"data.train.0.path={fifo}"), "data.train.0.path", "pipe")
    assert_one_error(cli("prepare", config_file(work), "--set", "data.train.0.path=/dev/zero"), "data.train.0.path", "device")
    assert_one_error(cli("prepare", config_file(work), "--set", f"model.path={fifo}"), "model.path", "pipe")
    assert_one_error(cli("prepare", config_file(work), "--set", f"output.dir={fifo}"), "output.dir", "pipe")


# ---------------------------------------------------------------------------------------------- 4. rows
def _rows(bad: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in [GOOD_ROW] * 5 + [bad])


BAD_ROWS = [
    # (format or auto, bad row, needle)
    ("auto", {"messages": "hello"}, "'messages' must be a non-empty list"),
    ("auto", {"messages": 5}, "'messages' must be a non-empty list"),
    ("auto", {"messages": []}, "'messages' must be a non-empty list"),
    ("auto", {"messages": ["hi"]}, "messages[0] must have 'role' and 'content'"),
    ("auto", {"messages": [{"role": "user"}]}, "messages[0] must have"),
    ("auto", {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ("auto", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("auto", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ("auto", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("auto", {"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ("auto", {"conversations": 5}, "'conversations' must be a non-empty list"),
    ("auto", {"conversations": "hi"}, "'conversations' must be a non-empty list"),
    ("auto", {"conversations": ["hi"]}, "conversations[0]"),
    ("auto", {"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0]"),
    ("auto", {"conversations": [{"from": "human", "value": 5}]}, "conversations[0]"),
    ("auto", {"instruction": "a", "output": 5}, "'instruction' and 'output'"),
    ("auto", {"instruction": ["a"], "output": "b"}, "'instruction' and 'output'"),
    ("auto", {"instruction": "a", "output": "b", "history": {"q": "a"}}, "'history' must be a list"),
    ("auto", {"instruction": "a", "output": "b", "history": "q"}, "'history' must be a list"),
    ("auto", {"instruction": "a", "output": "b", "history": [["only one"]]}, "'history' must be a list"),
    ("auto", {"instruction": "a", "output": "b", "history": [[1, 2]]}, "'history' must be a list"),
    ("auto", {"instruction": "a", "output": "b", "input": [1]}, "'input' must be a string"),
    ("auto", {"instruction": "a", "output": "b", "system": {"x": 1}}, "'system' must be a string"),
    ("auto", {"prompt": "a", "completion": 5}, "must be strings"),
    ("auto", {"input": None, "output": "b"}, "must be strings"),
    ("auto", {"text": 5}, "'text' must be a non-empty string"),
    ("auto", {"text": "   "}, "'text' must be a non-empty string"),
    ("auto", {"foo": 1}, "cannot detect the format"),
    ("auto", {"prompt": {"role": "prompter", "text": "hi", "replies": [{"role": "assistant", "text": None}]}}, "no string 'text'"),
    ("auto", {"prompt": {"role": "prompter", "text": None, "replies": []}}, "no string 'text'"),
    ("auto", {"prompt": {"role": "prompter", "text": "hi", "replies": "x"}}, "'replies' must be a list"),
    ("auto", {"prompt": {"role": "prompter", "text": "hi", "replies": [5]}}, "'replies' must be a list"),
    ("auto", {"prompt": {"role": "bot", "text": "hi", "replies": []}}, "role 'bot'"),
    ("auto", {"prompt": "x", "rejected": "y"}, "missing chosen"),
    ("auto", {"prompt": "x", "chosen": "y"}, "missing rejected"),
    ("auto", {"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list"),
    ("auto", {"prompt": "p", "chosen": 5, "rejected": "b"}, "'chosen' must be"),
    ("auto", {"prompt": "p", "chosen": {"role": "assistant"}, "rejected": "b"}, "messages[0] must have"),
    ("auto", {"chosen": "no transcript", "rejected": "no transcript"}, "no 'Human:'/'Assistant:' turns"),
    ("auto", {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "5"}], "tools": []},
     "function_call value must be a JSON object"),
    ("auto", {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{bad"}], "tools": []},
     "function_call value is not JSON"),
    ("auto", {"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": 5}], "tools": [{"name": "f"}]},
     "observation value must be a string"),
    ("auto", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": "[1]"}, "'tools' must be a list"),
    ("auto", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": {"a": 1}}, "'tools' must be a list"),
    ("auto", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": "{bad"}, "'tools' is not valid JSON"),
    ("messages", {"x": 1}, "'messages' must be a non-empty list"),
    ("sharegpt", {"x": 1}, "'conversations' must be a non-empty list"),
    ("alpaca", {"x": 1}, "'instruction' and 'output'"),
    ("input_output", {"x": 1}, "input-output rows need"),
    ("text", {"x": 1}, "'text' must be a non-empty string"),
    ("oasst", {"x": 1}, "oasst rows need a 'prompt'"),
    ("oasst", {"prompt": "not a tree"}, "oasst rows need a 'prompt'"),
    ("preference", {"x": 1}, "missing chosen"),
    ("tool_calls", {"x": 1}, "'conversations' must be a non-empty list"),
    ("tool_calls", {"conversations": [5]}, "'conversations' must be a non-empty list"),
]


def _row_config(work: Path, data_file: Path, fmt: str = "auto", policy: str = "error", **spec) -> Path:
    return config_file(work, data={"train": [{"path": str(data_file), "format": fmt, **spec}], "on_bad_row": policy, "eval_split": 0.0})


@pytest.mark.parametrize("fmt,row,needle", BAD_ROWS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_ROWS)])
def test_bad_rows_name_file_and_row(work, fmt, row, needle):
    data = write(work / "rows.jsonl", _rows(row) if fmt == "auto" else json.dumps(row) + "\n")
    line = assert_one_error(cli("prepare", _row_config(work, data, fmt)), needle, "on_bad_row")
    assert f"rows.jsonl row {6 if fmt == 'auto' else 1}" in line


def test_bad_row_policy_skip_counts_every_kind(work):
    """The skip policy applies to every format: each bad row is dropped and counted, none trained silently."""
    data = work / "mixed.jsonl"
    auto_rows = [r for fmt, r, _ in BAD_ROWS if fmt == "auto"]
    good = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]} for i in range(4)]
    write(data, "".join(json.dumps(r) + "\n" for r in good + auto_rows))
    proc = cli("prepare", _row_config(work, data, policy="skip"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "run" / "data_report.json").read_text())
    assert sum(report["dropped"].values()) == len(auto_rows), report["dropped"]
    assert report["train_samples"] == len(good)
    assert "dropped" in proc.stdout


# ---------------------------------------------------------------------------------------------- 5. data files
def _sqlite(path: Path) -> Path:
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE faq (q TEXT, a TEXT)")
    con.execute("INSERT INTO faq VALUES ('hi', 'yo')")
    con.commit()
    con.close()
    return path


GOOD_JSONL = "".join(json.dumps(GOOD_ROW) + "\n" for _ in range(4))
DATA_FILES = [
    # (file name, content, extra spec, needles)
    ("latin1.jsonl", json.dumps({"text": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9"), {}, ["latin1.jsonl", "not UTF-8", "line 1"]),
    ("bad-utf8.json", b'[{"text": "\xff"}]', {}, ["bad-utf8.json", "not UTF-8"]),
    ("bad-utf8.csv", b"prompt,completion\na,\xff\xfe\n", {}, ["bad-utf8.csv", "not UTF-8", "line 2"]),
    ("bad-utf8.tsv", b"prompt\tcompletion\na\t\xff\n", {}, ["bad-utf8.tsv", "not UTF-8"]),
    ("bad-utf8.txt", b"hello \xff world", {}, ["bad-utf8.txt", "not UTF-8"]),
    ("bad-utf8.sql", b"CREATE TABLE t (a TEXT); -- \xff\n", {"query": "SELECT a FROM t"}, ["bad-utf8.sql", "not UTF-8"]),
    ("notgzip.jsonl.gz", GOOD_JSONL.encode(), {}, ["notgzip.jsonl.gz", "not a valid gzip"]),
    ("truncated.jsonl.gz", gzip.compress(GOOD_JSONL.encode() * 20)[:-30], {}, ["truncated.jsonl.gz", "not a valid gzip"]),
    ("empty.csv.gz", b"", {}, ["empty.csv.gz", "not a valid gzip"]),
    ("latin1.jsonl.gz", gzip.compress(b'{"text": "caf\xe9"}\n'), {}, ["latin1.jsonl.gz", "not UTF-8"]),
    ("deep.jsonl", "[" * 100000 + "\n", {}, ["deep.jsonl row 1", "nested too deeply"]),
    ("deep-obj.jsonl", '{"a": ' * 100000 + "\n", {}, ["deep-obj.jsonl row 1"]),
    ("deep.json", "[" * 100000, {}, ["deep.json", "nested too deeply"]),
    ("invalid.jsonl", GOOD_JSONL + "{not json\n", {}, ["invalid.jsonl row 5", "invalid JSON"]),
    ("array-line.jsonl", GOOD_JSONL + "[1, 2]\n", {}, ["array-line.jsonl row 5", "JSON object"]),
    ("scalar.json", "5", {}, ["scalar.json", "JSON array"]),
    ("ragged.json", '{"text": ["a", "b"], "x": ["c"]}', {}, ["ragged.json", "equal-length"]),
    ("items.json", '[{"text": "a"}, 5]', {}, ["items.json row 2", "JSON object"]),
    ("unclosed.csv", 'prompt,completion\na,"b\nc,d\ne,f\n', {}, ["unclosed.csv", "malformed CSV", "unclosed quote"]),
    ("extra.csv", "prompt,completion\na,b\nc,d,e\n", {}, ["extra.csv row 3", "3 fields but the header has 2"]),
    ("missing.csv", "prompt,completion\na,b\nc\n", {}, ["missing.csv row 3", "1 fields but the header has 2"]),
    ("dupheader.csv", "prompt,prompt\na,b\n", {}, ["dupheader.csv line 1", "unique"]),
    ("quote.tsv", 'prompt\tcompletion\na\t"b\n', {}, ["quote.tsv", "malformed CSV"]),
    ("garbage.parquet", b"PAR1 not really", {}, ["garbage.parquet", "parquet"]),
    ("garbage.db", b"not a database" * 100, {"query": "SELECT * FROM t"}, ["garbage.db", "query failed"]),
    ("broken.sql", "CREATE TABLE (;", {"query": "SELECT 1"}, ["broken.sql", "does not load"]),
    ("nul.sql", "CREATE TABLE t (a TEXT);\x00", {"query": "SELECT a FROM t"}, ["nul.sql", "does not load"]),
    ("twoqueries.db", None, {"query": "SELECT 1; SELECT 2"}, ["twoqueries.db", "query failed"]),
    ("nulquery.db", None, {"query": "SELECT 1\x00"}, ["nulquery.db", "query failed"]),
    ("writequery.db", None, {"query": "DROP TABLE faq"}, ["writequery.db", "query failed"]),
    ("noquery.db", None, {}, ["noquery.db", "need a query"]),
    ("badquery.db", None, {"query": "SELECT nope FROM faq"}, ["badquery.db", "query failed"]),
    ("data.xml", "<a/>", {}, ["data.xml", "unsupported file type"]),
    ("emptydir", None, {}, ["emptydir", "holds no"]),
]


@pytest.mark.parametrize("name,content,spec,needles", DATA_FILES, ids=[c[0] for c in DATA_FILES])
def test_bad_data_files(work, name, content, spec, needles):
    path = work / "files" / name
    path.parent.mkdir(exist_ok=True)
    if name == "emptydir":
        path.mkdir(exist_ok=True)
        (path / "notes.md").write_text("not data")
    elif content is None:
        _sqlite(path)
    else:
        write(path, content)
    assert_one_error(cli("prepare", _row_config(work, path, **spec)), *needles)


# ---------------------------------------------------------------------------------------------- 6. outputs
def _fake_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_merge_out_never_replaces_what_it_did_not_write(work, monkeypatch):
    run = _fake_dir(work / "outs" / "run", {".tuneforge.json": '{"kind": "run"}', "run_info.json": '{"status": "finished"}',
                                             "final/adapter_config.json": "{}"})
    base = _fake_dir(work / "outs" / "base", {"config.json": "{}", "model.safetensors": "x"})
    mine = _fake_dir(work / "outs" / "mine", {"notes.txt": "keep me"})
    file = write(work / "outs" / "afile", "x")
    cases = [(base, "not empty and was not written by tuneforge"), (run, "holds a tuneforge run"),
             (run / "final", "not empty"), (mine, "not empty"), (file, "not a directory")]
    for out, needle in cases:
        assert_one_error(cli("merge", run, "--out", out), str(out), needle)
        assert_one_error(cli("merge", run, "--out", out, "--overwrite"), str(out))
    assert (mine / "notes.txt").read_text() == "keep me" and (base / "config.json").is_file()
    monkeypatch.chdir(work / "outs")
    assert_one_error(cli("merge", run, "--out", "."), "working directory")
    assert_one_error(cli("merge", run, "--out", ".."), "working directory")
    assert_one_error(cli("merge", run, "--out", ""), "working directory")  # '' is '.' to a Path option


def test_prepare_output_rules(work, monkeypatch):
    finished = _fake_dir(work / "outs" / "finished", {".tuneforge.json": '{"kind": "run"}', "run_info.json": '{"status": "finished"}'})
    mine = _fake_dir(work / "outs" / "user", {"thesis.tex": "keep"})
    merged = _fake_dir(work / "outs" / "merged", {".tuneforge.json": '{"kind": "merged"}', "model.safetensors": "x"})
    assert_one_error(cli("prepare", config_file(work), "--set", f"output.dir={finished}"), str(finished), "finished run")
    assert_one_error(cli("prepare", config_file(work), "--set", f"output.dir={mine}"), str(mine), "not written by tuneforge")
    assert_one_error(cli("prepare", config_file(work), "--set", f"output.dir={merged}"), str(merged), "holds a tuneforge merged")
    monkeypatch.chdir(work)
    assert_one_error(cli("prepare", config_file(work), "--set", "output.dir=."), "working directory")
    # a new folder works, twice (the second run reuses its own prepared folder), and it is marked as a run to be
    fresh = work / "outs" / "fresh"
    for _ in range(2):
        proc = cli("prepare", config_file(work), "--set", f"output.dir={fresh}")
        assert proc.returncode == 0, proc.stderr
    assert json.loads((fresh / ".tuneforge.json").read_text())["kind"] == "run"
    from tuneforge.outputs import check_output_dir

    check_output_dir(fresh, "run", False, "output.overwrite=true")  # train may still use a merely prepared folder


# ---------------------------------------------------------------------------------------------- 7. models
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("fuzz-model"), "llama")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_named_in_one_line(tmp_path, model_dir, damage):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"garbage" * 64, "empty": b""}[damage])
    assert_one_error(cli("generate", broken, "--prompt", "hi", "--max-new-tokens", "2"), str(weights), "safetensors")


def test_generation_length_is_bounded_by_the_model(model_dir):
    limit = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    assert_one_error(cli("generate", model_dir, "--prompt", "hi", "--max-new-tokens", str(limit + 1)), "--max-new-tokens", f"context of {limit}")
    proc = cli("chat", model_dir, "--max-new-tokens", str(limit + 1), stdin="hello\n/exit\n")
    assert proc.returncode == 0 and "context of" in proc.stdout  # the session says so and goes on


# ---------------------------------------------------------------------------------------------- 8. the boundary itself
def _library_exceptions():
    import typer._click.exceptions as tclick

    out = [("typer UsageError", tclick.UsageError("bad usage"), "bad usage"),
           ("typer NoSuchOption", tclick.NoSuchOption("--x"), "--x"),
           ("typer BadParameter", tclick.BadParameter("not a number", param_hint="'--n'"), "not a number"),
           ("typer MissingParameter", tclick.MissingParameter(param_hint="'--m'", param_type="option"), "--m"),
           ("typer FileError", tclick.FileError("f.txt", hint="gone"), "f.txt")]
    try:
        import click.exceptions as click_exc

        out += [("click UsageError", click_exc.UsageError("old usage"), "old usage"),
                ("click BadParameter", click_exc.BadParameter("old param"), "old param")]
    except ImportError:
        pass
    try:
        yaml.safe_load("a: [")
    except yaml.YAMLError as exc:
        out.append(("yaml ParserError", exc, "YAML"))
    try:
        yaml.safe_load("a: !!python/name:os.system")
    except yaml.YAMLError as exc:
        out.append(("yaml ConstructorError", exc, "YAML"))
    out.append(("UnicodeDecodeError", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "UTF-8"))
    from safetensors import SafetensorError

    out.append(("SafetensorError", SafetensorError("Error while deserializing header: header too large"), "safetensors"))
    out.append(("BadGzipFile", gzip.BadGzipFile("Not a gzipped file (b'ab')"), "gzip"))
    out.append(("EOFError gzip", EOFError("Compressed file ended before the end-of-stream marker was reached"), "gzip"))
    out.append(("PermissionError", PermissionError(13, "Permission denied", "/x/y"), "/x/y"))
    out.append(("ENOSPC", OSError(28, "No space left on device", "/big"), "free disk space"))
    out.append(("UserError markup", __import__("tuneforge.errors").errors.UserError("data.x: [bold]oops[/] [/x] (fix)"), "[bold]oops[/] [/x]"))
    out.append(("UserError multiline", __import__("tuneforge.errors").errors.UserError("first\nsecond"), "first second"))
    return out


@pytest.mark.parametrize("name,exc,needle", _library_exceptions(), ids=[c[0] for c in _library_exceptions()])
def test_boundary_turns_library_exceptions_into_one_line(name, exc, needle):
    import io

    from rich.console import Console

    from tuneforge.errors import run_cli as boundary

    def raising():
        raise exc

    buf = io.StringIO()
    code = boundary(raising, Console(file=buf, width=80))
    err = buf.getvalue()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0], (needle, lines[0])


def test_boundary_keeps_tracebacks_for_bugs():
    import io

    from rich.console import Console

    from tuneforge.errors import run_cli as boundary

    buf = io.StringIO()
    with pytest.raises(KeyError):
        boundary(lambda: {}["bug"], Console(file=buf))
    assert "internal error: this is a bug in tuneforge" in buf.getvalue()


# ---------------------------------------------------------------------------------------------- 9. real processes
SUBPROCESS_CASES = [
    (["bogus"], "No such command"),
    (["generate", "x", "--prompt", "hi", "--max-new-tokens", "abc"], "--max-new-tokens"),
    (["config", "validate", "x.yaml", "--set"], "--set"),
    (["data", "inspect", "x.yaml", "--limit", "-1"], "--limit"),
]


@pytest.mark.parametrize("args,needle", SUBPROCESS_CASES, ids=[" ".join(c[0]) for c in SUBPROCESS_CASES])
def test_real_process_usage_errors(args, needle):
    assert_one_error(run_cli(*args), needle)


def test_real_process_fifo_data_does_not_hang(work):
    fifo = work / "proc-pipe.jsonl"
    if not fifo.exists():
        os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "prepare", str(config_file(work, "p.yaml")), "--set",
                           f"data.train.0.path={fifo}"], capture_output=True, text=True, timeout=120)
    assert_one_error(proc, "pipe")


def test_help_of_every_command_imports_no_torch():
    paths = [p for p, _ in COMMANDS] + [["config"], ["data"], []]
    code = ("import sys\nfrom tuneforge.cli import app\n"
            f"for p in {paths!r}:\n"
            "    try:\n        app(args=[*p, '--help'], standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TORCH False" in out.stdout, out.stdout[-500:]


def test_fuzz_suite_size():
    total = (len(USAGE_CASES) + len(SCHEMA_CASES) + len(CONFLICTS) + len(OVERRIDES) + len(CONFIG_FILES) + len(BAD_ROWS)
             + len(DATA_FILES) + len(_library_exceptions()) + len(SUBPROCESS_CASES))
    assert total >= 300, total


def test_eval_size_larger_than_the_data_is_refused_not_shrunk(work):
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]} for i in range(5)]
    data = write(work / "five.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_file(work, data={"train": [{"path": str(data)}], "eval_size": 5})
    assert_one_error(cli("prepare", cfg, "--set", f"output.dir={work / 'evalsize'}"), "data.eval_size (5)", "5 samples")
    proc = cli("prepare", cfg, "--set", "data.eval_size=2", "--set", f"output.dir={work / 'evalsize'}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "evalsize" / "data_report.json").read_text())
    assert (report["train_samples"], report["eval_samples"]) == (3, 2)


@pytest.mark.slow
def test_train_refuses_what_only_the_data_reveals(tmp_path, model_dir):
    """Warmup longer than the epoch-based run, and eval_every with an eval split that rounds to no rows."""
    one = tiny.write_jsonl(tmp_path / "one.jsonl", tiny.reverse_rows(1))
    many = tiny.write_jsonl(tmp_path / "many.jsonl", tiny.reverse_rows(8))
    base = {"model": {"path": str(model_dir)}, "data": {"cache_dir": str(tmp_path / "cache")},
            "train": {"micro_batch_size": 1}, "output": {"dir": str(tmp_path / "run")}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**base, "data": {**base["data"], "train": [{"path": str(one)}], "eval_split": 0.1},
                                   "train": {**base["train"], "eval_every": 1}}))
    assert_one_error(cli("train", cfg), "train.eval_every", "eval split is empty")
    cfg.write_text(yaml.safe_dump({**base, "data": {**base["data"], "train": [{"path": str(many)}], "eval_split": 0},
                                   "train": {**base["train"], "warmup_steps": 50}}))
    assert_one_error(cli("train", cfg), "train.warmup_steps (50)", "8 steps")


@pytest.mark.slow
def test_train_reports_truncated_samples(tmp_path, model_dir):
    long = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "the cat sat on the mat " * 20}]}
            for i in range(8)]
    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", long)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model_dir)},
                                   "data": {"train": [{"path": str(rows)}], "eval_split": 0, "max_length": 32, "cache_dir": str(tmp_path / "cache")},
                                   "train": {"max_steps": 1, "micro_batch_size": 2}, "output": {"dir": str(tmp_path / "run")}}))
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    truncated = json.loads((tmp_path / "run" / "data_report.json").read_text())["truncated"]
    assert truncated > 0 and f"data: {truncated} samples longer than data.max_length (32) were truncated" in proc.stderr


# ---------------------------------------------------------------------------------------------- 10. every command, bad paths
def _path_cases():
    # (args with {w} for the work folder, needle): each command pointed at a missing / wrong / undecodable input
    return [
        (["report", "{w}/nonexist"], "{w}/nonexist"), (["report", "{w}/emptydir"], "{w}/emptydir"),
        (["eval", "{w}/nonexist"], "{w}/nonexist"), (["eval", "{w}/emptydir"], "{w}/emptydir"),
        (["export", "{w}/nonexist"], "{w}/nonexist"), (["export", "{w}/emptydir", "--format", "bogus"], "--format"),
        (["predict", "{w}/nonexist", "--data", "{w}/nonexist.jsonl"], "nonexist"),
        (["plan", "{w}/latin1.yaml"], "not UTF-8"), (["plan", "{w}/nonexist.yaml"], "{w}/nonexist.yaml"),
        (["launch", "{w}/nonexist.yaml", "--on", "bogus"], "--on"),
        (["runs", "{w}/nonexist"], "{w}/nonexist"), (["runs", "{w}/file.txt"], "{w}/file.txt"),
        (["config", "import", "{w}/nonexist", "--from", "axolotl"], "{w}/nonexist"),
        (["config", "import", "{w}/latin1.yaml", "--from", "axolotl"], "UTF-8"),
        (["merge", "{w}/nonexist"], "{w}/nonexist"), (["merge", "{w}/emptydir"], "{w}/emptydir"),
        (["generate", "{w}/emptydir", "--prompt", "x"], "{w}/emptydir"), (["chat", "{w}/nonexist"], "{w}/nonexist"),
        (["data", "inspect", "{w}/latin1.yaml"], "not UTF-8"), (["train", "{w}/latin1.yaml"], "not UTF-8"),
        (["prepare", "{w}/nonexist.yaml"], "config file not found"), (["config", "show", "{w}/dup.yaml"], "duplicate key"),
    ]


@pytest.mark.parametrize("args,needle", _path_cases(), ids=[" ".join(c[0]) for c in _path_cases()])
def test_every_command_with_a_bad_path(work, args, needle):
    (work / "emptydir").mkdir(exist_ok=True)
    write(work / "file.txt", "x")
    write(work / "latin1.yaml", "model: {path: caf\u00e9}\n".encode("latin-1"))
    write(work / "dup.yaml", "model: {path: a}\nmodel: {path: b}\n")
    fill = lambda s: s.replace("{w}", str(work))  # noqa: E731
    assert_one_error(cli(*map(fill, args)), fill(needle))


def test_env_vars_are_not_expanded_outside_the_cli(monkeypatch):
    """A config that reaches the schema any other way (the job API) cannot read the environment through a path."""
    from pydantic import ValidationError

    from tuneforge.config import Config

    monkeypatch.setenv("TUNEFORGE_FUZZ_SECRET", "s3cret")
    for key, raw in [("model.path", {"model": {"path": "${TUNEFORGE_FUZZ_SECRET}"}, "data": {"train": [{"path": "t.jsonl"}]}}),
                     ("data.train.0.path", {"model": {"path": "org/m"}, "data": {"train": [{"path": "$HOME/.ssh/id_rsa"}]}}),
                     ("output.dir", {"model": {"path": "org/m"}, "data": {"train": [{"path": "t.jsonl"}]}, "output": {"dir": "${TUNEFORGE_FUZZ_SECRET}"}})]:
        with pytest.raises(ValidationError, match="expanded only in config files") as info:
            Config.model_validate(raw)
        assert "s3cret" not in str(info.value) and ".".join(map(str, info.value.errors()[0]["loc"])) == key


def test_inspect_says_when_a_split_is_empty(work):
    cfg = config_file(work, data={"eval_split": 0})
    assert_one_error(cli("data", "inspect", cfg, "--split", "eval"), "--split eval", "no eval samples")
    assert_one_error(cli("data", "inspect", cfg, "--split", "test"), "--split 'test'")
    proc = cli("data", "inspect", cfg, "--json", "--limit", "1")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)) == 1, proc.stderr
