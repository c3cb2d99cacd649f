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

from sqlalchemy import Boolean, Float, Integer, String, Text, create_engine, event, select, update
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tuneforge.errors import UserError

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED, NEEDS_CREDENTIALS = (
    "queued", "running", "finished", "failed", "cancelled", "needs_credentials")
TERMINAL = (FINISHED, FAILED, CANCELLED)


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
        except OperationalError as exc:
            raise UserError(f"--db {self.url}: cannot open the job store ({str(exc.orig).splitlines()[0]})") from None
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    # ---- jobs ----------------------------------------------------------------------------------------
    def add_job(self, **fields) -> Job:
        with self.session.begin() as s:
            seq = (s.scalar(select(Job.seq).order_by(Job.seq.desc()).limit(1)) or 0) + 1
            job = Job(id=fields.pop("id", None) or uuid.uuid4().hex[:16], seq=seq, created_at=time.time(), **fields)
            s.add(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs(self, user: str | None = None, status: str | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).order_by(Job.seq)
            if user is not None:
                q = q.where(Job.user == user)
            if status is not None:
                q = q.where(Job.status == status)
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
    def add_token(self, user: str, token_hash: str) -> None:
        with self.session.begin() as s:
            s.add(Token(user=user, token_hash=token_hash, created_at=time.time()))

    def user_for_hash(self, token_hash: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(Token.user).where(Token.token_hash == token_hash))


def config_of(job: Job) -> dict[str, Any]:
    return json.loads(job.config_json)
