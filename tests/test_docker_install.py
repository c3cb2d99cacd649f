"""The Docker images' install steps, run in a fresh virtualenv (no Docker engine runs on this machine).

docker/install.sh is what both Dockerfiles RUN; here it installs tuneforge from this checkout into a new
venv, and the installed `tuneforge serve` (the images' CMD) answers on loopback.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cmd_of(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text()
    return json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))


def test_compose_and_dockerfiles_agree():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cpu, gpu = compose["services"]["tuneforge"], compose["services"]["tuneforge-gpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu" and gpu["build"]["dockerfile"] == "docker/Dockerfile"
    assert cpu["volumes"] == ["tuneforge-data:/data"] and "tuneforge-data" in compose["volumes"]
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "docker" / name).read_text()
        assert "sh docker/install.sh" in text and 'ENTRYPOINT ["tuneforge"]' in text
        cmd = _cmd_of(ROOT / "docker" / name)
        assert cmd[0] == "serve" and "/data/jobs" in cmd  # the data dir lives in the compose volume
    assert "cu128" in (ROOT / "docker" / "Dockerfile").read_text()
    assert "whl/cpu" in (ROOT / "docker" / "Dockerfile.cpu").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_image_install_steps_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP": f"{venv}/bin/pip -q", "TARGET": str(ROOT), "EXTRAS": "serve"}
    env.pop("TORCH_INDEX", None)  # this machine's pip finds the CPU torch wheel on disk
    subprocess.run(["sh", "docker/install.sh"], cwd=ROOT, env=env, check=True, timeout=1800)

    py = f"{venv}/bin/python"
    torch_version = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True, check=True).stdout.strip()
    assert torch_version.startswith("2.13.0")
    freeze = subprocess.run([f"{venv}/bin/pip", "freeze"], capture_output=True, text=True, check=True).stdout
    assert "nvidia-" not in freeze  # the CPU image carries no CUDA wheels
    assert re.search(r"^tuneforge @ ", freeze, re.M) or "tuneforge==" in freeze

    port = _free_port()
    cmd = _cmd_of(ROOT / "docker" / "Dockerfile.cpu")
    cmd = [c.replace("/data/jobs", str(tmp_path / "jobs")).replace("0.0.0.0", "127.0.0.1").replace("8000", str(port)) for c in cmd]
    server = subprocess.Popen([f"{venv}/bin/tuneforge", *cmd], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read())
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(1)
        assert body is not None, f"server did not answer: {shlex.join(cmd)}"
        assert (tmp_path / "jobs").is_dir()
    finally:
        server.terminate()
        server.wait(timeout=30)
