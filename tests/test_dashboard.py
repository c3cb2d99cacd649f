"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright against `tuneforge serve`.

A person pastes a token, submits the tiny demo job, watches its loss curve grow to the end, and cancels a
second, long job. Screenshots go to the test's tmp dir (or docs/images/ with TUNEFORGE_SCREENSHOTS=1).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_helpers import make_workspace

pytest.importorskip("fastapi", reason="the serve extra is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="the browser extra is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
# Flags for a sandboxed root container with no network (see the machine notes): no background fetches.
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_config(steps: int, run: str) -> str:
    return json.dumps({"run_id": run, "config": {
        "model": {"path": "tiny"},
        "data": {"train": [{"path": "alpaca.jsonl"}], "eval_split": 0.1, "max_length": 64},
        "train": {"finetune": "full", "max_steps": steps, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1,
                  "eval_every": 2 if steps < 100 else None, "save_every": 5 if steps < 100 else 100},  # serve --max-checkpoints
        "tracking": {"tensorboard": False, "plot": False},
    }})


@pytest.fixture
def server(tmp_path, llama_dir):
    data = tmp_path / "data"
    make_workspace(data, "alice", llama_dir)
    cli = [sys.executable, "-m", "tuneforge", "serve"]
    made = subprocess.run([*cli, "token", "create", "--user", "alice", "--data-dir", str(data)],
                          capture_output=True, text=True, check=True)
    token = made.stdout.strip().splitlines()[-1].split()[-1]
    port = _free_port()
    proc = subprocess.Popen([*cli, "--port", str(port), "--data-dir", str(data)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.5)
    yield url, token
    proc.terminate()
    proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_submit_watch_curve_finish_and_cancel_in_chromium(server, tmp_path):
    url, token = server
    shots = ROOT / "docs" / "images" if os.environ.get("TUNEFORGE_SCREENSHOTS") else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        blocked = []  # the page's Content-Security-Policy must allow everything the page itself does
        page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
        page.goto(url + "/")
        assert "tuneforge" in page.title()
        page.fill("#token", token)
        page.click("#save-token")

        page.fill("#request", _job_config(12, "demo"))
        page.click("#submit")
        page.wait_for_selector("#submit-result:has-text('submitted')", timeout=30_000)
        # The curve grows while the job runs, and holds every logged step at the end.
        page.wait_for_function("() => +document.getElementById('chart').dataset.points >= 1", timeout=240_000)
        page.wait_for_selector("tr.job[data-status='finished']", timeout=300_000)
        page.wait_for_function("() => +document.getElementById('chart').dataset.points === 12", timeout=30_000)
        assert int(page.get_attribute("#chart", "data-eval-points")) >= 1
        points = page.get_attribute("#chart polyline.train-loss", "points").split()
        assert len(points) == 12
        assert "step 12 of 12" in page.inner_text("#d-progress")
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

        page.fill("#request", _job_config(5000, "long"))
        page.click("#submit")
        page.wait_for_selector("tr.job[data-status='running'] button.cancel", timeout=240_000)
        page.click("tr.job[data-status='running'] button.cancel")
        page.wait_for_selector("tr.job[data-status='cancelled']", timeout=240_000)
        page.screenshot(path=str(shots / "dashboard-cancelled.png"), full_page=True)
        browser.close()
    assert not blocked, blocked
    assert (shots / "dashboard.png").stat().st_size > 10_000
