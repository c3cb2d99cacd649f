"""Load and fault test of `tuneforge serve` on loopback: concurrent submissions from several users, the server
SIGKILLed and restarted during the load, then malformed requests. Every job is a real `tuneforge train` of the
tiny test model (a few steps, a checkpoint every step).

    .venv/bin/python bench/serve_load.py --jobs 50 --users 5 --kills 2 --malformed 200 --concurrency 2

Prints a JSON summary: accepted / lost / duplicated jobs, final statuses with reasons, attempts, the most jobs
seen running at once (sampled from the job store), and the HTTP codes of the malformed requests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import httpx  # noqa: E402

import tiny  # noqa: E402
from serve_helpers import Server, make_workspace, malformed_requests, running_now, seed_request, token, wait_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--users", type=int, default=5)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--malformed", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kill-every", type=int, default=8, help="SIGKILL the server after every N finished jobs.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the summary JSON here.")
    ap.add_argument("--deadline-s", type=float, default=4 * 3600,
                    help="Stop waiting for jobs after this long and report the state reached (queued jobs are counted).")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tf-serve-load-"))
    data = root / "data"
    model = tiny.build_model(root / "model", "llama")
    users = [f"user{i}" for i in range(args.users)]
    tokens = {u: token(data, u) for u in users}
    for u in users:
        make_workspace(data, u, model)
    server = Server(data, args.concurrency).start()
    t0 = time.time()
    peak = 0

    def submit(i: int):
        u = users[i % len(users)]
        req = seed_request(f"load{i}", user=u, max_steps=args.steps, save_steps=1, val_set_size=0, loss_watchdog_threshold=100)
        began = time.time()
        r = httpx.post(server.url + "/v1/jobs", json=req, headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=120)
        return u, r.status_code, r.json().get("id"), time.time() - began

    with ThreadPoolExecutor(16) as pool:
        submitted = list(pool.map(submit, range(args.jobs)))
    latencies = sorted(s[3] for s in submitted) or [0.0]
    accepted = {s[2]: s[0] for s in submitted if s[1] == 201}

    def jobs() -> dict:
        out = {}
        for u in users:
            r = httpx.get(server.url + "/v1/jobs", headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=60)
            out.update({j["id"]: j for j in r.json()["jobs"]})
        return out

    def sample():
        nonlocal peak
        peak = max(peak, running_now(data))

    kills = []
    for k in range(args.kills):
        # kill when k+1 jobs have finished and a job is mid-run with a checkpoint
        def ready():
            sample()
            js = jobs()
            done = sum(j["status"] in ("finished", "failed") for j in js.values())
            mid = any(j["status"] == "running" and list((data / "users" / j["user"] / "runs" / j["run_id"]).rglob("checkpoints/*"))
                      for j in js.values())
            return done >= (k + 1) * args.kill_every and mid
        wait_for(ready, timeout=7200, every=0.5)
        server.kill9()
        kills.append(round(time.time() - t0, 1))
        server.start()

    def all_ended():
        sample()
        js = jobs()
        return (js or {"": None}) if all(j["status"] in ("finished", "failed", "cancelled") for j in js.values()) else None

    try:
        final = wait_for(all_ended, timeout=max(60.0, args.deadline_s - (time.time() - t0)), every=1.0)
        deadline_hit = False
    except AssertionError:
        final, deadline_hit = jobs(), True
    wall = time.time() - t0
    final.pop("", None)

    bad = malformed_requests(args.malformed, user=users[0])

    def send(item):
        label, raw = item
        r = httpx.post(server.url + "/v1/jobs", content=raw, timeout=120,
                       headers={"Authorization": f"Bearer {tokens[users[0]]}", "content-type": "application/json"})
        return label, r.status_code, ("Traceback" in r.text)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, bad))
    server.stop()

    statuses = collections.Counter(j["status"] for j in final.values())
    summary = {
        "jobs_submitted": args.jobs, "users": args.users, "concurrency": args.concurrency, "steps_per_job": args.steps,
        "accepted": len(accepted), "submit_latency_s": {"p50": round(latencies[len(latencies) // 2], 3), "max": round(latencies[-1], 3)},
        "kills_at_s": kills, "jobs_in_store": len(final),
        "lost": len(set(accepted) - set(final)), "duplicated": len(final) - len(set(final)),
        "unexpected": len(set(final) - set(accepted)),
        "statuses": dict(statuses),
        "failed_reasons": [j["reason"] for j in final.values() if j["status"] == "failed"],
        "attempts": dict(collections.Counter(j["attempts"] for j in final.values())),
        "resumed_from_checkpoint": sum(1 for j in final.values() if j["resume"]),
        "peak_running": peak, "wall_s": round(wall, 1), "deadline_hit": deadline_hit,
        "malformed": {"sent": len(answers), "codes": dict(collections.Counter(c for _, c, _ in answers)),
                      "5xx": sum(c >= 500 for _, c, _ in answers), "tracebacks": sum(t for *_, t in answers),
                      "by_kind": {label: sorted({c for l2, c, _ in answers if l2 == label}) for label in sorted({a[0] for a in answers})}},
        "data_dir": str(data),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
