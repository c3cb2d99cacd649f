"""CLI commands of the later stages, one module per stage (each module registers on `tuneforge.cli.app`).

Add a module here with one import line; keep imports inside command bodies lazy (`tuneforge --help`
must not import torch).
"""
from tuneforge.commands import serve  # noqa: F401,E402
from tuneforge.commands import runs  # noqa: F401,E402
from tuneforge.commands import export  # noqa: F401,E402
