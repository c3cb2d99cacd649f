"""The job server as a real process: SIGKILLed mid-load and restarted, it loses and duplicates nothing.
(The 50-job / 5-user / 2-kill version with 200 malformed requests over HTTP: bench/serve_load.py.)"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from serve_helpers import Server, make_workspace, running_now, seed_request, token, wait_for  # noqa: E402


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
            req = seed_request(f"job{i}", user=u, max_steps=3, save_steps=1, val_set_size=0, loss_watchdog_threshold=100)
            if i == 2:  # the last in the queue carries a credential that a restart loses
                req["input"]["credentials"]["hf_token"] = "hf-PLANTED-crash"
            r = httpx.post(server.url + "/v1/jobs", json=req, headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=60)
            assert r.status_code == 201, r.text
            return u, r.json()["id"]

        with ThreadPoolExecutor(3) as pool:
            submitted = list(pool.map(submit, range(3)))

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
        # the credentials of job 2 lived only in the killed server's memory: unless it had finished, it asks again
        js = wait_for(lambda: (lambda s: s if s[submitted[2][1]]["status"] in ("needs_credentials", "finished") else None)(jobs()),
                      timeout=300)
        if js[submitted[2][1]]["status"] == "needs_credentials":
            u, jid = submitted[2]
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
