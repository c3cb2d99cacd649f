"""`tuneforge` command line. Imports stay lazy: `tuneforge --help` and config checks load no torch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from tuneforge.errors import ParityError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs on your own data: prepare -> train -> merge -> generate / chat.")
config_app = typer.Typer(no_args_is_help=True, help="Validate, show or describe configs.")
data_app = typer.Typer(no_args_is_help=True, help="Look at prepared data.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")
MAX_NEW_TOKENS = 32_768  # far above any chat reply; the model's context length is checked once it is loaded


def _finite(lo: float, hi: float, lo_open: bool = False):
    """Option callback: a finite number in [lo, hi] (click's FloatRange lets nan through)."""
    import math

    def check(value: float) -> float:
        if value is not None and (not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo)):
            raise typer.BadParameter(f"{value} is not a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value

    return check


def _temperature():
    return typer.Option(0.0, min=0.0, max=100.0, callback=_finite(0.0, 100.0), help="0 = greedy; higher = more random.")


def _max_new_tokens(default: int):
    return typer.Option(default, min=1, max=MAX_NEW_TOKENS, help="Most tokens generated per reply.")


def _load(config: Path, overrides: Optional[List[str]]):
    from tuneforge.config import load_config

    return load_config(config, overrides or [])


@app.command()
def train(config: Path, overrides: Optional[List[str]] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output.dir."),
          nproc: int = typer.Option(1, "--nproc", min=1, max=1024, help="Training processes on this machine (one per GPU; DDP, or train.deepspeed / train.fsdp).")):
    """Fine-tune a model as described by CONFIG (YAML or JSON)."""
    cfg = _load(config, overrides)
    from tuneforge.export.after import after_train, check as check_export

    check_export(cfg)  # a merge/quantize/push the config asks for must be possible before an hour of training
    if cfg.model.device_map and nproc <= 1:
        from tuneforge.model.load import check_device_map

        check_device_map()  # fewer than 2 GPUs: refused before the data is prepared, not ignored
    from tuneforge.train.core import launch

    launch.check_launchable(nproc)
    if launch.needs_launch(cfg, nproc):
        from tuneforge.train.core.engines import check
        from tuneforge.train.run import trainer

        check(cfg.train)  # engine and run-directory errors show once, here, before any process starts
        trainer(cfg, resume=resume)
        code = launch.launch(nproc, launch.train_args(config, overrides, resume), console.print)
        if code:
            raise typer.Exit(code)
        return  # the main rank printed the summary
    from tuneforge.train.run import run

    main_rank = os.environ.get("RANK", "0") == "0"  # other ranks train silently
    summary = run(cfg, resume=resume, log=console.print if main_rank else (lambda *a, **k: None))
    if main_rank:
        _print_summary(cfg.run_dir, summary)
        after_train(cfg, log=console.print)  # export: merge -> quantize -> push, on the finished run only


def _print_summary(run_dir: Path, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"run finished: {run_dir}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("train loss (last step)", "", f"{summary['final_loss']:.4f}")
    if "eval_loss" in summary:
        table.add_row("eval loss", "", f"{summary['eval_loss']:.4f}")
    before, after = summary.get("generate_eval_before", {}), summary.get("generate_eval_after", {})
    for key in after:
        table.add_row(key.removeprefix("gen_") + " (held-out)", f"{before.get(key, float('nan')):.1%}", f"{after[key]:.1%}")
    for key, name in (("eval_reward_accuracy", "reward accuracy (held-out pairs)"), ("eval_reward_margin", "reward margin (held-out pairs)")):
        if key in summary:  # preference methods (train/dpo.py)
            was = summary.get(f"{key}_before")
            table.add_row(name, "" if was is None else f"{was:.4g}", f"{summary[key]:.4g}")
    data = summary.get("data") or {}
    if data:  # what preparing the data cut or left out (details in RUN_DIR/data_report.json)
        table.add_row("samples truncated to data.max_length", "", str(data.get("truncated", 0)))
        table.add_row("bad rows skipped (data.on_bad_row: skip)", "", str(data.get("skipped_rows", 0)))
    Console().print(table)


@app.command()
def prepare(config: Path, overrides: Optional[List[str]] = SetOpt,
            push_to: Optional[str] = typer.Option(None, "--push-to", help="Also push cleaned.jsonl, train.jsonl and val.jsonl to this Hub dataset repo (written to data.export_dir, default RUN_DIR/data)."),
            private: bool = typer.Option(False, "--private", help="With --push-to: create the dataset repo private.")):
    """Tokenize and cache the data (run once before distributed training)."""
    cfg = _load(config, overrides)
    from tuneforge.data import export
    from tuneforge.data.prepare import prepare as run_prepare
    from tuneforge.model.load import load_tokenizer, resolve_model_dir

    from tuneforge.rundir import RunDir, write_json

    from tuneforge.outputs import check_prepare_dir, mark_output_dir

    check_prepare_dir(cfg.run_dir, cfg.config_path, cfg.output.overwrite)
    if push_to:
        if cfg.train.method == "grpo":
            raise UserError("--push-to: train.method grpo's prompt rows are not exported (push the source file itself)")
        export.check_push(push_to)  # no token / offline / a bad repo id: said before any work
        cfg.data.export_dir = cfg.data.export_dir or str(cfg.run_dir / "data")
    tok = load_tokenizer(resolve_model_dir(cfg.model, console.print, need_weights=False), cfg.model)
    if cfg.train.method == "grpo":  # prompt rows: rendered and checked row by row; nothing to cache or export
        from tuneforge.data.prompts import prepare_prompts

        data = prepare_prompts(cfg.data, tok, cfg.grpo.max_completion_length)
    else:
        data = run_prepare(cfg.data, tok, log=console.print)
    mark_output_dir(cfg.run_dir, "run")
    write_json(RunDir(cfg.run_dir).data_report, data.report)
    _print_report(data)
    Console().print(f"report: {RunDir(cfg.run_dir).data_report}  cache: {cfg.data.cache_dir}/{data.fingerprint}"
                    + (f"  data: {data.export_dir}" if data.export_dir else ""))
    if push_to:
        pushed = export.push(data.export_dir, push_to, private, log=console.print)
        Console().print(f"pushed {len(pushed['files'])} files -> {pushed['url']}")


def _print_report(data) -> None:
    from rich.table import Table

    table = Table(title=f"prepared data {data.fingerprint} ({'cache hit' if data.cache_hit else 'new'})")
    table.add_column("item")
    table.add_column("value", justify="right")
    for k, v in data.report.items():
        if k == "dropped":
            for reason, n in v.items():
                table.add_row(f"dropped: {reason}", str(n))
        elif k == "datasets":
            for d in v:
                table.add_row(f"dataset {d['name']}", f"{d['used']} used of {d['converted']}")
        elif isinstance(v, dict):
            for sub, x in v.items():
                table.add_row(f"{k} {sub}", str(x))
        elif k not in ("fingerprint", "bad_row_examples"):
            table.add_row(k, str(v))
    Console().print(table)


@app.command()
def merge(run_dir: Path, out: Optional[Path] = typer.Option(None, help="Output dir (default RUN_DIR/merged)."),
          tolerance: Optional[float] = typer.Option(None, callback=_finite(0.0, 1e3, lo_open=True),
                                                    help="Max logit difference allowed between adapter and merged model: absolute for "
                                                    "float32 (default 1e-3), relative to the largest |logit| for bfloat16 (3e-2), "
                                                    "float16 (5e-3) or a QLoRA base (1e-2)."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier merge at --out (only a tuneforge merge)."),
          dtype: str = typer.Option("float32", help="Saved weights dtype: float32, bfloat16 or float16 (half types: relative parity)."),
          max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 2GB or 500MB.")):
    """Fuse a LoRA adapter into full weights, loadable by plain transformers; checks logit parity."""
    from tuneforge.export.merge import merge as run_merge

    report = run_merge(str(run_dir), str(out) if out else None, tolerance, overwrite=overwrite, dtype=dtype,
                       max_shard_size=max_shard_size, log=console.print)
    from tuneforge.export.merge import verdict

    Console().print(f"merged -> {report['out']}  ({report['shards']} shard(s))  {verdict(report)}  OK")


@app.command()
def generate(path: Path, prompt: str = typer.Option(..., help="The user message."),
             system: Optional[str] = typer.Option(None, help="System prompt."),
             max_new_tokens: int = _max_new_tokens(128), temperature: float = _temperature()):
    """Answer one prompt with a run dir, adapter dir or model dir."""
    from tuneforge.infer.chat import generate_once

    print(generate_once(str(path), prompt, system, max_new_tokens, temperature))


@app.command()
def chat(path: Path, system: Optional[str] = typer.Option(None, help="System prompt."),
         max_new_tokens: int = _max_new_tokens(256), temperature: float = _temperature()):
    """Interactive chat with streaming output (/reset, /exit)."""
    from tuneforge.infer.chat import chat_loop

    chat_loop(str(path), system, max_new_tokens, temperature)


@config_app.command("validate")
def config_validate(config: Path, overrides: Optional[List[str]] = SetOpt):
    """Check CONFIG: unknown keys, bad values, impossible combinations, local paths. Exit 2 on error."""
    from rich.markup import escape

    from tuneforge.config.load import check_paths

    cfg = _load(config, overrides)
    skipped = check_paths(cfg)
    if cfg.train.deepspeed:  # the JSON's own sections and "auto" values; what needs a GPU is checked where it trains
        from tuneforge.train.core.engines import deepspeed_config

        deepspeed_config(cfg.train, cfg.train.mixed_precision, cuda=True)
    out = Console()
    out.print(f"{escape(str(config))}: valid (schema, combinations, local paths exist and are readable)", highlight=False)
    for note in skipped:
        out.print(f"  not checked: {escape(note)}", highlight=False)


@config_app.command("show")
def config_show(config: Path, overrides: Optional[List[str]] = SetOpt):
    """Print the fully resolved config (defaults filled in) as YAML."""
    import yaml

    print(yaml.safe_dump(_load(config, overrides).model_dump(mode="json"), sort_keys=False), end="")


@config_app.command("schema")
def config_schema():
    """Print the JSON schema of the config."""
    from tuneforge.config import Config

    print(json.dumps(Config.model_json_schema(), indent=2))


@data_app.command("inspect")
def data_inspect(config: Path, split: str = typer.Option("train", help="train or eval."),
                 limit: int = typer.Option(3, min=1, max=100_000, help="How many samples to show."),
                 as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {text, input_ids, labels}."),
                 overrides: Optional[List[str]] = SetOpt):
    """Show rendered samples with the trained tokens highlighted (needs only the tokenizer)."""
    cfg = _load(config, overrides)
    if split not in ("train", "eval"):
        raise UserError(f"--split {split!r}: use train or eval")
    from tuneforge.data.inspect import inspect_samples

    inspect_samples(cfg, split, limit, as_json)


# Commands of later stages live in their own modules (tuneforge/commands/), each registering on `app`.
import tuneforge.commands  # noqa: E402,F401


def main() -> None:
    import warnings

    from tuneforge.errors import run_cli

    # Library deprecation chatter (peft/transformers) is not actionable for a user of tuneforge.
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(run_cli(lambda: app(standalone_mode=False), console))
