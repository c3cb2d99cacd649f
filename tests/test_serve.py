"""The job API in-process (FastAPI TestClient + the real worker running `tuneforge train` children)."""

import json
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from serve_helpers import make_workspace, malformed_requests, seed_request, wait_for  # noqa: E402
from tuneforge.serve.api import create_app  # noqa: E402
from tuneforge.serve.auth import create_token  # noqa: E402

SECRET = "hf_PLANTED_SECRET_7f3a9"


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_dir):
    data = tmp_path_factory.mktemp("serve") / "data"
    app = create_app(data, concurrency=1, max_body=64 * 1024, tick_s=0.2)
    store = app.state.store
    tokens = {u: create_token(store, u) for u in ("user", "bob")}
    for u in tokens:
        make_workspace(data, u, llama_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, tokens, data, app


def h(tokens, user="user"):
    return {"Authorization": f"Bearer {tokens[user]}"}


def job(client, tokens, job_id, user="user"):
    r = client.get(f"/v1/jobs/{job_id}", headers=h(tokens, user))
    assert r.status_code == 200, r.text
    return r.json()


def ended(client, tokens, job_id):
    j = job(client, tokens, job_id)
    return j if j["status"] in ("finished", "failed", "cancelled") else None


@pytest.mark.slow
def test_seed_request_trains_an_adapter_and_secret_stays_in_env(server):
    client, tokens, data, app = server
    req = seed_request("seed-run")
    req["input"]["credentials"]["hf_token"] = SECRET
    r = client.post("/v1/jobs", json=req, headers=h(tokens))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "queued" and body["run_id"] == "seed-run"
    assert {row["key"] for row in body["not_mapped"]} <= set(req["input"]["args"])  # reported, never dropped
    job_id = body["id"]
    # the credential reaches the child's environment (and only there)
    running = wait_for(lambda: job(client, tokens, job_id)["status"] != "queued" and app.state.worker.procs.get(job_id))
    environ = Path(f"/proc/{running[0].pid}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={SECRET}".encode() in environ
    final = wait_for(lambda: ended(client, tokens, job_id))
    assert final["status"] == "finished", final
    assert final["progress"]["total_steps"] == 2 and final["metrics"]["step"] == 2
    names = {a["path"] for a in final["artifacts"]}
    assert "final/adapter_model.safetensors" in names and "final/adapter_config.json" in names
    dl = client.get(f"/v1/jobs/{job_id}/artifacts/final/adapter_config.json", headers=h(tokens))
    assert dl.status_code == 200 and json.loads(dl.content)["r"] == 16
    logs = client.get(f"/v1/jobs/{job_id}/logs", headers=h(tokens))
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/event-stream")
    assert "data: " in logs.text and "event: end\ndata: finished" in logs.text
    # the planted secret is nowhere on disk: database, job log, config, run directory
    for path in data.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path
    rows = sqlite3.connect(data / "jobs.db").execute("select * from jobs").fetchall()
    assert SECRET not in repr(rows)


def test_auth_required_and_tokens_stored_hashed(server):
    client, tokens, data, _ = server
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v1/jobs", json=seed_request()).status_code == 401
    r = client.get("/v1/jobs", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    db = (data / "jobs.db").read_bytes() + (data / "jobs.db-wal").read_bytes() if (data / "jobs.db-wal").exists() else (data / "jobs.db").read_bytes()
    assert tokens["user"].encode() not in db


def test_users_see_and_cancel_only_their_own_jobs(server):
    client, tokens, _, _ = server
    r = client.post("/v1/jobs", json=seed_request("bob-private", user="bob"), headers=h(tokens, "bob"))
    assert r.status_code == 201, r.text
    bob_job = r.json()["id"]
    assert client.get(f"/v1/jobs/{bob_job}", headers=h(tokens)).status_code == 404
    assert client.post(f"/v1/jobs/{bob_job}/cancel", headers=h(tokens)).status_code == 404
    assert client.get(f"/v1/jobs/{bob_job}/logs", headers=h(tokens)).status_code == 404
    assert bob_job not in {j["id"] for j in client.get("/v1/jobs", headers=h(tokens)).json()["jobs"]}
    # user_id in the request must be the token's user
    r = client.post("/v1/jobs", json=seed_request("spoof", user="bob"), headers=h(tokens))
    assert r.status_code == 403
    # cancelling a queued job is immediate; cancelling again is a conflict
    c = client.post(f"/v1/jobs/{bob_job}/cancel", headers=h(tokens, "bob"))
    assert c.status_code == 200 and c.json()["status"] in ("cancelled", "running")


@pytest.mark.parametrize("mutate,loc", [
    (lambda r: r["input"].update(run_id="../escape"), "run_id"),
    (lambda r: r["input"]["args"].update(output_dir="/etc/evil"), "output.dir"),
    (lambda r: r["input"]["args"].update(output_dir="../../bob/runs"), "output.dir"),
    (lambda r: r["input"]["args"].update(base_model="../bob/tiny"), "model.path"),
    (lambda r: r["input"]["args"]["datasets"][0].update(path="/etc/passwd"), "data.train.0.path"),
    (lambda r: r["input"]["args"].update(dataset_prepared_path="/tmp/cache"), "data.cache_dir"),
    (lambda r: r["input"]["args"].update(base_model="link-out"), "model.path"),
])
def test_paths_cannot_escape_the_data_dir(server, mutate, loc):
    client, tokens, data, _ = server
    link = data / "users" / "user" / "link-out"
    if not link.exists():
        link.symlink_to("/etc")
    req = seed_request("escape-try")
    mutate(req)
    r = client.post("/v1/jobs", json=req, headers=h(tokens))
    assert r.status_code == 400, r.text
    assert r.json()["detail"][0]["loc"] == loc


def test_validation_errors_are_422_with_the_field_path(server):
    client, tokens, _, _ = server
    cases = [
        ({"input": {"run_id": "x"}}, "input.args"),
        ({"input": {"args": {}, "credentials": {"hf_tokn": "x"}}}, "input.credentials.hf_tokn"),
        (seed_request("bad-lora", lora_r="sixteen"), "input.args.lora_r"),
        ({"config": {"model": {"path": "tiny"}, "data": {"train": [{"path": "alpaca.jsonl"}]}, "train": {"lr": -1}},
          "run_id": "native-bad"}, "config.train.lr"),
        ({"config": {"model": {"path": "tiny"}}, "run_id": "native-missing"}, "config.data"),
        ({"something": 1}, "body"),
    ]
    for body, loc in cases:
        r = client.post("/v1/jobs", json=body, headers=h(tokens))
        assert r.status_code == 422, (body, r.text)
        assert loc in [d["loc"] for d in r.json()["detail"]], (loc, r.text)


def test_native_config_and_conflicting_run_id(server):
    client, tokens, _, _ = server
    cfg = {"model": {"path": "tiny"}, "data": {"train": [{"path": "alpaca.jsonl"}], "max_length": 64},
           "train": {"max_steps": 1, "micro_batch_size": 2}}
    r = client.post("/v1/jobs", json={"config": cfg, "run_id": "native-1"}, headers=h(tokens))
    assert r.status_code == 201, r.text
    assert client.post("/v1/jobs", json={"config": cfg, "run_id": "native-1"}, headers=h(tokens)).status_code == 409
    assert client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=h(tokens)).status_code == 200  # keep CI short


@pytest.mark.slow
def test_cancel_running_job_checkpoints_then_stops(server):
    client, tokens, data, app = server
    r = client.post("/v1/jobs", json=seed_request("to-cancel", max_steps=500, val_set_size=0, loss_watchdog_threshold=100),
                    headers=h(tokens))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: (job(client, tokens, job_id)["metrics"].get("step") or 0) >= 1)
    pid = app.state.worker.procs[job_id][0].pid
    c = client.post(f"/v1/jobs/{job_id}/cancel", headers=h(tokens))
    assert c.status_code == 200
    final = wait_for(lambda: ended(client, tokens, job_id))
    assert final["status"] == "cancelled" and "checkpoint at step" in final["reason"], final
    assert final["exit_code"] == 130  # the run stopped itself after its checkpoint (SIGTERM, not SIGKILL)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    run_dir = data / "users" / "user" / "runs" / "to-cancel"
    info = json.loads(next(run_dir.rglob("run_info.json")).read_text())
    assert info["status"] == "interrupted" and list(run_dir.rglob("checkpoints/*"))
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h(tokens)).status_code == 409


def test_oversized_bad_json_and_no_tracebacks(server):
    client, tokens, _, _ = server
    big = client.post("/v1/jobs", content=b'{"config": "' + b"x" * 70_000 + b'"}', headers=h(tokens))
    assert big.status_code == 413
    for raw in (b"{", b"null", b"[]", b'{"input": 5}', b"\xff\xfe", b'{"input": {"args": []}}', b"[" * 5000):
        r = client.post("/v1/jobs", content=raw, headers={**h(tokens), "content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:20], r.status_code, r.text)
        assert "Traceback" not in r.text
    assert client.get("/v1/jobs/" + "a" * 500, headers=h(tokens)).status_code == 404
    assert client.get("/v1/jobs/zzz/artifacts/../../jobs.db", headers=h(tokens)).status_code in (400, 404)


def test_200_malformed_requests_are_4xx_never_500(server):
    client, tokens, _, _ = server
    before = {j["id"] for j in client.get("/v1/jobs", headers=h(tokens)).json()["jobs"]}
    results = []
    for label, raw in malformed_requests(200):
        r = client.post("/v1/jobs", content=raw, headers={**h(tokens), "content-type": "application/json"})
        results.append((label, r.status_code, r.text))
    wrong = [(label, code, text[:200]) for label, code, text in results if not 400 <= code < 500]
    assert not wrong, wrong
    assert not [t for _, _, t in results if "Traceback" in t or 'File "' in t]
    assert {code for label, code, _ in results if label == "oversized body"} == {413}
    assert {code for label, code, _ in results if label in ("path traversal", "absolute path")} == {400}
    assert {code for label, code, _ in results if label.startswith("unknown key")} == {422}
    assert {j["id"] for j in client.get("/v1/jobs", headers=h(tokens)).json()["jobs"]} == before  # none was queued


def test_gpu_slots_are_disjoint_groups(monkeypatch):
    from tuneforge.serve.worker import gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert gpu_slots(4) == ["0", "1", "2", "3"]
    assert gpu_slots(2, gpus_per_job=2) == ["0,1", "2,3"]  # each job: --nproc 2 on its own pair
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert gpu_slots(1) == [None]
