"""Seed 001 (serverless fine-tuning worker): the seed's own example request, submitted to a real `tuneforge serve` on
127.0.0.1, saves checkpoints during the run (saves_per_epoch) and pushes its adapter to hub_model_id, which is the
worker's whole output. The hub is faked at its HTTP boundary (tests/fake_hub.py); the request's credentials carry
the token, which reaches only the job's environment.

The request is tests/data/seeds_001_request.json verbatim except what cannot run here: the hub model and dataset ids
become the workspace's tiny model and rows, sequence_len the tiny model's context, num_epochs 2 so that the
epoch-end save of epoch 1 lands mid-run (with the seed's 1 epoch the only save is the last step), warmup_steps 0
(the seed's 10 exceed this run's steps), and the loss watchdog's threshold: 5 suits a 1B model, while a random tiny
model with 512 tokens starts near ln(512) = 6.2.
"""

import copy
import json
import os
import sqlite3

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from serve_helpers import SEED_REQUEST, Server, make_workspace, token, wait_for  # noqa: E402

HUB_TOKEN = "hf_fake_token"  # what the fake hub accepts; sent in the request's credentials
PLANTED = "hf_PLANTED_in_args_01"  # a credential-named key inside args: never stored, never echoed


@pytest.mark.slow
def test_seed_request_checkpoints_mid_run_and_pushes_its_adapter(tmp_path, llama_dir, fake_hub):
    data = tmp_path / "data"
    auth = {"Authorization": f"Bearer {token(data, 'user')}"}
    make_workspace(data, "user", llama_dir, rows=100)  # 6 bins of 512 tokens: 1 step per epoch
    req = copy.deepcopy(SEED_REQUEST)
    args = req["input"]["args"]
    args.update(base_model="tiny", sequence_len=512, num_epochs=2, warmup_steps=0, loss_watchdog_threshold=10,
                hub_token=PLANTED)
    args["datasets"][0]["path"] = "alpaca.jsonl"
    req["input"]["credentials"]["hf_token"] = HUB_TOKEN
    # the operator's server: its hub endpoint is the fake one, online; it holds no token of its own
    env = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, **fake_hub.env(), "HF_TOKEN": ""}
    server = Server(data, concurrency=1, env=env).start()
    try:
        r = httpx.post(server.url + "/v1/jobs", json=req, headers=auth, timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["not_mapped"] == [], r.json()["not_mapped"]  # every key of the seed's request is carried over
        job_id = r.json()["id"]

        def ended():
            j = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
            return j if j["status"] in ("finished", "failed", "cancelled") else None

        final = wait_for(ended, timeout=300)
        assert final["status"] == "finished", final
        report = {row["key"]: row for row in final["import_report"]}
        for key, target in (("saves_per_epoch", "train.saves_per_epoch"), ("evals_per_epoch", "train.evals_per_epoch"),
                            ("hub_model_id", "export.hub_repo")):
            assert report[key]["status"] == "mapped" and report[key]["tuneforge"] == target, report[key]
        assert report["flash_attention"]["status"] == "mapped"  # flash-attn where it runs, else the best attention here

        run = next((data / "users" / "user" / "runs" / "test-run").rglob("run_info.json")).parent
        info = json.loads((run / "run_info.json").read_text())
        total = final["progress"]["total_steps"]
        assert total >= 2 and info["export"]["push"]["status"] == "done" and info["export"]["push"]["what"] == "adapter"
        # a checkpoint written before the last step: a crash after epoch 1 resumes from there, not from zero
        saved = sorted(int(p.name.split("-")[-1]) for p in (run / "checkpoints").glob("step-*"))
        assert saved and saved[0] < total, (saved, total)

        # the worker's output: the adapter, byte for byte, in the request's hub_model_id
        pushed = fake_hub.files("runpod/llama-fr-lora")
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert pushed[name] == (run / "final" / name).read_bytes(), name
        assert json.loads(pushed["adapter_config.json"])["r"] == 16
        assert any(auth_header == f"Bearer {HUB_TOKEN}" for _, _, auth_header in fake_hub.requests)

        # neither credential is stored or echoed: job JSON, database, files under the data folder
        listing = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=auth, timeout=30).text
        rows = repr(sqlite3.connect(data / "jobs.db").execute("select * from jobs").fetchall())
        assert PLANTED not in listing + rows and HUB_TOKEN not in listing + rows
        for path in data.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert PLANTED.encode() not in path.read_bytes() and HUB_TOKEN.encode() not in path.read_bytes(), path
    finally:
        server.stop()
