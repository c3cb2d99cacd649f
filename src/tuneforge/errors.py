"""User-facing errors and the CLI's one error boundary.

A user error is one line `error: <place>: <what> (<fix>)`, exit code 2, no traceback. An internal bug
keeps its traceback, under a one-line header saying it is a bug in tuneforge.
"""

from __future__ import annotations

import errno
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, data row, file, request). Message names place and fix."""

    exit_code = 2


class ParityError(Exception):
    """An exported artifact differs from the trained model beyond tolerance (exit 3)."""

    exit_code = 3


def _cli_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts, exits) of the command-line library, whichever click typer uses.

    typer >= 0.29 vendors click as `typer._click` and raises its own classes; older typer raises
    click's. Catch both so an upgrade cannot turn a CLI typo back into a traceback (tested).
    """
    import importlib

    usage, aborts, exits = [], [], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        for attr, bucket in (("Abort", aborts), ("Exit", exits)):
            if hasattr(mod, attr):
                bucket.append(getattr(mod, attr))
    import typer

    aborts.append(typer.Abort)
    exits.append(typer.Exit)
    return tuple(usage), tuple(aborts), tuple(exits)


# OS errors a user causes (full disk, no permission, missing file, read-only fs) and what to do about them.
_OS_FIXES = {
    errno.ENOSPC: "free disk space or point the output elsewhere",
    errno.EACCES: "check the folder's permissions",
    errno.EPERM: "check the folder's permissions",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
}


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an exception a user caused, or None for an internal bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
        where = exc.filename or "output"
        return f"{where}: {exc.strerror or exc} ({_OS_FIXES[exc.errno]})"
    text = str(exc)
    # torch reports a full disk while writing a checkpoint as an opaque RuntimeError from its zip writer.
    if isinstance(exc, RuntimeError) and ("No space left on device" in text or "file write failed" in text):
        return f"writing failed: no space left on device ({_OS_FIXES[errno.ENOSPC]})"
    if isinstance(exc, MemoryError):
        return "out of memory: lower train.micro_batch_size or data.max_length, or enable train.gradient_checkpointing"
    return _library_message(exc)


def _library_message(exc: BaseException) -> str | None:
    """Library exceptions that always mean a bad input file. The call sites wrap them with the file's
    name; this is the net under them, so a path we missed still gets one line, not a traceback."""
    name, module = type(exc).__name__, type(exc).__module__
    first = (str(exc).splitlines() or [""])[0][:200]
    if name == "SafetensorError":
        return f"a .safetensors file is truncated or not a safetensors file ({first}) (re-save or re-download the weights)"
    if module.startswith("yaml") and _is_yaml_error(exc):
        return f"a YAML file does not parse ({first}) (fix its syntax)"
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}) (re-save it as UTF-8)"
    if name in ("BadGzipFile",) or (isinstance(exc, EOFError) and "compressed file" in first.lower()):
        return f"a .gz file is not valid gzip ({first}) (re-compress it, or drop the .gz suffix)"
    return None


def _is_yaml_error(exc: BaseException) -> bool:
    import sys

    yaml = sys.modules.get("yaml")
    return yaml is not None and isinstance(exc, yaml.YAMLError)


def usage_message(exc: BaseException) -> str:
    """A command-line usage error (unknown command/option, missing or unparsable value) as one line."""
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "tuneforge"
    text = " ".join(exc.format_message().split()) if hasattr(exc, "format_message") else str(exc)
    return f"{where}: {text} (see '{where} --help')"


def run_cli(invoke: Callable[[], object], console) -> int:
    """Run the typer app (standalone_mode=False) and turn every outcome into an exit code."""
    usage, aborts, exits = _cli_exception_types()
    try:
        rv = invoke()
    except ParityError as exc:
        from rich.markup import escape

        console.print(f"[red]parity check failed:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except usage as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `tuneforge` alone: help was printed, not an error
            return 0
        _print_error(console, usage_message(exc))
        return 2
    except exits as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except (*aborts, KeyboardInterrupt):
        console.print("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Exception as exc:  # noqa: BLE001 - the boundary: decide user error vs bug here, once
        message = user_message(exc)
        if message is None:
            console.print("[red]internal error: this is a bug in tuneforge[/] (please report it with the traceback below)",
                          highlight=False)
            raise
        _print_error(console, message)
        return 2
    return rv if isinstance(rv, int) else 0



def _print_error(console, message: str) -> None:
    """`error: <message>` on one line; the message is escaped (a user's '[x]' is text, not rich markup)."""
    from rich.markup import escape

    console.print(f"[red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def decode_utf8(raw: bytes, where) -> str:
    """UTF-8 text, or a one-line UserError naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{where}: not UTF-8 text (line {line}, byte {exc.start}: {exc.reason}) (re-save the file as UTF-8)") from None
