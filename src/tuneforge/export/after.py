"""What `tuneforge train` does after a finished run, as the config's `export:` section asks: merge -> quantize -> push.

Each step is the same function its own command runs (`tuneforge merge`, `quantize`, `push`), on the main process
only, and only after a run that ended `finished` (never after an interrupted or failed one). Each step's outcome
lands in run_info.json under `export` (done / failed / skipped). A failed step never touches the trained run:
its status stays `finished`, the later steps are skipped, and the command exits with the step's own code
(2: bad input, an unreachable hub or a refused token; 3: an artifact that failed its parity check) in one line
that says how to retry that step alone. The hub token comes from the environment (HF_TOKEN), never from disk.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ParityError, UserError

STEPS = ("merge", "quantize", "push")


def check(cfg) -> None:
    """Before training starts: every step the export section asks for can run here (one line otherwise)."""
    e = cfg.export
    if e.quantize is not None:
        from tuneforge.export.gptq import gptqmodel_version

        try:
            gptqmodel_version()
        except UserError as exc:
            raise UserError(f"export.quantize: {exc} (or remove export.quantize)") from None
        if e.quantize.calibration and not Path(e.quantize.calibration).is_file():
            raise UserError(f"export.quantize.calibration: {e.quantize.calibration}: file not found (give a jsonl/json/csv/parquet "
                            "of chat or prompt/completion rows, or remove it to calibrate on the run's own data)")
    if e.hub_repo:
        from tuneforge.hub import check_ready

        check_ready("export.hub_repo", e.hub_repo, ", or remove export.hub_repo")


def planned(cfg) -> list[str]:
    e = cfg.export
    return [step for step, on in zip(STEPS, (e.merge, e.quantize is not None, bool(e.hub_repo))) if on]


def push_what(cfg) -> str:
    """export.hub_push, with auto = the last artifact this config makes (a full fine-tune's whole weights count as merged)."""
    e = cfg.export
    if e.hub_push != "auto":
        return e.hub_push
    if e.quantize is not None:
        return "gptq"
    return "merged" if e.merge or cfg.train.finetune != "lora" else "adapter"


def after_train(cfg, log=print) -> dict | None:
    """Run the planned steps in order on a finished run; -> {step: outcome}, or None when nothing is planned."""
    from tuneforge.rundir import read_run_info, update_run_info

    steps = planned(cfg)
    if not steps:
        return None
    run_dir = cfg.run_dir
    status = read_run_info(run_dir).get("status")
    if status != "finished":
        log(f"export: {', '.join(steps)} skipped (the run is {status}, not finished)")
        return None
    outcomes: dict[str, dict] = {}
    for i, step in enumerate(steps):
        log(f"export: {step} ({i + 1}/{len(steps)})")
        try:
            outcomes[step] = {"status": "done", **_run_step(step, cfg, log)}
        except Exception as exc:
            from tuneforge.rundir import one_line

            outcomes[step] = {"status": "failed", "error": one_line(exc)}
            outcomes.update({later: {"status": "skipped", "reason": f"{step} failed"} for later in steps[i + 1:]})
            update_run_info(run_dir, export=outcomes)
            raise _step_failure(step, exc, cfg) from None
        update_run_info(run_dir, export=outcomes)
    return outcomes


def _run_step(step: str, cfg, log) -> dict:
    run_dir, e = str(cfg.run_dir), cfg.export
    if step == "merge":
        from tuneforge.export.merge import merge

        r = merge(run_dir, log=log)
        return {"dir": r["out"], "max_rel_logit_diff": r["max_rel_logit_diff"], "check": r["check"], "tolerance": r["tolerance"]}
    if step == "quantize":
        from tuneforge.export.gptq import quantize

        q = e.quantize
        r = quantize(run_dir, None, q.method, q.bits, q.group_size, q.calibration, q.samples, log=log)
        return {"dir": r["out"], "perplexity_increase": r["perplexity_increase"]}
    from tuneforge.export.push import push

    what = push_what(cfg)
    r = push(run_dir, e.hub_repo, what, private=e.hub_private, log=log)
    return {"repo": r["repo"], "what": what, "url": r["url"], "commit": r["commit"], "files": len(r["files"])}


def _step_failure(step: str, exc: Exception, cfg) -> Exception:
    """The step's own error, one line, saying the run is kept and how to redo just this step; a bug re-raises as is."""
    run_dir, e = cfg.run_dir, cfg.export
    retry = {"merge": f"tuneforge merge {run_dir}",
             "quantize": f"tuneforge quantize {run_dir} --method gptq --bits {e.quantize.bits if e.quantize else 4}",
             "push": f"tuneforge push {run_dir} --repo {e.hub_repo} --what {push_what(cfg)}{' --private' if e.hub_private else ''}"}[step]
    tail = f" [the trained run in {run_dir} is finished and kept; redo this step with `{retry}`]"
    if isinstance(exc, ParityError):
        return ParityError(f"{step} after training: {exc}{tail}")
    from tuneforge.errors import user_message

    message = user_message(exc)
    if message is None:
        return exc
    return UserError(f"{step} after training failed: {message}{tail}")
