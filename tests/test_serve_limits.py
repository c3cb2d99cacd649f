"""Limits, tokens and hardening of a shared job server (issue 20), through a real `tuneforge serve` on 127.0.0.1.

The server runs with `--concurrency 0` (queue only): every attempt here is decided at submit or by the API, so
no training child runs. Each test asserts the refusal (status and field) and that nothing was stored.
"""

import base64
import hashlib
import json
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from helpers import run_cli_inprocess  # noqa: E402
from serve_helpers import Server, seed_request  # noqa: E402
from tuneforge.serve.auth import create_token  # noqa: E402
from tuneforge.serve.store import Store  # noqa: E402

QUOTA, PAGE, MAX_CKPT, MAX_PROC = 5, 3, 50, 2
USERS = ("flood", "dave", "erin", "carol", "frank")
HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    data = tmp_path_factory.mktemp("limits") / "data"
    store = Store(data)
    tokens = {u: create_token(store, u) for u in USERS}
    for u in USERS:
        (data / "users" / u).mkdir(parents=True)
        (data / "users" / u / "rows.jsonl").write_text('{"text": "a b c"}\n' * 2000)
    args = ["--max-jobs-per-user", QUOTA, "--page-size", PAGE, "--max-checkpoints", MAX_CKPT, "--max-num-proc", MAX_PROC]
    server = Server(data, concurrency=0, args=map(str, args)).start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, tokens, store.data_dir
    server.stop()


def h(tokens, user):
    return {"Authorization": f"Bearer {tokens[user]}"}


def native(run_id, **sections):
    cfg = {"model": {"path": "tiny"}, "data": {"train": [{"path": "rows.jsonl"}]}, "train": {"max_steps": 10}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return {"config": cfg, "run_id": run_id}


def stored(data, user):
    with sqlite3.connect(f"file:{data / 'jobs.db'}?mode=ro", uri=True, timeout=30) as db:
        return [r[0] for r in db.execute("select run_id from jobs where user = ? order by seq", (user,))]


def refused(r, status, loc, *words):
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert len(detail) == 1 and detail[0]["loc"] == loc, detail
    assert "\n" not in detail[0]["msg"] and all(w in detail[0]["msg"] for w in words), detail
    return detail[0]["msg"]


# ---- class 7: limits ---------------------------------------------------------------------------------
def test_a_1000_job_flood_gets_429_from_the_quota_on_and_stores_exactly_quota_jobs(srv):
    client, tokens, data = srv
    first = [client.post("/v1/jobs", json=native(f"f{i}"), headers=h(tokens, "flood")) for i in range(QUOTA + 1)]
    assert [r.status_code for r in first] == [201] * QUOTA + [429]  # the 429 starts exactly at the quota
    msg = refused(first[-1], 429, "jobs", str(QUOTA), "unfinished")
    assert first[-1].headers["retry-after"] == "60"

    def post(i):
        return client.post("/v1/jobs", json=native(f"f{i}"), headers=h(tokens, "flood")).status_code

    with ThreadPoolExecutor(8) as pool:  # the rest of the 1,000 arrive at once
        codes = list(pool.map(post, range(QUOTA + 1, 1000)))
    assert set(codes) == {429}, {c: codes.count(c) for c in set(codes)}
    assert stored(data, "flood") == [f"f{i}" for i in range(QUOTA)]  # exactly the quota, the first ones
    assert not (data / "users" / "flood" / "runs").exists() or len(list((data / "users" / "flood" / "runs").iterdir())) <= QUOTA
    assert "Traceback" not in msg
    # per user: another user still gets in; an ended job frees its place for exactly one more
    assert client.post("/v1/jobs", json=native("d0"), headers=h(tokens, "dave")).status_code == 201
    jobs = client.get("/v1/jobs", params={"limit": 10}, headers=h(tokens, "flood")).json()["jobs"]
    assert client.post(f"/v1/jobs/{jobs[0]['id']}/cancel", headers=h(tokens, "flood")).json()["status"] == "cancelled"
    assert client.post("/v1/jobs", json=native("again"), headers=h(tokens, "flood")).status_code == 201
    refused(client.post("/v1/jobs", json=native("again2"), headers=h(tokens, "flood")), 429, "jobs")
    assert len(stored(data, "flood")) == QUOTA + 1


def test_job_list_comes_in_pages_with_a_cursor(srv):
    client, tokens, data = srv
    ids = [client.post("/v1/jobs", json=native(f"p{i}"), headers=h(tokens, "erin")).json()["id"] for i in range(QUOTA)]
    first = client.get("/v1/jobs", headers=h(tokens, "erin")).json()
    assert [j["id"] for j in first["jobs"]] == ids[:PAGE] and first["next_cursor"] is not None  # --page-size 3
    second = client.get("/v1/jobs", params={"cursor": first["next_cursor"]}, headers=h(tokens, "erin")).json()
    assert [j["id"] for j in second["jobs"]] == ids[PAGE:] and second["next_cursor"] is None
    newest = client.get("/v1/jobs", params={"limit": 2, "newest_first": True}, headers=h(tokens, "erin")).json()
    assert [j["id"] for j in newest["jobs"]] == ids[::-1][:2]
    for params, loc in [({"limit": 201}, "query.limit"), ({"limit": 0}, "query.limit"), ({"cursor": "x"}, "query.cursor"),
                        ({"cursor": -1}, "query.cursor")]:
        refused(client.get("/v1/jobs", params=params, headers=h(tokens, "erin")), 422, loc)
    assert len(client.get("/v1/jobs", params={"limit": 200}, headers=h(tokens, "erin")).json()["jobs"]) == QUOTA


@pytest.mark.parametrize("body,loc,words", [
    (native("c1", train={"max_steps": 10**9, "save_every": 1}), "save_every", ["max_steps", "save_every", str(MAX_CKPT)]),
    (seed_request("c2", user="carol", max_steps=10**9, save_steps=1), "save_every", ["max_steps", str(MAX_CKPT)]),
    (native("c3", train={"max_steps": None, "save_every": 1, "micro_batch_size": 4}), "save_every", ["2000 rows", "500"]),
    (native("c4", data={"train": [{"path": "someorg/somedata"}]}, train={"max_steps": None, "save_every": 5}), "save_every",
     ["set train.max_steps"]),
    (native("c5", train={"max_steps": None, "epochs": 3, "saves_per_epoch": 20}), "saves_per_epoch", ["3 epochs", "60"]),
])
def test_checkpoints_a_job_may_write_are_bounded(srv, body, loc, words):
    client, tokens, data = srv
    before = stored(data, "carol")
    refused(client.post("/v1/jobs", json=body, headers=h(tokens, "carol")), 422, f"config.train.{loc}", *words)
    assert stored(data, "carol") == before


@pytest.mark.parametrize("body", [
    native("n1", data={"num_proc": 1024}),
    seed_request("n2", user="carol", dataset_processes=64),
])
def test_num_proc_is_capped_at_the_servers_cores(srv, body):
    client, tokens, data = srv
    before = stored(data, "carol")
    refused(client.post("/v1/jobs", json=body, headers=h(tokens, "carol")), 422, "config.data.num_proc", f"at most {MAX_PROC}")
    assert stored(data, "carol") == before


def test_values_at_the_limits_are_accepted(srv):
    client, tokens, data = srv
    ok = [native("at-ckpt", train={"max_steps": 100, "save_every": 2}), native("at-proc", data={"num_proc": MAX_PROC}),
          native("epochs", train={"max_steps": None, "epochs": 1, "save_every": 10, "micro_batch_size": 4}),
          seed_request("seed", user="carol")]  # the seed's saves_per_epoch: 1 (and its max_steps here)
    for body in ok:
        r = client.post("/v1/jobs", json=body, headers=h(tokens, "carol"))
        assert r.status_code == 201, r.text
    assert stored(data, "carol") == ["at-ckpt", "at-proc", "epochs", "seed"]


# ---- tokens ------------------------------------------------------------------------------------------
def _cli(data, *args):
    return run_cli_inprocess("serve", "token", *args, "--data-dir", str(data))


def _token_ids(data, user):
    out = _cli(data, "list", "--user", user)
    assert out.returncode == 0, out.stderr
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s*(\d+)\s+\S+.*\s(active|expired|revoked)$", out.stdout, re.M)}, out.stdout


def test_tokens_expire_and_revoke_with_401_on_the_very_next_request(srv):
    client, _, data = srv
    made = []
    expires = datetime.fromtimestamp(time.time() + 5, timezone.utc).isoformat()
    for extra in (["--expires", expires], [], []):
        out = _cli(data, "create", "--user", "gina", *extra)
        assert out.returncode == 0, out.stderr
        made.append(out.stdout.strip().splitlines()[0])
    auth = [{"Authorization": f"Bearer {t}"} for t in made]
    assert [client.get("/v1/jobs", headers=a).status_code for a in auth] == [200, 200, 200]
    states, listing = _token_ids(data, "gina")
    assert list(states.values()) == ["active"] * 3 and not any(t in listing for t in made)  # never shown again
    time.sleep(max(0.0, datetime.fromisoformat(expires).timestamp() - time.time()) + 0.2)
    refused(client.get("/v1/jobs", headers=auth[0]), 401, "authorization")  # expired: at once, no cache
    first_live = sorted(states)[1]
    assert _cli(data, "revoke", str(first_live)).returncode == 0
    refused(client.get("/v1/jobs", headers=auth[1]), 401, "authorization")
    assert client.get("/v1/jobs", headers=auth[2]).status_code == 200  # only that token
    assert _cli(data, "revoke", "--user", "gina").returncode == 0
    refused(client.post("/v1/jobs", json=native("late"), headers=auth[2]), 401, "authorization")
    states, _ = _token_ids(data, "gina")
    assert list(states.values()) == ["expired", "revoked", "revoked"]
    assert stored(data, "gina") == []


@pytest.mark.parametrize("args,words", [
    (["create", "--user", "gina", "--expires", "2001-01-01"], ["--expires", "not in the future"]),
    (["create", "--user", "gina", "--expires", "soon"], ["--expires", "30d"]),
    (["revoke", "999999"], ["token 999999", "no live token"]),
    (["revoke"], ["token id or --user"]),
])
def test_token_commands_refuse_bad_input_in_one_line(srv, args, words):
    _, _, data = srv
    before, _ = _token_ids(data, "gina")
    out = _cli(data, *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), out.stderr
    assert _token_ids(data, "gina")[0] == before  # nothing created or revoked


# ---- smaller findings --------------------------------------------------------------------------------
def test_paths_too_long_for_the_file_system_are_4xx_not_500(srv):
    client, tokens, data = srv
    job_id = client.get("/v1/jobs", params={"limit": 1}, headers=h(tokens, "dave")).json()["jobs"][0]["id"]
    for path in ("x" * 5000, "x/" * 2500, "a" * 256 + "/b"):
        refused(client.get(f"/v1/jobs/{job_id}/artifacts/{path}", headers=h(tokens, "dave")), 400, "path", "longer")
    for out_dir in ("b" * 300, "b/" * 2100):
        refused(client.post("/v1/jobs", json=native("long", output={"dir": out_dir}), headers=h(tokens, "dave")),
                422, "config.output.dir", "longer than the file system allows")
    assert stored(data, "dave") == ["d0"] and not (data / "users" / "dave" / "runs" / "long").exists()


@pytest.mark.parametrize("depth", [33, 600, 900])
def test_deeply_nested_json_is_refused_at_submit(srv, depth):
    client, tokens, data = srv
    nest = {}
    node = nest
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    body = seed_request("deep", user="frank", special_tokens=nest)
    r = client.post("/v1/jobs", content=json.dumps(body), headers={**h(tokens, "frank"), "content-type": "application/json"})
    msg = refused(r, 413, "input.args.special_tokens.a.…", "nested deeper than 32")
    assert stored(data, "frank") == [] and "Traceback" not in msg


def test_healthz_checks_a_real_write(srv, tmp_path):
    client, _, _ = srv
    ok = client.get("/healthz")
    assert ok.status_code == 200 and ok.json()["ok"] is True
    data = tmp_path / "ro"
    Store(data)  # the tables exist; then the server opens its job store read-only
    server = Server(data, concurrency=0, args=["--db", f"sqlite:///file:{data / 'jobs.db'}?mode=ro&uri=true"])
    try:
        server.start(ready=(200, 503))
        r = httpx.get(server.url + "/healthz", timeout=30)
        assert r.status_code == 503 and r.json()["ok"] is False, r.text
        assert r.json()["detail"][0]["loc"] == "db" and "readonly" in r.json()["detail"][0]["msg"]
    finally:
        server.stop()


def test_every_response_carries_security_headers_and_the_dashboard_csp_allows_only_its_own_code(srv):
    client, tokens, _ = srv
    responses = {
        "dashboard": client.get("/"), "healthz": client.get("/healthz"), "401": client.get("/v1/jobs"),
        "404": client.get("/v1/jobs/nope", headers=h(tokens, "dave")), "docs": client.get("/docs"),
        "400": client.post("/v1/jobs", content=b"{", headers=h(tokens, "dave")),
        "413": client.post("/v1/jobs", content=b"x" * (2 << 20), headers=h(tokens, "dave")),
        "422": client.get("/v1/jobs", params={"limit": 0}, headers=h(tokens, "dave")),
        "openapi": client.get("/openapi.json"),
    }
    assert {k: r.status_code for k, r in responses.items()} == {
        "dashboard": 200, "healthz": 200, "401": 401, "404": 404, "docs": 404, "400": 400, "413": 413, "422": 422,
        "openapi": 200}  # /docs (a CDN page) is off unless `serve --docs`; the JSON schema stays
    for name, r in responses.items():
        for key, value in HEADERS.items():
            assert r.headers.get(key) == value, (name, key, dict(r.headers))
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], name
    csp = responses["dashboard"].headers["content-security-policy"]
    page = responses["dashboard"].text
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "connect-src 'self'" in csp
    assert "unsafe" not in csp and "http" not in csp and "default-src 'none'" in csp
    assert not re.search(r"\sstyle=|\son\w+=", page)  # nothing inline that the policy would block


def test_reasons_and_logs_show_paths_relative_to_the_workspace(srv):
    client, tokens, data = srv
    job = client.get("/v1/jobs", params={"limit": 1}, headers=h(tokens, "dave")).json()["jobs"][0]
    ws = data / "users" / "dave"
    with sqlite3.connect(data / "jobs.db", timeout=30) as db:  # as the worker writes a failed child's last error
        db.execute("update jobs set reason = ? where id = ?", (f"error: data.train.0.path: {ws}/rows.jsonl row 3: bad", job["id"]))
    (data / "jobs" / job["id"]).mkdir(parents=True)
    (data / "jobs" / job["id"] / "log.txt").write_text(f"reading {ws}/rows.jsonl\nconfig {data}/jobs/{job['id']}/config.yaml\n")
    seen = client.get(f"/v1/jobs/{job['id']}", headers=h(tokens, "dave")).json()["reason"]
    assert seen == "error: data.train.0.path: rows.jsonl row 3: bad"
    listed = client.get("/v1/jobs", params={"limit": 1}, headers=h(tokens, "dave")).json()["jobs"][0]["reason"]
    assert listed == seen
    logs = client.get(f"/v1/jobs/{job['id']}/logs", params={"follow": False}, headers=h(tokens, "dave")).text
    assert "data: reading rows.jsonl" in logs and "data: config <job>/config.yaml" in logs
    assert str(data) not in logs and str(data) not in seen
