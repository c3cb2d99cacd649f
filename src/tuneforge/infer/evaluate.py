"""`tuneforge eval RUN_DIR`: the run's eval split scored by the base and the fine-tuned model, side by side.

With `--lm-eval TASKS` the same two models also go through EleutherAI's lm-evaluation-harness (its own
task definitions and metrics; tasks from the hub, or local task YAML files with --lm-eval-include).

Loss is cross-entropy per target token (the tokens training put loss on), so it is the number the
run logged as eval_loss; the generate-eval metric uses the run's own setting (exact or json).
"""

from __future__ import annotations

import math
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.export.parity import target_loss
from tuneforge.rundir import RunDir


def lm_eval_tasks(tasks: list[str], include: str | None):
    """Check the task names with lm-eval's own task index before any model loads; -> its TaskManager."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs lm-eval, which is not installed (pip install 'tuneforge[lmeval]')") from None
    import difflib

    if include and not Path(include).is_dir():
        raise UserError(f"--lm-eval-include {include}: not a folder (it holds lm-eval task YAML files)")
    manager = TaskManager(include_path=include) if include else TaskManager()
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            raise UserError(f"--lm-eval {task}: not an lm-eval task" + (f" (did you mean {', '.join(close)}?)" if close else
                            " (see `lm-eval ls tasks`, or give your own task YAML with --lm-eval-include DIR)"))
    return manager


def lm_eval_scores(model, tokenizer, tasks: list[str], manager, limit: int | None, chat: bool) -> dict:
    """{"lm_eval/<task>/<metric>": value} from lm-eval's harness run on the already loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    out = lm_eval.simple_evaluate(model=harness, tasks=tasks, task_manager=manager, limit=limit, apply_chat_template=chat,
                                  log_samples=False, bootstrap_iters=0)
    return {f"lm_eval/{task}/{key.split(',')[0]}": float(value) for task, metrics in out["results"].items()
            for key, value in metrics.items() if isinstance(value, (int, float)) and "_stderr" not in key}


def evaluate(run_dir: str, max_new_tokens: int = 64, samples: int | None = None, log=print, lm_eval: list[str] | None = None,
             lm_eval_include: str | None = None, lm_eval_limit: int | None = None, lm_eval_chat: bool = True) -> dict:
    import yaml

    from tuneforge.config.schema import GenerateEval
    from tuneforge.rundir import read_run_info, saved_data_config, update_run_info, write_json

    run = Path(run_dir)
    read_run_info(run)  # a clear error when RUN_DIR is not a run
    if not RunDir(run).config.is_file():
        raise UserError(f"{run}: no config.yaml; `eval` needs the run directory written by `tuneforge train`")
    # Only the sections eval needs are validated: data (to rebuild the same split) and the generate-eval metric.
    raw = yaml.safe_load(RunDir(run).config.read_text())
    data_cfg = saved_data_config(run)
    metric = GenerateEval(**(raw.get("train") or {}).get("generate_eval", {})).metric

    from tuneforge.data.prepare import prepare
    from tuneforge.metrics import score
    from tuneforge.model.generate import generate_batch
    from tuneforge.model.load import load_model
    from tuneforge.model.trained import load_trained, to_best_device

    manager = lm_eval_tasks(lm_eval, lm_eval_include) if lm_eval else None
    tuned, tokenizer, desc = load_trained(run)
    data = prepare(data_cfg, tokenizer, log=log)
    evals = data.eval[:samples] if samples else data.eval
    if not evals:
        raise UserError(f"{run}: the run has no eval split (set data.eval, data.eval_split or data.eval_size and train again)")
    convs = [s.messages for s in evals if isinstance(s.messages, list)]
    last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in convs]
    prompts, refs = [c[:i] for c, i in zip(convs, last)], [c[i]["content"] for c, i in zip(convs, last)]
    items = [(s.input_ids, s.labels) for s in evals]

    from tuneforge.progress import phase

    def scores(model, progress) -> dict:
        total, count = target_loss(model, items)
        out = {"eval_loss": total / max(1, count), "perplexity": math.exp(total / max(1, count))}
        progress.advance(len(items))
        if prompts:
            out.update(score(generate_batch(model, tokenizer, prompts, max_new_tokens, done=progress.advance), refs, metric))
        if lm_eval:  # the fine-tuned model was trained on chat turns: by default lm-eval renders through its template
            out.update(lm_eval_scores(model, tokenizer, lm_eval, manager, lm_eval_limit, lm_eval_chat))
        return out

    # Progress counts samples scored: the eval split's loss, then each generated answer, for both models.
    with phase("eval", total=2 * (len(items) + len(prompts)), log=log) as progress:
        result = {"samples": len(evals), "tuned": scores(tuned, progress)}
        del tuned
        base = to_best_device(load_model(desc["base"], dtype="auto"))  # a run dir names its base (LoRA and full)
        base.eval()
        result["base"] = scores(base, progress)
    report = run / "eval_report.json"
    write_json(report, result)
    update_run_info(run, eval=result)
    return {**result, "report": str(report)}
