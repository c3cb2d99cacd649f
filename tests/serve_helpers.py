"""Shared by the job-server tests and bench: a data directory with the tiny model and data, seed requests."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tiny

SEED_REQUEST = json.loads((Path(__file__).parent / "data" / "seeds_001_request.json").read_text())


def make_workspace(data_dir: Path, user: str, llama_dir: Path, rows: int = 48) -> Path:
    """DATA/users/USER with the tiny model (`tiny/`) and alpaca rows (`alpaca.jsonl`)."""
    ws = data_dir / "users" / user
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / "tiny").exists():
        shutil.copytree(llama_dir, ws / "tiny")
    with (ws / "alpaca.jsonl").open("w") as fh:
        for r in tiny.reverse_rows(rows, seed=1):
            fh.write(json.dumps({"instruction": r["messages"][0]["content"], "input": "",
                                 "output": r["messages"][1]["content"]}) + "\n")
    return ws


def seed_request(run_id: str = "test-run", user: str = "user", **args) -> dict:
    """The seed's example request verbatim, with only what cannot run here swapped: the model and dataset
    paths (local files), flash attention (no GPU), a step budget that fits CI, and no hub push (no network here)."""
    req = copy.deepcopy(SEED_REQUEST)
    req["input"]["run_id"], req["input"]["user_id"] = run_id, user
    a = req["input"]["args"]
    a.pop("hub_model_id")  # maps to export.hub_repo: a push after training, which needs the hub
    a.update(base_model="tiny", flash_attention=False, sequence_len=128, max_steps=2, warmup_steps=0)
    a["datasets"][0]["path"] = "alpaca.jsonl"
    a.update(args)
    if "save_steps" in args:  # the caller's checkpoint rule replaces the seed's saves_per_epoch (one of them)
        a.pop("saves_per_epoch", None)
    if args.get("val_set_size") == 0:  # no eval data, so no evals per epoch
        a.pop("evals_per_epoch", None)
    return req


def wait_for(predicate, timeout: float = 240.0, every: float = 0.3):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s")


def malformed_requests(n: int = 200, user: str = "user") -> list[tuple[str, bytes]]:
    """`n` bad submissions (label, raw body): broken JSON, wrong types, unknown keys, traversal, oversized."""
    import random

    rng = random.Random(0)
    good = json.dumps(seed_request("m", user=user)).encode()
    makers = [
        ("truncated json", lambda i: good[: rng.randrange(1, len(good) - 1)]),
        ("not json", lambda i: rng.choice([b"", b"nul", b"{'a': 1}", b"\xff\xfe\x00", b"<xml/>", b"{" * 3000])),
        ("wrong top-level type", lambda i: json.dumps(rng.choice([[], 3, "x", None, True])).encode()),
        ("wrong type in args", lambda i: json.dumps(seed_request(f"t{i}", user=user, **{rng.choice(
            ["lora_r", "learning_rate", "micro_batch_size", "num_epochs", "sequence_len", "lora_dropout"]):
            rng.choice(["abc", [1], {"x": 1}, -5])})).encode()),
        ("args not a mapping", lambda i: json.dumps({"input": {"args": rng.choice([[], "x", 5])}}).encode()),
        ("unknown key in input", lambda i: json.dumps({"input": {**seed_request(user=user)["input"], f"bogus{i}": 1}}).encode()),
        ("unknown key in config", lambda i: json.dumps({"config": {"model": {"path": "tiny"}, "data": {
            "train": [{"path": "alpaca.jsonl"}]}, "train": {f"lrr{i}": 1}}}).encode()),
        ("unknown credential", lambda i: json.dumps({"input": {"args": {}, "credentials": {"aws_key": "x"}}}).encode()),
        ("path traversal", lambda i: json.dumps(seed_request(rng.choice(["../x", "a/b", "..", ".hidden/../x"]), user=user)).encode()),
        ("absolute path", lambda i: json.dumps(seed_request(f"abs{i}", user=user, base_model=rng.choice(["/etc", "~/x", "/"]))).encode()),
        ("traversal in output_dir", lambda i: json.dumps(seed_request(f"od{i}", user=user, output_dir="../../../tmp")).encode()),
        ("oversized body", lambda i: b'{"config": "' + b"x" * (2 << 20) + b'"}'),
    ]
    return [(label, make(i)) for i in range(n) for label, make in [makers[i % len(makers)]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data, concurrency=2, args=(), env=None):
        self.data, self.concurrency, self.port, self.proc = data, concurrency, free_port(), None
        self.args, self.env = list(args), env  # more `serve` options; the server's environment (default: ours)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready=(200,)):
        log = open(self.data.parent / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--data-dir", str(self.data), "--port",
                                      str(self.port), "--concurrency", str(self.concurrency), *self.args],
                                     stdout=log, stderr=log, env=self.env)
        wait_for(lambda: self._up(ready), timeout=120)
        return self

    def _up(self, ready=(200,)):
        import httpx

        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code in ready
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
