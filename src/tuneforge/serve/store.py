"""The job store: jobs (the queue lives here, not in memory) and API tokens, in any SQLAlchemy database.

SQLite in the data directory by default (WAL mode, so API threads and the worker do not block each other);
PostgreSQL or any other SQLAlchemy URL with `--db`. Credentials are never columns: they exist only in the
server's memory and in a running job's environment.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Boolean, Float, Integer, String, Text, create_engine, event, func, inspect, select, text, update
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tuneforge.errors import UserError

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED, NEEDS_CREDENTIALS = (
    "queued", "running", "finished", "failed", "cancelled", "needs_credentials")
TERMINAL = (FINISHED, FAILED, CANCELLED)
UNFINISHED = (QUEUED, NEEDS_CREDENTIALS, RUNNING)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)  # submission order (the queue order)
    user: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(24), index=True)
    reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    config_json: Mapped[str] = mapped_column(Text)  # the translated tuneforge config (no secrets)
    report_json: Mapped[str] = mapped_column(Text, default="[]")  # the import table
    run_dir: Mapped[str] = mapped_column(Text)
    needs_credentials: Mapped[bool] = mapped_column(Boolean, default=False)  # secrets were given (names only known)
    credential_names: Mapped[str] = mapped_column(Text, default="")
    resume: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    ended_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    exit_code: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "run_id": self.run_id, "model_id": self.model_id, "kind": self.kind,
                "status": self.status, "reason": self.reason, "attempts": self.attempts, "resume": self.resume,
                "created_at": self.created_at, "started_at": self.started_at, "ended_at": self.ended_at,
                "exit_code": self.exit_code, "credentials": self.credential_names.split(",") if self.credential_names else []}


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # None: never
    revoked_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= now else "active"


class Heartbeat(Base):
    """One row the health check rewrites: proof that the job store still takes writes."""
    __tablename__ = "heartbeat"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)


class QuotaExceeded(Exception):
    pass


class Store:
    def __init__(self, data_dir: str | Path, url: str | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = url or f"sqlite:///{self.data_dir / 'jobs.db'}"
        sqlite = self.url.startswith("sqlite")
        try:
            self.engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {})
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise UserError(f"--db {self.url}: {str(exc).splitlines()[0]} (give an SQLAlchemy URL, e.g. "
                            "sqlite:///jobs.db or postgresql+psycopg://user@host/db)") from None
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # WAL: readers never block the writer; durable across SIGKILL
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        try:
            Base.metadata.create_all(self.engine)
            self._add_token_columns()
        except OperationalError as exc:
            raise UserError(f"--db {self.url}: cannot open the job store ({str(exc.orig).splitlines()[0]})") from None
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_token_columns(self) -> None:
        """A job store made before tokens could expire or be revoked gains those (nullable) columns."""
        have = {c["name"] for c in inspect(self.engine).get_columns("tokens")}
        with self.engine.begin() as conn:
            for name in ("expires_at", "revoked_at"):
                if name not in have:
                    conn.execute(text(f"ALTER TABLE tokens ADD COLUMN {name} FLOAT"))

    def writable(self) -> str | None:
        """None when a write commits; else why not (read-only file, disk full, database gone)."""
        try:
            with self.session.begin() as s:
                s.merge(Heartbeat(id=1, at=time.time()))
        except SQLAlchemyError as exc:
            return str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        return None

    # ---- jobs ----------------------------------------------------------------------------------------
    def add_job(self, max_unfinished: int | None = None, **fields) -> Job:
        """Queue a job; with `max_unfinished`, raise QuotaExceeded when its user already has that many unfinished."""
        with self.session.begin() as s:
            if max_unfinished is not None and s.scalar(_count_unfinished(fields["user"])) >= max_unfinished:
                raise QuotaExceeded(fields["user"])
            seq = (s.scalar(select(Job.seq).order_by(Job.seq.desc()).limit(1)) or 0) + 1
            job = Job(id=fields.pop("id", None) or uuid.uuid4().hex[:16], seq=seq, created_at=time.time(), **fields)
            s.add(job)
        return job

    def unfinished(self, user: str) -> int:
        with self.session() as s:
            return s.scalar(_count_unfinished(user))

    def get(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs(self, user: str | None = None, status: str | None = None, limit: int | None = None,
             after: int | None = None, newest_first: bool = False) -> list[Job]:
        """Jobs in submission order (or newest first); `after` is the `seq` where the previous page ended."""
        with self.session() as s:
            q = select(Job).order_by(Job.seq.desc() if newest_first else Job.seq)
            if user is not None:
                q = q.where(Job.user == user)
            if status is not None:
                q = q.where(Job.status == status)
            if after is not None:
                q = q.where(Job.seq < after if newest_first else Job.seq > after)
            if limit is not None:
                q = q.limit(limit)
            return list(s.scalars(q))

    def run_id_taken(self, user: str, run_id: str) -> Job | None:
        with self.session() as s:
            return s.scalar(select(Job).where(Job.user == user, Job.run_id == run_id).limit(1))

    def set(self, job_id: str, expect: tuple[str, ...] | None = None, **fields) -> bool:
        """Update a job; with `expect`, only if its status is one of those (an atomic compare-and-set)."""
        with self.session.begin() as s:
            q = update(Job).where(Job.id == job_id)
            if expect:
                q = q.where(Job.status.in_(expect))
            return s.execute(q.values(**fields)).rowcount == 1

    def next_queued(self, exclude: set[str]) -> list[Job]:
        with self.session() as s:
            return [j for j in s.scalars(select(Job).where(Job.status == QUEUED).order_by(Job.seq).limit(len(exclude) + 50))
                    if j.id not in exclude]

    # ---- tokens --------------------------------------------------------------------------------------
    def add_token(self, user: str, token_hash: str, expires_at: float | None = None) -> Token:
        with self.session.begin() as s:
            token = Token(user=user, token_hash=token_hash, created_at=time.time(), expires_at=expires_at)
            s.add(token)
        return token

    def user_for_hash(self, token_hash: str) -> str | None:
        """The user of a live token (not revoked, not expired), read from the database on every request."""
        now = time.time()
        with self.session() as s:
            return s.scalar(select(Token.user).where(Token.token_hash == token_hash, _live_token(now)))

    def tokens(self, user: str | None = None) -> list[Token]:
        with self.session() as s:
            q = select(Token).order_by(Token.id)
            return list(s.scalars(q.where(Token.user == user) if user else q))

    def revoke_tokens(self, token_id: int | None = None, user: str | None = None) -> int:
        """Revoke one token by id, or every live token of a user; returns how many were revoked."""
        now = time.time()
        with self.session.begin() as s:
            q = update(Token).where(_live_token(now))
            q = q.where(Token.id == token_id) if token_id is not None else q.where(Token.user == user)
            return s.execute(q.values(revoked_at=now)).rowcount


def config_of(job: Job) -> dict[str, Any]:
    return json.loads(job.config_json)


def _count_unfinished(user: str):
    """The number of a user's jobs that are queued, waiting for credentials or running (the per-user quota)."""
    return select(func.count()).select_from(Job).where(Job.user == user, Job.status.in_(UNFINISHED))


def _live_token(now: float):
    """Token.state(now) == "active" in SQL: not revoked, not expired."""
    return Token.revoked_at.is_(None) & (Token.expires_at.is_(None) | (Token.expires_at > now))
