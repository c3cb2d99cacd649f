"""The job server as a real process: SIGKILLed mid-load and restarted, it loses and duplicates nothing.
(The 50-job / 5-user / 2-kill version with 200 malformed requests over HTTP: bench/serve_load.py.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from serve_helpers import make_workspace, seed_request, wait_for  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data, concurrency=2):
        self.data, self.concurrency, self.port, self.proc = data, concurrency, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        log = open(self.data.parent / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--data-dir", str(self.data), "--port",
                                      str(self.port), "--concurrency", str(self.concurrency)], stdout=log, stderr=log)
        wait_for(lambda: self._up(), timeout=120)
        return self

    def _up(self):
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def running_now(data) -> int:
    """Jobs running right now, in one consistent read of the job store."""
    import sqlite3

    with sqlite3.connect(f"file:{data / 'jobs.db'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("select count(*) from jobs where status = 'running'").fetchone()[0]


def token(data, user):
    out = subprocess.run([sys.executable, "-m", "tuneforge", "serve", "token", "create", "--user", user, "--data-dir", str(data)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.slow
def test_sigkill_mid_load_loses_nothing_and_resumes(tmp_path, llama_dir):
    data = tmp_path / "data"
    users = ["ana", "ben", "cy"]
    tokens = {u: token(data, u) for u in users}
    for u in users:
        make_workspace(data, u, llama_dir)
    server = Server(data, concurrency=2).start()
    try:
        def submit(i):
            u = users[i % len(users)]
            req = seed_request(f"job{i}", user=u, max_steps=4, save_steps=1, val_set_size=0)
            if i == 5:  # the last in the queue carries a credential that a restart loses
                req["input"]["credentials"]["hf_token"] = "hf-PLANTED-crash"
            r = httpx.post(server.url + "/v1/jobs", json=req, headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=60)
            assert r.status_code == 201, r.text
            return u, r.json()["id"]

        with ThreadPoolExecutor(6) as pool:
            submitted = list(pool.map(submit, range(6)))

        def jobs():
            out = {}
            for u in users:
                r = httpx.get(server.url + "/v1/jobs", headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=30)
                out.update({j["id"]: j for j in r.json()["jobs"]})
            return out

        # kill -9 while a job has a checkpoint and is still running
        def mid_job():
            js = jobs()
            assert running_now(data) <= 2  # the concurrency limit
            return any(j["status"] == "running" and list((data / "users" / j["user"] / "runs" / j["run_id"]).rglob("checkpoints/*"))
                       for j in js.values())

        wait_for(mid_job, timeout=300, every=0.2)
        server.kill9()
        server.start()
        js = wait_for(lambda: (lambda s: s if s[submitted[5][1]]["status"] == "needs_credentials" or
                               s[submitted[5][1]]["status"] in ("finished", "running") else None)(jobs()), timeout=60)
        if js[submitted[5][1]]["status"] == "needs_credentials":
            u, jid = submitted[5]
            r = httpx.post(f"{server.url}/v1/jobs/{jid}/credentials", json={"credentials": {"hf_token": "hf-PLANTED-crash"}},
                           headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "queued", r.text

        def all_ended():
            s = jobs()
            assert running_now(data) <= 2
            return s if all(j["status"] in ("finished", "failed", "cancelled") for j in s.values()) else None

        final = wait_for(all_ended, timeout=600, every=0.5)
        assert set(final) == {jid for _, jid in submitted}  # none lost, none duplicated
        assert all(j["status"] == "finished" for j in final.values()), {k: (j["status"], j["reason"]) for k, j in final.items()}
        resumed = [j for j in final.values() if j["attempts"] >= 2]
        assert resumed, "the job running at the kill should have run a second time"
        assert any(j["resume"] for j in resumed), "it should have resumed from its checkpoint"
        for j in resumed:
            info = json.loads(next((data / "users" / j["user"] / "runs" / j["run_id"]).rglob("run_info.json")).read_text())
            assert info["status"] == "finished"
        leaked = [p for p in data.rglob("*") if p.is_file() and b"hf-PLANTED-crash" in p.read_bytes()]
        assert not leaked
    finally:
        server.stop()
