"""A local Hugging Face Hub for tests: the HTTP routes `huggingface_hub.HfApi` (the installed 2.x) calls to create a
repo, commit files, read them back and ask who the token belongs to. A real server (stdlib, in a thread) at the
HTTP boundary, so `tuneforge push` runs unchanged in a child process pointed at it through HF_ENDPOINT.

    with FakeHub(tmp_path / "hub") as hub:
        proc = run_cli("push", run, "--repo", "me/x", env=hub.env())
        assert hub.file("me/x", "adapter_config.json") == (run / "final" / "adapter_config.json").read_bytes()

Every file is answered "regular" at preupload, so commits carry base64 content in their ndjson body (no LFS).
Pushed files land under ROOT/<type>s/<owner>/<name>/; `requests` records (method, path, Authorization) of each call.
Writes need `Authorization: Bearer <token>` when the hub has a token (401 otherwise, as the Hub answers).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
REPO_ROUTE = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
                        r"(?:/(?P<op>preupload|commit|tree|paths-info|revision)(?:/(?P<rest>.*))?)?$")
RESOLVE_ROUTE = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class FakeHub:
    def __init__(self, root: Path, token: str | None = "hf_fake_token"):
        self.root, self.token = Path(root), token
        self.repos: dict[tuple[str, str], dict] = {}  # (type, repo id) -> {"private": bool, "commits": [message, ...]}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment for a child process that talks to this hub (offline mode off: the hub is local)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": token or self.token or "",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0"}

    def folder(self, repo: str, repo_type: str = "model") -> Path:
        return self.root / f"{repo_type}s" / repo

    def files(self, repo: str, repo_type: str = "model") -> dict[str, bytes]:
        """{path in repo: bytes} of everything committed to the repo."""
        base = self.folder(repo, repo_type)
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def file(self, repo: str, path: str, repo_type: str = "model") -> bytes:
        return (self.folder(repo, repo_type) / path).read_bytes()

    def authorizations(self) -> set[str | None]:
        return {auth for _, _, auth in self.requests}


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the test's output stays the test's
            pass

        # ---- plumbing ---------------------------------------------------------------------------------
        def _reply(self, status: int, body=None, headers: dict | None = None, raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _not_found(self, what: str) -> None:
            self._reply(404, {"error": f"{what} not found"}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": f"{what} not found"})

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            with hub.lock:
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
            if path == "/api/whoami-v2":
                return self._whoami()
            if path == "/api/repos/create" and self.command == "POST":
                return self._create(json.loads(self._body() or b"{}"))
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            route = REPO_ROUTE.match(path)
            if route:
                return self._repo(route["type"][:-1], route["repo"], route["op"], route["rest"] or "", query)
            route = RESOLVE_ROUTE.match(path)
            if route:
                return self._resolve((route["type"] or "models")[:-1], route["repo"], route["path"])
            self._reply(404, {"error": f"fake hub: no route for {self.command} {path}"})

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

        # ---- routes -----------------------------------------------------------------------------------
        def _whoami(self) -> None:
            if self._authorized():
                self._reply(200, {"type": "user", "name": USER, "orgs": [],
                                  "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

        def _create(self, payload: dict) -> None:
            if not self._authorized():
                return
            repo_type = payload.get("type") or "model"
            repo = f"{payload.get('organization') or USER}/{payload['name']}"
            url = f"{hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo}"
            with hub.lock:
                if (repo_type, repo) in hub.repos:
                    return self._reply(409, {"error": "You already created this repo", "url": url})
                private = payload.get("private", payload.get("visibility") == "private")
                hub.repos[(repo_type, repo)] = {"private": bool(private), "commits": []}
            hub.folder(repo, repo_type).mkdir(parents=True, exist_ok=True)
            self._reply(200, {"url": url, "name": repo})

        def _repo(self, repo_type: str, repo: str, op: str | None, rest: str, query: dict) -> None:
            if (repo_type, repo) not in hub.repos:
                return self._not_found(f"{repo_type} repo {repo}")
            if op in ("preupload", "commit") and not self._authorized():
                return
            files = hub.files(repo, repo_type)
            sha = hashlib.sha1(repr(sorted((p, _git_oid(b)) for p, b in files.items())).encode()).hexdigest()
            if op == "preupload":
                wanted = json.loads(self._body())["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                    "oid": _git_oid(files[f["path"]]) if f["path"] in files else None}
                                                   for f in wanted]})
            if op == "commit":
                return self._commit(repo_type, repo, self._body())
            if op == "tree":  # rest = REVISION[/folder]
                folder = rest.partition("/")[2].strip("/")
                deep = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._reply(200, [self._entry(p, b) for p, b in files.items() if _listed(p, folder, deep)])
            if op == "paths-info":
                body = self._body()
                wanted = (json.loads(body) if body.startswith(b"{") else {k: v for k, v in parse_qs(body.decode()).items()})["paths"]
                return self._reply(200, [self._entry(p, files[p]) for p in ([wanted] if isinstance(wanted, str) else wanted) if p in files])
            info = hub.repos[(repo_type, repo)]
            self._reply(200, {"id": repo, "sha": sha, "private": info["private"], "siblings": [{"rfilename": p} for p in files],
                              "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0})

        @staticmethod
        def _entry(path: str, data: bytes) -> dict:
            return {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}

        def _commit(self, repo_type: str, repo: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            base = hub.folder(repo, repo_type)
            header = next((x["value"] for x in lines if x["key"] == "header"), {})
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    if value.get("encoding") != "base64":
                        return self._reply(400, {"error": f"fake hub: file {value['path']} not base64"})
                    target = base / value["path"]
                    if base.resolve() not in target.resolve().parents:
                        return self._reply(400, {"error": f"bad path {value['path']}"})
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif item["key"] == "deletedFile":
                    (base / value["path"]).unlink(missing_ok=True)
                elif item["key"] != "header":
                    return self._reply(400, {"error": f"fake hub: {item['key']} operations are not supported (only regular files)"})
            with hub.lock:
                hub.repos[(repo_type, repo)]["commits"].append(header.get("summary", ""))
                oid = hashlib.sha1(f"{repo}{len(hub.repos[(repo_type, repo)]['commits'])}".encode()).hexdigest()
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            self._reply(200, {"commitUrl": f"{hub.url}/{prefix}{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

        def _resolve(self, repo_type: str, repo: str, path: str) -> None:
            target = hub.folder(repo, repo_type) / path
            if (repo_type, repo) not in hub.repos or not target.is_file():
                return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            data = target.read_bytes()
            self._reply(200, raw=data, headers={"ETag": f'"{_git_oid(data)}"', "X-Repo-Commit": "0" * 40})

    return Handler


def _listed(path: str, folder: str, recursive: bool) -> bool:
    if folder and not path.startswith(folder + "/"):
        return False
    rest = path[len(folder) + 1:] if folder else path
    return recursive or "/" not in rest
