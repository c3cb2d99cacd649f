"""A job is a guest (issue 20, classes 1-5): attacks on a shared `tuneforge serve` through its real HTTP API.

Markers are planted in the server's environment, in another user's files and in a file outside the data
folder; a local TCP listener stands for any address a job might contact. Every attempt must be refused at
submit with its status and the field named, and at the end no marker may appear in any response, any file
under the data folder or the database, and the listener must have seen no connection. A few real jobs
check what only a running child shows: its environment, a link planted after submit, the disk quota, and
(where bubblewrap works) the sandbox's view of the file system.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from serve_helpers import Server, make_workspace, seed_request, token, wait_for  # noqa: E402
from tuneforge.config.load import set_dotted  # noqa: E402

MARK_ENV = "tfmark-server-env-5c1e"  # a variable of the server's environment
MARK_HF = "hf_tfmarkOperatorToken9b2"  # the operator's own HF_TOKEN
MARK_BOB = "tfmark-bob-data-77d0"  # inside another user's files
MARK_OUT = "tfmark-outside-3a4f"  # in a file outside the data folder
MARKS = (MARK_ENV, MARK_HF, MARK_BOB, MARK_OUT)
TRACKER = "http://tracker.invalid/mlflow"  # the one tracker this server allows
QUOTA_MIB = 8


def bwrap_works() -> bool:
    try:
        from tuneforge.serve.worker import sandbox_problem
    except ImportError:  # bench/serve_attacks.py against a tuneforge without --sandbox
        return False
    return sandbox_problem() is None


class Listener:
    """A TCP port on 127.0.0.1 that counts connections: any contact from a job shows here."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port, self.count = self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()


class Guest:
    """The module's server, its users and what every response said."""

    def __init__(self, root: Path, llama_dir: Path, server_args: list[str] | None = None):
        self.root, self.data, self.outside = root, root / "data", root / "outside"
        self.listener, self.responses = Listener(), []
        self.tokens = {u: token(self.data, u) for u in ("alice", "bob", "carol")}
        self.ws = {u: make_workspace(self.data, u, llama_dir, rows=32) for u in self.tokens}
        self._plant()
        self.sandbox = bwrap_works()
        proxy = f"http://127.0.0.1:{self.listener.port}"
        env = {**os.environ, "TF_PLANTED": MARK_ENV, "HF_TOKEN": MARK_HF, "AWS_SECRET_ACCESS_KEY": MARK_ENV,
               "TUNEFORGE_ALLOW_CODE": "1", "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "HF_HUB_OFFLINE": "1"}
        args = ["--allow-tracker", TRACKER, "--disk-quota", f"{QUOTA_MIB}M", *(["--sandbox"] if self.sandbox else [])]
        args = args if server_args is None else server_args  # bench/serve_attacks.py: a server without these options
        self.server = Server(self.data, concurrency=2, args=args, env=env).start()

    def _plant(self):
        bob, alice, out = self.ws["bob"], self.ws["alice"], self.outside
        out.mkdir()
        (out / "secret.txt").write_text(MARK_OUT)
        (out / "tpl.jinja").write_text("{{ '" + MARK_OUT + "' }}")
        (out / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "note": MARK_OUT}))
        (bob / "secret.jsonl").write_text(json.dumps({"instruction": MARK_BOB, "input": "", "output": MARK_BOB}) + "\n")
        (bob / "tpl.jinja").write_text("{{ '" + MARK_BOB + "' }}")
        links = {"bob-data.jsonl": bob / "secret.jsonl", "bob-model": bob / "tiny", "jobs.db": self.data / "jobs.db",
                 "bob-ws": bob, "bob-cache.jsonl": self.data / "cache" / "bob", "out.jinja": out / "tpl.jinja",
                 "bob.jinja": bob / "tpl.jinja", "out-ds.json": out / "ds.json", "out-dir": out, "etc": Path("/etc"),
                 "proc-env.jsonl": Path("/proc/self/environ")}
        for name, target in links.items():
            (alice / name).symlink_to(target)
        for name, inner in {"ds-tb.json": {"tensorboard": {"enabled": True, "output_path": str(out)}},
                            "ds-csv.json": {"csv_monitor": {"enabled": True, "output_path": "../bob/runs"}},
                            "ds-nvme.json": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/dev/shm"}}},
                            "ds-flops.json": {"flops_profiler": {"enabled": True, "output_file": "out-dir/profile.txt"}},
                            "ds-var.json": {"wandb": {"enabled": True, "project": "${HF_TOKEN}"}}}.items():
            (alice / name).write_text(json.dumps({"zero_optimization": {"stage": 2}, **inner}))
        (alice / "pickled").mkdir()
        shutil.copy(alice / "tiny" / "config.json", alice / "pickled" / "config.json")
        (alice / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        (alice / "weights.pt").write_bytes(b"\x80\x04pickle")
        (alice / "adapter-pkl").mkdir()
        (alice / "adapter-pkl" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
        # a .env in the workspace (the child's working directory): read, it would crash the run at step 1
        (alice / ".env").write_text("TUNEFORGE_FAULT=kill@step:1\nTUNEFORGE_ALLOW_CODE=1\n")

    def post(self, user: str, body: dict) -> httpx.Response:
        r = httpx.post(self.server.url + "/v1/jobs", json=body, headers=self.auth(user), timeout=60)
        self.responses.append(r.text)
        return r

    def get(self, user: str, path: str) -> httpx.Response:
        r = httpx.get(self.server.url + path, headers=self.auth(user), timeout=60)
        self.responses.append(r.text)
        return r

    def auth(self, user: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def ended(self, user: str, job_id: str):
        j = self.get(user, f"/v1/jobs/{job_id}").json()
        return j if j["status"] in ("finished", "failed", "cancelled") else None


@pytest.fixture(scope="module")
def guest(tmp_path_factory, llama_dir):
    g = Guest(tmp_path_factory.mktemp("guest"), llama_dir)
    try:
        yield g
    finally:
        g.server.stop()
        g.listener.sock.close()


def native(patch: dict | None = None, **extra) -> dict:
    """A small valid native job, with `patch` ({dotted key: value}) applied."""
    cfg = {"model": {"path": "tiny"}, "data": {"train": [{"path": "alpaca.jsonl"}], "max_length": 64},
           "train": {"max_steps": 1, "micro_batch_size": 2}}
    for key, value in (patch or {}).items():
        set_dotted(cfg, key, value)
    return {"config": cfg, **extra}


def seed(**args) -> dict:
    return seed_request("x", user="alice", **args)


P = "{port}"  # replaced by the listener's port
# (id, request, status, field named). Every one is refused at submit: nothing is queued, read or contacted.
ATTACKS = [
    # 1. the server's environment reaches a job: no `${` anywhere, mapped or not, key or value
    ("env-chat-template", native({"model.chat_template": "{{ '${HF_TOKEN}' }}"}), 422, "config.model.chat_template"),
    ("env-template-file", native({"model.chat_template": "${HOME}/.ssh/x.jinja"}), 422, "config.model.chat_template"),
    ("env-model-path", native({"model.path": "${TF_PLANTED}"}), 422, "config.model.path"),
    ("env-system-prompt", native({"data.system_prompt": "${AWS_SECRET_ACCESS_KEY}"}), 422, "config.data.system_prompt"),
    ("env-output-dir", native({"output.dir": "${HOME}/x"}), 422, "config.output.dir"),
    ("env-mlflow-experiment", native({"tracking.mlflow": {"uri": "file:mlruns", "experiment": "${HF_TOKEN}"}}), 422,
     "config.tracking.mlflow.experiment"),
    ("env-column-key", native({"data.train.0.columns": {"${HF_TOKEN}": "prompt"}}), 422, "config.data.train.0.columns.${HF_TOKEN}"),
    ("env-seed-template", seed(chat_template_jinja="{{ '${HF_TOKEN}' }}"), 422, "input.args.chat_template_jinja"),
    ("env-seed-unmapped", seed(some_unknown_key="${HF_TOKEN}"), 422, "input.args.some_unknown_key"),
    ("env-seed-dataset", seed(datasets=[{"path": "${HOME}/alpaca.jsonl", "type": "alpaca"}]), 422, "input.args.datasets.0.path"),
    ("env-ds-json", native({"train.deepspeed": "ds-var.json"}), 422, "train.deepspeed.wandb.project"),
    # 2. files outside the data folder through fields that were not checked
    ("out-template-abs", native({"model.chat_template": "/etc/x.jinja"}), 400, "model.chat_template"),
    ("out-template-dots", native({"model.chat_template": "../../../outside/tpl.jinja"}), 400, "model.chat_template"),
    ("out-template-link", native({"model.chat_template": "out.jinja"}), 400, "model.chat_template"),
    ("out-template-home", native({"model.chat_template": "~/x.jinja"}), 400, "model.chat_template"),
    ("out-mlflow-pct", native({"tracking.mlflow": {"uri": "file:%2e%2e/%2e%2e/%2e%2e/outside"}}), 400, "tracking.mlflow.uri"),
    ("out-mlflow-pct2", native({"tracking.mlflow": {"uri": "file:%252e%252e/%252e%252e/x"}}), 400, "tracking.mlflow.uri"),
    ("out-mlflow-abs", native({"tracking.mlflow": {"uri": "file:///tmp/mlruns"}}), 400, "tracking.mlflow.uri"),
    ("out-mlflow-link", native({"tracking.mlflow": {"uri": "file:out-dir/mlruns"}}), 400, "tracking.mlflow.uri"),
    ("out-mlflow-plain", native({"tracking.mlflow": {"uri": "/tmp/mlruns"}}), 400, "tracking.mlflow.uri"),
    ("out-mlflow-sqlite", native({"tracking.mlflow": {"uri": "sqlite:////tmp/mlflow.db"}}), 422, "tracking.mlflow.uri"),
    ("out-ds-tensorboard", native({"train.deepspeed": "ds-tb.json"}), 400, "train.deepspeed.tensorboard.output_path"),
    ("out-ds-csv", native({"train.deepspeed": "ds-csv.json"}), 400, "train.deepspeed.csv_monitor.output_path"),
    ("out-ds-nvme", native({"train.deepspeed": "ds-nvme.json"}), 400, "train.deepspeed.zero_optimization.offload_param.nvme_path"),
    ("out-ds-flops", native({"train.deepspeed": "ds-flops.json"}), 400, "train.deepspeed.flops_profiler.output_file"),
    ("out-ds-link", native({"train.deepspeed": "out-ds.json"}), 400, "train.deepspeed"),
    ("out-ds-abs", seed(deepspeed="/etc/ds.json"), 400, "train.deepspeed"),
    ("out-data-proc", native({"data.train.0.path": "proc-env.jsonl"}), 400, "data.train.0.path"),
    ("out-data-etc-link", native({"data.train.0.path": "etc/passwd"}), 400, "data.train.0.path"),
    ("out-data-dots", native({"data.train.0.path": "sub/../../../outside/secret.txt"}), 400, "data.train.0.path"),
    ("out-eval-abs", native({"data.eval": [{"path": "/etc/hostname"}], "data.eval_split": 0}), 400, "data.eval.0.path"),
    ("out-sql-abs", native({"data.train.0.path": "/tmp/x.db"}), 400, "data.train.0.path"),
    ("out-init-from", native({"lora.init_from": "/tmp"}), 400, "lora.init_from"),
    ("out-tokenizer", native({"model.tokenizer": "out-dir"}), 400, "model.tokenizer"),
    ("out-calibration", native({"export.quantize": {"calibration": "/etc/passwd"}}), 400, "export.quantize.calibration"),
    ("out-url-data", native({"data.train.0.path": f"http://127.0.0.1:{P}/x.jsonl"}), 400, "data.train.0.path"),
    ("out-url-model", native({"model.path": f"https://127.0.0.1:{P}/m"}), 400, "model.path"),
    # 3. another user's files (links are checked against the user's own workspace, not the data folder)
    ("bob-data-link", native({"data.train.0.path": "bob-data.jsonl"}), 400, "data.train.0.path"),
    ("bob-model-link", native({"model.path": "bob-model"}), 400, "model.path"),
    ("bob-jobs-db", native({"data.train.0.path": "jobs.db", "data.train.0.query": "select * from tokens"}), 400, "data.train.0.path"),
    ("bob-ws-dir-link", native({"data.train.0.path": "bob-ws/secret.jsonl"}), 400, "data.train.0.path"),
    ("bob-cache-link", native({"data.train.0.path": "bob-cache.jsonl"}), 400, "data.train.0.path"),
    ("bob-template-link", native({"model.chat_template": "bob.jinja"}), 400, "model.chat_template"),
    ("bob-init-from", native({"lora.init_from": "bob-ws/runs"}), 400, "lora.init_from"),
    ("bob-tokenizer", native({"model.tokenizer": "bob-model"}), 400, "model.tokenizer"),
    ("bob-seed-model", seed(base_model="bob-model"), 400, "model.path"),
    # 4. code execution
    ("code-custom", native({"data.train.0": {"custom": "os:system", "options": {"command": "id"}}}), 400, "data.train.0.custom"),
    ("code-allow", native({"data.allow_code": True}), 400, "data.allow_code"),
    ("code-remote", native({"model.trust_remote_code": True}), 400, "model.trust_remote_code"),
    ("code-pickle-dir", native({"model.path": "pickled"}), 422, "model.path"),
    ("code-pickle-file", native({"model.path": "weights.pt"}), 422, "model.path"),
    ("code-pickle-adapter", native({"lora.init_from": "adapter-pkl"}), 422, "lora.init_from"),
    # 5. addresses a request chooses
    ("net-mlflow-http", native({"tracking.mlflow": {"uri": f"http://127.0.0.1:{P}"}}), 422, "tracking.mlflow.uri"),
    ("net-mlflow-https", native({"tracking.mlflow": {"uri": f"https://127.0.0.1:{P}/api"}}), 422, "tracking.mlflow.uri"),
    ("net-mlflow-userinfo", native({"tracking.mlflow": {"uri": f"http://tracker.invalid@127.0.0.1:{P}/mlflow"}}), 422, "tracking.mlflow.uri"),
    ("net-mlflow-suffix", native({"tracking.mlflow": {"uri": "http://tracker.invalid.127.0.0.1.nip.io/mlflow"}}), 422, "tracking.mlflow.uri"),
    ("net-mlflow-prefix", native({"tracking.mlflow": {"uri": "http://tracker.invalid/mlflow-other"}}), 422, "tracking.mlflow.uri"),
    ("net-mlflow-dots", native({"tracking.mlflow": {"uri": "http://tracker.invalid/mlflow/%2e%2e/admin"}}), 422, "tracking.mlflow.uri"),
    ("net-mlflow-postgres", native({"tracking.mlflow": {"uri": f"postgresql://127.0.0.1:{P}/x"}}), 422, "tracking.mlflow.uri"),
    ("net-wandb-key", native({"tracking.wandb": {"project": "p"}}, credentials={"wandb_api_key": "k" * 40}), 422, "tracking.wandb"),
]


def _fill(obj, port: int):
    return json.loads(json.dumps(obj).replace(P, str(port)))


@pytest.mark.slow
@pytest.mark.parametrize("name,body,status,loc", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused_at_submit_naming_the_field(guest, name, body, status, loc):
    body = _fill(body, guest.listener.port)
    (body["input"] if "input" in body else body)["run_id"] = name
    r = guest.post("alice", body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert loc in [d["loc"] for d in detail], (loc, detail)
    assert len(detail[0]["msg"].splitlines()) == 1 and "Traceback" not in r.text


@pytest.mark.slow
def test_allowed_tracker_is_accepted(guest):
    r = guest.post("alice", native({"tracking.mlflow": {"uri": TRACKER + "/runs"}}, run_id="allowed-tracker"))
    assert r.status_code == 201, r.text
    guest.responses.append(httpx.post(f"{guest.server.url}/v1/jobs/{r.json()['id']}/cancel", headers=guest.auth("alice")).text)


def _job_process(job_id: str) -> int | None:
    """The running `tuneforge train` of this job (inside bubblewrap when sandboxed)."""
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and any(job_id.encode() in c for c in cmd) and not cmd[0].endswith(b"bwrap"):
            return int(p.name)
    return None


@pytest.mark.slow
def test_child_environment_is_an_allowlist_and_no_dotenv(guest):
    """A real job: its environment holds none of the server's variables, HOME is the workspace, and the
    workspace's .env (which would kill it at step 1 and re-enable code) is not read: the job finishes."""
    r = guest.post("alice", native({"train.max_steps": 12}, run_id="env-check"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    pid = wait_for(lambda: _job_process(job_id), timeout=120, every=0.1)
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    env = dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)
    for mark in MARKS:
        assert mark not in raw.decode()
    assert not {"TF_PLANTED", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "TUNEFORGE_ALLOW_CODE", "HTTP_PROXY", "HTTPS_PROXY"} & set(env)
    assert env["HOME"] == str(guest.ws["alice"].resolve()) and env["TUNEFORGE_JOB"] == "1"
    assert Path(env["HF_TOKEN_PATH"]).parent.name == job_id  # never the operator's login token
    assert Path(env["HF_HUB_CACHE"]) == guest.data.resolve() / "cache" / "alice" / "hub"  # downloads: alice's own
    if guest.sandbox:  # what the sandboxed job can see of the server's file system
        view = Path(f"/proc/{pid}/root")
        seen = lambda p: (view / str(Path(p).resolve()).lstrip("/")).exists()  # noqa: E731
        assert seen(guest.ws["alice"] / "alpaca.jsonl")
        assert not seen(guest.data / "jobs.db") and not seen(guest.ws["bob"] / "secret.jsonl")
        assert not seen(guest.outside / "secret.txt") and not seen(Path.home() / ".bashrc")
    final = wait_for(lambda: guest.ended("alice", job_id), timeout=300)
    assert final["status"] == "finished", final


@pytest.mark.slow
def test_link_planted_after_submit_is_refused_by_the_job_itself(guest):
    """The workspace is the user's: a dataset that becomes a link to bob's data after submit is refused
    by the child's own check, before it reads anything."""
    r = guest.post("alice", native({"data.train.0.path": "later.jsonl"}, run_id="late-link"))
    assert r.status_code == 201, r.text
    (guest.ws["alice"] / "later.jsonl").symlink_to(guest.ws["bob"] / "secret.jsonl")
    final = wait_for(lambda: guest.ended("alice", r.json()["id"]), timeout=300)
    assert final["status"] == "failed" and "data.train.0.path" in final["reason"] and "outside your workspace" in final["reason"], final


@pytest.mark.slow
def test_sql_dump_cannot_attach_another_file(guest):
    """A .sql dump in the workspace that ATTACHes a file outside it: the data source's authorizer refuses it
    (data/sources.py), the job fails naming ATTACH, and no file is created."""
    target = guest.outside / "created-by-attach.db"
    (guest.ws["alice"] / "evil.sql").write_text(
        "CREATE TABLE rows(instruction TEXT, input TEXT, output TEXT); INSERT INTO rows VALUES ('a', '', 'b');\n"
        f"ATTACH DATABASE '{target}' AS x; CREATE TABLE x.t(a TEXT);\n")
    r = guest.post("alice", native({"data.train.0": {"path": "evil.sql", "query": "select * from rows"}}, run_id="sql-attach"))
    assert r.status_code == 201, r.text
    final = wait_for(lambda: guest.ended("alice", r.json()["id"]), timeout=300)
    assert final["status"] == "failed" and "ATTACH" in final["reason"], final
    assert not target.exists()


@pytest.mark.slow
def test_disk_quota_stops_the_run_and_keeps_its_checkpoint(guest):
    cfg = native({"train.finetune": "full", "train.max_steps": 400, "train.save_every": 2, "train.keep_checkpoints": 200,
                  "data.max_length": 32}, run_id="quota")
    r = guest.post("carol", cfg)
    assert r.status_code == 201, r.text
    final = wait_for(lambda: guest.ended("carol", r.json()["id"]), timeout=300)
    assert final["status"] == "failed" and "disk quota exceeded" in final["reason"], final
    assert "checkpoint at step" in final["reason"] and "kept" in final["reason"], final
    run_dir = guest.ws["carol"] / "runs" / "quota"
    info = json.loads(next(run_dir.rglob("run_info.json")).read_text())
    assert info["status"] == "interrupted" and 0 < info["step"] < 400
    assert list(run_dir.rglob("checkpoints/*"))


@pytest.mark.slow
def test_nothing_was_read_written_or_contacted(guest):
    """Runs last: the markers are in no response, no file of the data folder (bob's own aside) and not in the
    database; no job contacted the listener; only the jobs meant to run were queued."""
    wait_for(lambda: all(j["status"] in ("finished", "failed", "cancelled")
                         for u in ("alice", "carol") for j in guest.get(u, "/v1/jobs").json()["jobs"]), timeout=300)
    for text in guest.responses:
        assert not [m for m in MARKS if m in text], text[:300]
    bob_ws = guest.ws["bob"].resolve()
    for folder, _dirs, files in os.walk(guest.data):
        for name in files:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            blob = path.read_bytes()
            found = [m for m in MARKS if m.encode() in blob and not (m == MARK_BOB and bob_ws in path.resolve().parents)]
            assert not found, (path, found)
    assert guest.listener.count == 0
    run_ids = {j["run_id"] for u in ("alice", "carol") for j in guest.get(u, "/v1/jobs").json()["jobs"]}
    assert run_ids == {"allowed-tracker", "env-check", "late-link", "sql-attach", "quota"}


def test_sandbox_without_bubblewrap_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no /usr/bin: no bwrap
    out = subprocess.run([sys.executable, "-m", "tuneforge", "serve", "--sandbox", "--data-dir", str(tmp_path / "d"),
                          "--port", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "bubblewrap" in out.stderr + out.stdout, out
    assert "Traceback" not in out.stderr


def test_every_path_like_field_carries_the_marker():
    """A field that looks like a path (by name or description) must carry PathField, or be listed here as not one:
    the marker is what the server's rule walks, so a forgotten one is a hole."""
    from pydantic import BaseModel

    from tuneforge.config.load import _section_type
    from tuneforge.config.schema import Config, PathField

    not_paths = {"ModelConfig.revision", "DatasetSpec.custom", "DatasetSpec.text_unit", "DatasetSpec.query",
                 "DatasetSpec.format", "ExportConfig.hub_repo", "MlflowConfig.experiment", "WandbConfig.name",
                 "ModelConfig.pad_token", "DatasetSpec.split", "DatasetSpec.subset", "OutputConfig.overwrite"}
    looks = ("path", "dir", "file", "folder", "uri")
    seen, missing = set(), []

    def walk(model: type[BaseModel]):
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            sub = _section_type(info.annotation)
            if sub is not None:
                walk(sub)
                continue
            text = f"{name} {info.description or ''}".lower()
            is_str = "str" in str(info.annotation)
            marked = any(isinstance(m, PathField) for m in info.metadata)
            if is_str and not marked and any(w in name.lower() or f" {w}" in text for w in looks) \
                    and f"{model.__name__}.{name}" not in not_paths:
                missing.append(f"{model.__name__}.{name}")

    walk(Config)
    assert not missing, f"path-like fields without PathField: {missing}"


def test_job_mode_reads_no_dotenv_and_expands_nothing(tmp_path, monkeypatch, llama_dir):
    from tuneforge.config.confine import Rooms
    from tuneforge.config.load import load_config
    from tuneforge.errors import UserError

    (tmp_path / ".env").write_text("TF_FROM_DOTENV=1\n")
    (tmp_path / "alpaca.jsonl").write_text("{}\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"model": {"path": str(llama_dir)}, "data": {"train": [{"path": "alpaca.jsonl"}]}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEFORGE_JOB", "1")
    monkeypatch.setenv("TUNEFORGE_JOB_ROOMS", Rooms(tmp_path, read_only=(llama_dir.parent,)).to_json())
    monkeypatch.delenv("TF_FROM_DOTENV", raising=False)
    assert load_config(cfg).data.train[0].path == "alpaca.jsonl"
    assert "TF_FROM_DOTENV" not in os.environ
    cfg.write_text(json.dumps({"model": {"path": str(llama_dir)}, "data": {"train": [{"path": "alpaca.jsonl"}],
                                                                         "system_prompt": "${HOME}"}}))
    with pytest.raises(UserError, match=r"data\.system_prompt: '\$\{' in a job config"):
        load_config(cfg)
    monkeypatch.setenv("TUNEFORGE_JOB_ROOMS", Rooms(tmp_path).to_json())  # the model folder is not a room now
    cfg.write_text(json.dumps({"model": {"path": str(llama_dir)}, "data": {"train": [{"path": "alpaca.jsonl"}]}}))
    with pytest.raises(UserError, match="model.path: .* outside your workspace"):
        load_config(cfg)


def test_dotenv_that_is_not_utf8_is_named(tmp_path, monkeypatch):
    from tuneforge.config.load import load_dotenv_secrets
    from tuneforge.errors import UserError

    (tmp_path / ".env").write_bytes(b"A=1\nB=\xff\xfe\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"\.env: not UTF-8 text \(line 2"):
        load_dotenv_secrets(tmp_path)
