"""User-facing errors: one line, exit code 2, no traceback (the CLI catches them)."""


class UserError(Exception):
    """Bad input from the user (config, data row, file, request). Message names place and fix."""

    exit_code = 2


class ParityError(Exception):
    """An exported artifact differs from the trained model beyond tolerance (exit 3)."""

    exit_code = 3
