"""After training: export (GGUF + Ollama), quantize (GPTQ), predict, eval, push. Imports stay lazy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tuneforge.cli import app, console
from tuneforge.errors import UserError

OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an earlier artifact of the same kind at --out (only tuneforge's own).")


@app.command()
def export(run_dir: Path, format: str = typer.Option("gguf", "--format", help="Export format: gguf (llama.cpp / Ollama)."),
           type: str = typer.Option("f16", "--type", help="GGUF tensor type: f32, f16, bf16, q8_0 (q4_k_m with llama.cpp's llama-quantize)."),
           out: Optional[Path] = typer.Option(None, help="Output folder (default RUN_DIR/gguf-TYPE)."), overwrite: bool = OverwriteOpt):
    """Write one GGUF file + an Ollama Modelfile; read it back and prove it answers like the trained model."""
    if format != "gguf":
        raise UserError(f"--format {format}: only gguf is supported (GPTQ is `tuneforge quantize`, merged weights `tuneforge merge`)")
    from tuneforge.export.gguf import export_gguf

    r = export_gguf(str(run_dir), str(out) if out else None, type, overwrite, log=console.print)
    Console(soft_wrap=True).print(f"gguf -> {r['path']} (tolerance: relative |logit diff| {r['tolerance_rel']:g})")
    for reader, part in (("transformers", r), ("llama.cpp", r.get("llama_cpp") or {})):
        Console(soft_wrap=True).print(f"  {reader}: " + reader_summary(part))


def reader_summary(part: dict) -> str:
    if part.get("readback") != "ok":
        return f"not verified: {part.get('readback', 'not run')}"
    return (f"max |logit diff| {part['max_abs_logit_diff']:.2e} (relative {part['max_rel_logit_diff']:.2e}), next-token agreement "
            f"{part['top1_agreement']:.1%}, chat template embedded: {part['chat_template_embedded']}, prompt ids equal: "
            f"{part.get('prompt_ids_equal')}, greedy answers equal {part.get('answer_agreement', 0):.0%}")


@app.command()
def quantize(path: Path, method: str = typer.Option("gptq", "--method", help="Quantization method: gptq."),
             bits: int = typer.Option(4, "--bits", help="Bits per weight: 4 or 8."),
             group_size: int = typer.Option(128, "--group-size", help="Weights sharing one scale (power of two, or -1 per row)."),
             calibration: Optional[Path] = typer.Option(None, help="Calibration data file (default: the run's own training data)."),
             samples: int = typer.Option(128, min=1, max=100000, help="Calibration samples to draw."),
             max_ppl_increase: float = typer.Option(0.25, "--max-ppl-increase", min=0.0, max=100.0,
                                                    help="Fail (exit 3) when eval perplexity rises by more than this share."),
             out: Optional[Path] = typer.Option(None, help="Output folder (default RUN_DIR/gptq-<bits>bit)."), overwrite: bool = OverwriteOpt):
    """GPTQ-quantize a run or model (GPTQModel), calibrated on the run's own data; read back with transformers and compared."""
    from tuneforge.export.gptq import quantize as run_quantize

    r = run_quantize(str(path), str(out) if out else None, method, bits, group_size, str(calibration) if calibration else None,
                     samples, max_ppl_increase, overwrite, log=console.print)
    Console(soft_wrap=True).print(f"gptq {bits}-bit -> {r['out']}\n  eval perplexity {r['perplexity_before']:.4g} -> {r['perplexity_after']:.4g} "
                    f"({r['perplexity_increase']:+.1%}), max |logit diff| {r['max_abs_logit_diff']:.3g}, next-token agreement "
                    f"{r['top1_agreement']:.1%}, greedy answers equal {r['answer_agreement']:.0%}  OK")


@app.command()
def predict(path: Path, data: Path = typer.Option(..., help="jsonl/json of chat rows (messages) or prompt/completion rows."),
            out: Optional[Path] = typer.Option(None, help="Predictions jsonl (default: predictions.jsonl next to --data)."),
            max_new_tokens: int = typer.Option(128, min=1, max=32768), temperature: float = typer.Option(0.0, min=0.0, max=100.0, help="0 = greedy."),
            top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0), batch_size: int = typer.Option(8, min=1, max=4096),
            limit: Optional[int] = typer.Option(None, min=1, help="Only the first N rows."), seed: int = typer.Option(0),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file.")):
    """Batch generation over a dataset -> jsonl (prompt, reference, prediction) + exact match, ROUGE-L, BLEU, perplexity."""
    from tuneforge.infer.predict import predict as run_predict

    r = run_predict(str(path), data, out, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    batch_size=batch_size, limit=limit, seed=seed, overwrite=overwrite, log=console.print)
    Console(soft_wrap=True).print(f"predictions -> {r['out']}  ({r['rows']} rows)\n" + "  ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items()))


@app.command("eval")
def evaluate(run_dir: Path, max_new_tokens: int = typer.Option(64, min=1, max=32768),
             samples: Optional[int] = typer.Option(None, min=1, help="Eval samples to use (default: all)."),
             lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Also run lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy)."),
             lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="Folder of your own lm-eval task YAML files."),
             lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", min=1, help="Documents per lm-eval task (default: all)."),
             lm_eval_chat: bool = typer.Option(True, "--lm-eval-chat/--lm-eval-raw", help="Render lm-eval prompts with the chat template (default) or raw.")):
    """Eval-split loss and perplexity, base vs fine-tuned side by side, plus the run's generate-eval metric (and lm-eval tasks)."""
    from rich.table import Table

    from tuneforge.infer.evaluate import evaluate as run_eval

    tasks = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else None
    if lm_eval is not None and not tasks:
        raise UserError("--lm-eval: give task names, comma-separated (e.g. --lm-eval hellaswag,arc_easy)")
    r = run_eval(str(run_dir), max_new_tokens=max_new_tokens, samples=samples, log=console.print, lm_eval=tasks,
                 lm_eval_include=str(lm_eval_include) if lm_eval_include else None, lm_eval_limit=lm_eval_limit, lm_eval_chat=lm_eval_chat)
    table = Table(title=f"eval: {run_dir} ({r['samples']} eval samples)")
    for col in ("metric", "base", "fine-tuned"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in r["base"]:
        table.add_row(key, f"{r['base'][key]:.4f}", f"{r['tuned'][key]:.4f}")
    Console(soft_wrap=True).print(table)
    Console(soft_wrap=True).print(f"report: {r['report']}")


@app.command()
def push(run_dir: Path, repo: str = typer.Option(..., help="Hub repo id, e.g. you/my-model (created if missing)."),
         what: str = typer.Option("adapter", help="adapter, merged, gptq or gguf."), private: bool = typer.Option(False, "--private")):
    """Upload an artifact of the run to the Hugging Face Hub with its model card (token: HF_TOKEN)."""
    from tuneforge.export.push import push as run_push

    r = run_push(str(run_dir), repo, what, private, log=console.print)
    Console(soft_wrap=True).print(f"pushed {len(r['files'])} files -> {r['url']}")
