"""`tuneforge config import`, `tuneforge serve` (+ `serve token create`), `tuneforge launch`."""

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
                  out: Optional[Path] = typer.Option(None, "--out", help="Write the tuneforge config here (default: print it).")):
    """Translate an axolotl / LLaMA-Factory / X—LLM config into a tuneforge config; print what mapped and what not."""
    import yaml

    from tuneforge.config.importers import import_file, print_table

    result = import_file(file, source)
    print_table(result, console)
    text = yaml.safe_dump(result.config, sort_keys=False)
    if result.env:
        console.print(f"secrets found ({', '.join(result.env)}): not written; set them in the environment or a .env file")
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
          concurrency: Optional[int] = typer.Option(None, help="Jobs run at once (default: one per visible GPU, one on CPU)."),
          max_body: int = typer.Option(1 << 20, help="Largest accepted request body in bytes (larger: 413)."),
          gpus_per_job: int = typer.Option(1, min=1, help="GPUs per job (N > 1: `tuneforge train --nproc N`).")):
    """Serve the job API: POST /v1/jobs, GET /v1/jobs[/ID[/logs]], POST /v1/jobs/ID/cancel, artifacts."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from tuneforge.serve.api import create_app
    from tuneforge.serve.worker import default_concurrency

    application = create_app(data_dir, db, concurrency or max(1, default_concurrency() // gpus_per_job), max_body,
                             gpus_per_job=gpus_per_job)
    console.print(f"tuneforge serve: http://{host}:{port}  data: {data_dir.resolve()}")
    uvicorn.run(application, host=host, port=port, log_level="warning")


@token_app.command("create")
def token_create(user: str = typer.Option(..., "--user", help="The user the token acts as."),
                 data_dir: Path = DataDirOpt, db: Optional[str] = DbOpt):
    """Create an API token for USER; it is printed once and stored only as a hash."""
    from tuneforge.serve.auth import create_token
    from tuneforge.serve.store import Store

    token = create_token(Store(data_dir, db), user)
    Console().print(token, highlight=False, soft_wrap=True)
    console.print(f"token for {user!r} created (shown once; send it as 'Authorization: Bearer <token>')")


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
