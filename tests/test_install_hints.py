"""Every `pip install 'tuneforge[X]'` hint the code or docs give names an extra pyproject.toml declares (issue 21: the
llama.cpp hint named the wrong one; the extra is `llamacpp`)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_hints_name_declared_extras():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    files = [*(ROOT / "src" / "tuneforge").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    named = {(f.relative_to(ROOT).as_posix(), x) for f in files for group in re.findall(r"tuneforge\[([\w,-]+)\]", f.read_text())
             for x in group.split(",")}
    assert {x for _, x in named} >= {"llamacpp", "gptq", "eval"}  # the hints this test is about are found
    assert [(f, x) for f, x in sorted(named) if x not in extras] == []
