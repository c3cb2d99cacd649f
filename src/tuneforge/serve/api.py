"""The HTTP API (FastAPI): submit, list, inspect, stream logs, cancel, download artifacts.

Every route needs `Authorization: Bearer <token>` (401 otherwise); a user sees only their own jobs (another
user's job is 404). Errors are JSON `{"detail": [{"loc", "msg"}]}` with a 4xx code; an unexpected failure is a
500 with an error id and no traceback (the traceback goes to the server's log). Quotas (serve/limits.py) are
checked at submit, before anything is stored; every response carries security headers (CSP, no framing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.rundir import RunDir
from tuneforge.serve.auth import user_for
from tuneforge.serve.limits import PAGE_MAX, Limits, Redactor, check_artifact_path, check_depth, check_job
from tuneforge.serve.paths import inside
from tuneforge.serve.schema import CredentialsRequest, RequestError, parse_request, pydantic_errors, refuse, validate_config
from tuneforge.serve.store import (
    CANCELLED, NEEDS_CREDENTIALS, QUEUED, RUNNING, TERMINAL, Job, QuotaExceeded, Store,
)
from tuneforge.serve.worker import Worker, has_checkpoint, log_path, read_run_info

log = logging.getLogger("tuneforge.serve")


class BodyLimit:
    """ASGI middleware: a body larger than `limit` bytes is a 413, whether or not Content-Length was sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"detail": [{"loc": "body", "msg": f"request body larger than {self.limit} bytes"}]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


BASE_HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cross-Origin-Opener-Policy": "same-origin"}
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Only with `serve --docs`: FastAPI's docs page loads Swagger UI from its CDN and starts it with an inline script.
DOCS_CSP = ("default-src 'none'; script-src https://cdn.jsdelivr.net 'unsafe-inline'; style-src https://cdn.jsdelivr.net; "
            "img-src https://fastapi.tiangolo.com data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")


def quota_error(most: int) -> RequestError:
    return refuse(429, "jobs", f"you already have {most} unfinished jobs (queued or running), the most this server "
                  "allows per user: wait for one to end or cancel one", {"Retry-After": "60"})


def security_headers(path: str) -> dict[str, str]:
    from tuneforge.serve.dashboard import PAGE_CSP

    csp = PAGE_CSP if path == "/" else DOCS_CSP if path.startswith("/docs") else API_CSP
    return {**BASE_HEADERS, "Content-Security-Policy": csp}


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (set unless the route set its own)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [(k.lower().encode(), v.encode()) for k, v in security_headers(scope.get("path", "")).items()]

        async def with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *[(k, v) for k, v in extra if k not in have]]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(data_dir: str | Path, db_url: str | None = None, concurrency: int = 1, max_body: int = 1 << 20,
               tick_s: float = 0.5, gpus_per_job: int = 1, limits: Limits | None = None, docs: bool = False) -> FastAPI:
    limits = limits or Limits()
    store = Store(data_dir, db_url)
    worker = Worker(store, concurrency, log=lambda m: log.warning(m), gpus_per_job=gpus_per_job)

    @asynccontextmanager
    async def lifespan(_app):
        async def loop():
            while True:
                try:
                    worker.tick()  # on the event-loop thread: children's PDEATHSIG follows this thread
                except Exception:  # noqa: BLE001 - one bad tick must not stop the queue; logged with traceback
                    log.exception("worker tick failed")
                await asyncio.sleep(tick_s)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    # The docs page loads its scripts from a CDN: off unless asked for (`serve --docs`); /openapi.json stays.
    app = FastAPI(title="tuneforge job API", version="1", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None)
    app.state.store, app.state.worker, app.state.limits = store, worker, limits
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so a 413 from BodyLimit carries the headers too

    @app.exception_handler(RequestError)
    async def _request_error(_req, exc: RequestError):
        return JSONResponse({"detail": exc.errors}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc: RequestValidationError):
        return JSONResponse({"detail": [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()]},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return JSONResponse({"detail": [{"loc": "path", "msg": str(exc.detail)}]}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(req: Request, exc: Exception):
        ref = uuid.uuid4().hex[:8]
        log.exception("internal error %s", ref)
        # served outside the middleware stack (Starlette's error middleware): the headers are added here
        return JSONResponse({"detail": [{"loc": "server", "msg": f"internal error (reference {ref}; see the server log)"}]},
                            status_code=500, headers=security_headers(req.url.path))

    def current_user(request: Request) -> str:
        user = user_for(store, request.headers.get("authorization"))
        if user is None:
            raise refuse(401, "authorization", "missing, unknown, revoked or expired bearer token (tuneforge serve token create --user NAME)",
                         {"WWW-Authenticate": "Bearer"})
        return user

    def own_job(job_id: str, user: str) -> Job:
        job = store.get(job_id) if len(job_id) <= 32 else None
        if job is None or job.user != user:
            raise refuse(404, "job_id", f"no job {job_id[:40]!r}")
        return job

    def shown(job: Job) -> dict[str, Any]:
        """A job as its user sees it: server paths in its reason made relative to their workspace."""
        out = job.public()
        out["reason"] = Redactor(store.data_dir, job.user, job.id)(out["reason"])
        return out

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request, user: str = Depends(current_user)) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise refuse(400, "body", f"not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None
        check_depth(body)
        if store.unfinished(user) >= limits.max_jobs:  # cheap first refusal: a flood costs no validation
            raise quota_error(limits.max_jobs)
        spec = parse_request(body, user)
        run_id = spec.run_id or uuid.uuid4().hex[:12]
        from tuneforge.serve.paths import confine

        if store.run_id_taken(user, run_id):
            raise refuse(409, "run_id", f"run_id {run_id!r} is already used by one of your jobs: choose another")
        cfg, run_dir = confine(spec.config, user, run_id, store.data_dir, worker.guest, spec.credentials)
        validate_config(cfg, "config")
        await run_in_threadpool(check_job, cfg, limits, store.data_dir)  # may count dataset lines: off the event loop
        try:  # no await from the quota count to the insert: one submit at a time reaches it
            job = store.add_job(max_unfinished=limits.max_jobs, user=user, run_id=run_id, model_id=spec.model_id,
                                kind=spec.kind, status=QUEUED, config_json=json.dumps(cfg),
                                report_json=json.dumps(spec.report), run_dir=str(run_dir),
                                needs_credentials=bool(spec.credentials),
                                credential_names=",".join(sorted(spec.credentials)))
        except QuotaExceeded:
            raise quota_error(limits.max_jobs) from None
        if spec.credentials:
            worker.credentials[job.id] = spec.credentials
        not_mapped = [r for r in spec.report if r["status"] == "not mapped"]
        return {"id": job.id, "status": job.status, "run_id": run_id, "not_mapped": not_mapped}

    @app.get("/v1/jobs")
    def list_jobs(status: str | None = None, limit: int | None = Query(None, ge=1, le=PAGE_MAX),
                  cursor: int | None = Query(None, ge=0, description="next_cursor of the previous page"),
                  newest_first: bool = False, user: str = Depends(current_user)) -> dict[str, Any]:
        """One page of your jobs (`limit`, default the server's page size); `next_cursor` fetches the next one."""
        size = limit or limits.page_size
        page = store.jobs(user=user, status=status, limit=size + 1, after=cursor, newest_first=newest_first)
        more = len(page) > size
        page = page[:size]
        return {"jobs": [shown(j) for j in page], "next_cursor": page[-1].seq if more else None}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        job = own_job(job_id, user)
        info = read_run_info(job.run_dir)
        metrics = _last_metrics(Path(job.run_dir))
        return {**shown(job), "progress": {"step": metrics.get("step") or info.get("step"), "total_steps": info.get("total_steps"),
                                             "run_status": info.get("status")},
                "metrics": metrics, "artifacts": _artifacts(Path(job.run_dir)), "import_report": json.loads(job.report_json)}

    @app.get("/v1/jobs/{job_id}/logs")
    async def logs(job_id: str, follow: bool = True, user: str = Depends(current_user)):
        job = own_job(job_id, user)
        path = log_path(store, job.id)
        redact = Redactor(store.data_dir, user, job.id)
        return StreamingResponse(_sse(store, job.id, path, follow, redact), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        job = own_job(job_id, user)
        if job.status in TERMINAL:
            raise refuse(409, "job_id", f"job {job_id} already ended ({job.status})")
        if store.set(job.id, (QUEUED, NEEDS_CREDENTIALS), status=CANCELLED, reason="cancelled by the user before it started",
                     ended_at=time.time(), cancel_requested=True):
            worker.credentials.pop(job.id, None)
        else:
            store.set(job.id, (RUNNING,), cancel_requested=True)  # the worker sends SIGTERM: checkpoint, then stop
        return shown(store.get(job.id))

    @app.post("/v1/jobs/{job_id}/credentials")
    def credentials(job_id: str, body: dict, user: str = Depends(current_user)) -> dict[str, Any]:
        job = own_job(job_id, user)
        from pydantic import ValidationError

        try:
            creds = CredentialsRequest.model_validate(body).credentials.env()
        except ValidationError as exc:
            raise RequestError(422, pydantic_errors(exc)) from None
        if job.status in TERMINAL or job.status == RUNNING:
            raise refuse(409, "job_id", f"job {job_id} is {job.status}: credentials can only be given to a waiting job")
        worker.credentials[job.id] = creds
        store.set(job.id, (NEEDS_CREDENTIALS, QUEUED), status=QUEUED, needs_credentials=bool(creds),
                  credential_names=",".join(sorted(creds)), reason=None)
        return shown(store.get(job.id))

    @app.get("/v1/jobs/{job_id}/artifacts")
    def artifacts(job_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        job = own_job(job_id, user)
        return {"artifacts": _artifacts(Path(job.run_dir), everything=True), "has_checkpoint": has_checkpoint(job.run_dir)}

    @app.get("/v1/jobs/{job_id}/artifacts/{path:path}")
    def download(job_id: str, path: str, user: str = Depends(current_user)):
        job = own_job(job_id, user)
        check_artifact_path(path)
        root = Path(job.run_dir)
        target = root / path
        if ".." in Path(path).parts or path.startswith("/") or not inside(target, root):
            raise refuse(400, "path", f"{path!r}: artifact paths stay inside the run directory")
        if not target.is_file():
            raise refuse(404, "path", f"no artifact {path!r}")
        return FileResponse(target, filename=target.name)

    @app.get("/healthz")
    def health():
        problem = store.writable()  # a real write: a read-only or full database is not "ok"
        body = {"ok": problem is None, "running": len(worker.procs), "concurrency": worker.concurrency}
        if problem:
            return JSONResponse({**body, "detail": [{"loc": "db", "msg": f"the job store takes no writes: {problem}"}]},
                                status_code=503)
        return body

    from tuneforge.serve.dashboard import add_dashboard

    add_dashboard(app, current_user, own_job)  # the page at / and the metric history its curves need
    return app


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).metrics
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 8192))
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return {}
    merged: dict[str, Any] = {}
    for line in lines[-20:]:
        try:
            merged.update(json.loads(line))
        except ValueError:
            continue
    return merged


def _artifacts(run_dir: Path, everything: bool = False) -> list[dict[str, Any]]:
    roots = [run_dir] if everything else [RunDir(run_dir).final]
    out = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out.append({"path": str(p.relative_to(run_dir)), "bytes": p.stat().st_size})
    return out


async def _sse(store: Store, job_id: str, path: Path, follow: bool, redact: Redactor):
    """Server-sent events: one `data:` per log line (server paths made relative); `event: end` with the final status."""
    offset, partial = 0, ""
    while True:
        chunk = ""
        if path.is_file():
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(1 << 16)
                offset += len(data)
                chunk = data.decode(errors="replace")
        text = partial + chunk
        lines = text.split("\n")
        partial = lines.pop()
        for line in lines:
            for piece in line.split("\r"):
                if piece.strip():
                    yield f"data: {redact(piece)}\n\n"
        if chunk:
            continue
        job = store.get(job_id)
        if not follow or job is None or job.status in TERMINAL or job.status == NEEDS_CREDENTIALS:
            if partial.strip():
                yield f"data: {redact(partial)}\n\n"
            yield f"event: end\ndata: {job.status if job else 'gone'}\n\n"
            return
        await asyncio.sleep(0.5)
