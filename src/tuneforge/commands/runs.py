"""Commands around runs: `plan` (memory before you spend), `doctor` (the machine), `report` and `runs`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tuneforge.cli import SetOpt, _load, app
from tuneforge.errors import UserError


@app.command()
def plan(config: Path, gpu: Optional[str] = typer.Option(None, "--gpu", help="A GPU by name (h100-80gb, a100-40gb, rtx4090-24gb, ...)."),
         memory: Optional[str] = typer.Option(None, "--memory", help="Memory per device instead of --gpu, e.g. 24GiB or 80GB."),
         nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) the run will use."),
         overrides: Optional[List[str]] = SetOpt):
    """Predict peak memory per device and time per step for CONFIG from the model's config alone (no weights)."""
    from tuneforge.model import plan as pl

    cfg = _load(config, overrides)
    if gpu and memory:
        raise UserError("plan: give --gpu or --memory, not both")
    if gpu and gpu.lower() not in pl.GPUS:
        raise UserError(f"plan: unknown --gpu {gpu!r} (known: {', '.join(sorted(pl.GPUS))}; or pass --memory 24GiB)")
    budget, peak_tflops = None, None
    if gpu:
        budget, peak_tflops = pl.GPUS[gpu.lower()][0] * pl.GiB, pl.GPUS[gpu.lower()][1]
    elif memory:
        budget = pl.parse_memory(memory)
    shape = pl.shape_from_config(pl.load_model_config(cfg.model.path, cfg.model.trust_remote_code))
    x = pl.inputs_from_config(cfg, nproc)
    result = pl.plan(shape, x, cfg.train.grad_accum, peak_tflops)
    print_plan(result, budget, gpu or memory)
    if budget is not None and result.peak > budget:
        fixes = pl.suggestions(shape, x, budget)
        console = Console()
        if fixes:
            console.print("to make it fit:")
            for label, alt in fixes:
                console.print(f"  - {label}: {pl.fmt_gib(alt.peak)}")
        else:
            console.print("no single change makes it fit: use more or larger GPUs (--nproc with deepspeed zero3) or a smaller model")
        raise typer.Exit(1)


def print_plan(p, budget: float | None, device: str | None) -> None:
    from tuneforge.model import plan as pl

    console = Console()
    console.print(f"plan: {pl.describe(p)}")
    table = Table()
    table.add_column("per device")
    table.add_column("memory", justify="right")
    for name, value in p.parts.items():
        table.add_row(name, pl.fmt_gib(value))
    table.add_row("[bold]peak[/]", f"[bold]{pl.fmt_gib(p.peak)}[/]")
    console.print(table)
    console.print(f"parameters {p.total_params / 1e6:,.1f}M, trainable {p.trainable / 1e6:,.2f}M, tokens per micro-batch {p.tokens_per_step}")
    if p.step_seconds is not None:
        console.print(f"time per optimizer step ~{p.step_seconds:.2f} s (at {pl.ASSUMED_MFU:.0%} MFU; rough)")
    for note in p.notes:
        console.print(note)
    if budget is not None:
        verdict = "fits" if p.peak <= budget else "does NOT fit"
        console.print(f"{verdict} in {pl.fmt_gib(budget)} ({device})")


@app.command()
def doctor():
    """Check the machine: Python, torch, accelerators, bf16, optional kernels, disk and caches."""
    from tuneforge.doctor import checks

    table = Table(title="tuneforge doctor")
    for col in ("check", "status", "detail", "hint"):
        table.add_column(col)
    for row in checks():
        table.add_row(row.name, "[green]ok[/]" if row.ok else "[yellow]missing[/]", row.detail, row.hint)
    Console().print(table)


@app.command()
def report(run_dir: Path):
    """Rebuild RUN_DIR/report.html (one self-contained page: curves, throughput, config, data, examples)."""
    from tuneforge.rundir import RUN_INFO, RunDir
    from tuneforge.train.observe.report import write_report

    if not RunDir(run_dir).exists():
        raise UserError(f"{run_dir}: not a tuneforge run directory (no {RUN_INFO})")
    Console().print(f"report: {write_report(run_dir)}")


@app.command()
def runs(folder: Path = typer.Argument(Path("runs"), help="Folder holding run directories (searched two levels deep).")):
    """A table of the runs under FOLDER: status, steps, loss, method, base model."""
    from tuneforge.train.observe.report import list_runs

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (pass the folder that holds your run directories)")
    rows = list_runs(folder)
    table = Table(title=f"runs in {folder}")
    for col in ("run", "status", "steps", "loss", "eval loss", "method", "base model", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("run", "status", "steps", "loss", "eval_loss", "method", "base_model", "updated")))
    Console().print(table if rows else f"no runs in {folder}")
