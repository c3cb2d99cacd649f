"""Shared by the job-server tests and bench: a data directory with the tiny model and data, seed requests."""

from __future__ import annotations

import copy
import json
import shutil
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
    paths (local files), flash attention (no GPU), and a step budget that fits CI."""
    req = copy.deepcopy(SEED_REQUEST)
    req["input"]["run_id"], req["input"]["user_id"] = run_id, user
    a = req["input"]["args"]
    a.update(base_model="tiny", flash_attention=False, sequence_len=128, max_steps=2, warmup_steps=0)
    a["datasets"][0]["path"] = "alpaca.jsonl"
    a.update(args)
    return req


def wait_for(predicate, timeout: float = 240.0, every: float = 0.3):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s")
