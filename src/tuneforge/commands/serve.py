"""`tuneforge config import`, `tuneforge serve` (+ `serve token create | list | revoke`), `tuneforge launch`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tuneforge.cli import app, config_app, console
from tuneforge.errors import UserError

serve_app = typer.Typer(invoke_without_command=True, help="Run the job server (HTTP API) and manage its tokens.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens (stored hashed).")
serve_app.add_typer(token_app, name="token")
app.add_typer(serve_app, name="serve")

DataDirOpt = typer.Option(Path("tuneforge-data"), "--data-dir", help="Where jobs, runs and the default SQLite database live.")
DbOpt = typer.Option(None, "--db", help="SQLAlchemy URL of the job store (default: sqlite:///DATA_DIR/jobs.db).")


@config_app.command("import")
def config_import(file: Path, source: str = typer.Option(..., "--from", help="axolotl | llamafactory | xllm"),
                  out: Optional[Path] = typer.Option(None, "--out", help="Write the tuneforge config here (default: print it)."),
                  allow_partial: bool = typer.Option(False, "--allow-partial",
                                                     help="Write the config even when some keys could not be carried over (they are listed).")):
    """Translate an axolotl / LLaMA-Factory / X—LLM config into a tuneforge config; print what mapped and what not.

    Exits 2 (writing nothing) when any key would be left out of the written config, unless --allow-partial."""
    import yaml

    from tuneforge.config.importers import import_file, print_table

    result = import_file(file, source)
    print_table(result, console)
    text = yaml.safe_dump(result.config, sort_keys=False)
    if result.env:
        console.print(f"secrets found ({', '.join(result.env)}): not written; set them in the environment or a .env file")
    left_out = [r.key for r in result.left_out()]
    if left_out and not allow_partial:
        raise UserError(f"{file}: {len(left_out)} key(s) would be left out of the tuneforge config ({', '.join(left_out)}; "
                        "reasons in the table): change them, or pass --allow-partial to write the rest")
    if left_out:
        console.print(f"--allow-partial: left out {', '.join(left_out)} (reasons in the table)")
    if out is None:
        print(text, end="")
        return
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name like tuneforge.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"wrote {out} (check it with `tuneforge config validate {out}`)")


@serve_app.callback()
def serve(ctx: typer.Context, host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8000, help="TCP port."), data_dir: Path = DataDirOpt, db: Optional[str] = DbOpt,
          concurrency: Optional[int] = typer.Option(None, min=0, help="Jobs run at once (default: one per visible GPU, one on CPU; 0: queue only, run none, e.g. while draining a machine)."),
          max_body: int = typer.Option(1 << 20, help="Largest accepted request body in bytes (larger: 413)."),
          gpus_per_job: int = typer.Option(1, min=1, help="GPUs per job (N > 1: `tuneforge train --nproc N`)."),
          max_jobs_per_user: int = typer.Option(20, min=1, help="Unfinished jobs (queued or running) one user may have; more: 429."),
          max_checkpoints: int = typer.Option(200, min=1, help="Checkpoints one job may write (train.max_steps / train.save_every); more: 422."),
          max_num_proc: Optional[int] = typer.Option(None, min=1, help="Largest data.num_proc a job may ask for (default: this machine's cores)."),
          disk_quota: Optional[str] = typer.Option(None, help="Disk per user (workspace + data cache, checkpoints included), e.g. 50G; 0: none (default 20G)."),
          page_size: int = typer.Option(50, min=1, max=200, help="Jobs per page of GET /v1/jobs when the request gives no ?limit=."),
          docs: bool = typer.Option(False, "--docs", help="Serve the interactive API docs at /docs (they load Swagger UI from a CDN)."),
          allow_tracker: list[str] = typer.Option([], "--allow-tracker", help="A tracker URL jobs may contact (MLflow http(s) URI, W&B https://api.wandb.ai); repeat for more. Default: none."),
          sandbox: bool = typer.Option(False, "--sandbox", help="Run each job under bubblewrap: only its workspace writable, no other user's files, no network unless --allow-tracker.")):
    """Serve the job API: POST /v1/jobs, GET /v1/jobs[/ID[/logs]], POST /v1/jobs/ID/cancel, artifacts."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from tuneforge.serve.api import create_app
    from tuneforge.serve.limits import Limits, parse_size
    from tuneforge.serve.paths import GuestPolicy
    from tuneforge.serve.worker import default_concurrency, sandbox_problem

    limits = Limits(max_jobs=max_jobs_per_user, max_checkpoints=max_checkpoints, page_size=page_size)
    if max_num_proc:
        limits.max_num_proc = max_num_proc
    if disk_quota is not None:
        limits.disk_quota = parse_size(disk_quota) or None
    # Every option is checked before the store is opened: a refused start leaves nothing behind.
    guest = GuestPolicy(tuple(allow_tracker), sandbox, limits.disk_quota)
    problem = sandbox_problem() if sandbox else None
    if problem:
        raise UserError(problem)
    if concurrency is None:
        concurrency = max(1, default_concurrency() // gpus_per_job)
    application = create_app(data_dir, db, concurrency, max_body,
                             gpus_per_job=gpus_per_job, limits=limits, docs=docs)
    application.state.worker.guest = guest
    console.print(f"tuneforge serve: http://{host}:{port}  data: {data_dir.resolve()}")
    uvicorn.run(application, host=host, port=port, log_level="warning")


@token_app.command("create")
def token_create(user: str = typer.Option(..., "--user", help="The user the token acts as."),
                 expires: Optional[str] = typer.Option(None, "--expires", help="When it stops working: 30d, 12h, 2w or a date (2027-01-31)."),
                 data_dir: Path = DataDirOpt, db: Optional[str] = DbOpt):
    """Create an API token for USER; it is printed once and stored only as a hash."""
    from tuneforge.serve.auth import create_token
    from tuneforge.serve.limits import parse_expires
    from tuneforge.serve.store import Store

    expires_at = parse_expires(expires) if expires else None
    token = create_token(Store(data_dir, db), user, expires_at)
    Console().print(token, highlight=False, soft_wrap=True)
    until = f", expires {_when(expires_at)}" if expires_at else ""
    console.print(f"token for {user!r} created (shown once{until}; send it as 'Authorization: Bearer <token>')")


def _when(ts: float | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ts else "never"


@token_app.command("list")
def token_list(user: Optional[str] = typer.Option(None, "--user", help="Only this user's tokens."),
               data_dir: Path = DataDirOpt, db: Optional[str] = DbOpt):
    """List tokens (id, user, created, expires, state); the tokens themselves are never stored."""
    import time

    from tuneforge.serve.store import Store

    rows = Store(data_dir, db).tokens(user)
    print(f"{'id':>4}  {'user':<20} {'created':<20} {'expires':<20} state")
    for t in rows:
        print(f"{t.id:>4}  {t.user:<20} {_when(t.created_at):<20} {_when(t.expires_at):<20} {t.state(time.time())}")
    if not rows:
        console.print("no tokens" + (f" for {user!r}" if user else ""))


@token_app.command("revoke")
def token_revoke(token_id: Optional[int] = typer.Argument(None, help="The token's id (see `serve token list`)."),
                 user: Optional[str] = typer.Option(None, "--user", help="Revoke every live token of this user instead."),
                 data_dir: Path = DataDirOpt, db: Optional[str] = DbOpt):
    """Revoke a token (or all of a user's): requests with it get 401 from the next one on."""
    from tuneforge.serve.store import Store

    if (token_id is None) == (user is None):
        raise UserError("serve token revoke: give a token id or --user NAME (one of them)")
    n = Store(data_dir, db).revoke_tokens(token_id, user)
    if n == 0:
        what = f"token {token_id}" if token_id is not None else f"user {user!r}"
        raise UserError(f"serve token revoke: {what} has no live token (see `tuneforge serve token list`)")
    console.print(f"revoked {n} token{'s' if n != 1 else ''}")


@app.command()
def launch(config: Path, on: str = typer.Option(..., "--on", help="skypilot"),
           out: Optional[Path] = typer.Option(None, "--out", help="Where to write the task YAML (default: next to CONFIG)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Only write the task file; do not start it."),
           gpus: Optional[str] = typer.Option(None, help="Override the accelerator, e.g. A100:1 or H100:8.")):
    """Run a training config on cloud GPUs through SkyPilot (writes a SkyPilot task, then `sky launch`es it)."""
    if on != "skypilot":
        raise UserError(f"--on {on!r}: only skypilot is supported")
    from tuneforge.config import load_config
    from tuneforge.serve.skypilot import launch_task, write_task

    cfg = load_config(config)
    path = write_task(cfg, config, out, gpus)
    console.print(f"wrote SkyPilot task {path}")
    if not dry_run:
        launch_task(path, console.print)
