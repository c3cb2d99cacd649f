"""Model card (README.md) for an exported artifact: base model, method, data fingerprint, metrics, parity."""

from __future__ import annotations

import json
from pathlib import Path


def run_facts(run_dir: Path) -> dict:
    from tuneforge.rundir import RunDir

    path = RunDir(run_dir).info_path
    return json.loads(path.read_text()) if path.is_file() else {}


def write_card(folder: Path, run_dir: Path, kind: str, parity: dict, notes: list[str] | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(card_text(run_dir, kind, parity, notes))
    return path


def card_text(run_dir: Path, kind: str, parity: dict, notes: list[str] | None = None) -> str:
    info = run_facts(run_dir)
    base = info.get("base_model") or {}
    base_name = base.get("path", "?") if isinstance(base, dict) else str(base)
    summary = info.get("summary") or {}
    after, before = summary.get("generate_eval_after") or {}, summary.get("generate_eval_before") or {}
    lines = [
        "---",
        "library_name: transformers" if kind != "gguf" else "library_name: gguf",
        f"base_model: {base_name}" if base_name != "?" else "",
        "tags: [tuneforge, " + (info.get("finetune") or "fine-tuned") + "]",
        "---",
        f"# {Path(run_dir).resolve().name} ({kind})",
        "",
        f"Fine-tuned with [tuneforge](https://github.com/) from `{base_name}`.",
        "",
        "| fact | value |", "|---|---|",
        f"| base model | `{base_name}` |",
        f"| method | {info.get('finetune', '?')}{' (QLoRA, ' + base.get('quantize') + ' base)' if isinstance(base, dict) and base.get('quantize') else ''} |",
        f"| training steps | {summary.get('steps', info.get('total_steps', '?'))} |",
        f"| data fingerprint | `{info.get('data_fingerprint', '?')}` |",
    ]
    if "eval_loss" in summary:
        lines.append(f"| eval loss (per target token) | {summary['eval_loss']:.4f} |")
    for key, value in after.items():
        lines.append(f"| {key.removeprefix('gen_')} on held-out prompts | {before.get(key, float('nan')):.1%} before → {value:.1%} after |")
    lines += ["", "## Parity with the trained model", "", "| check | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in parity.items() if not isinstance(v, (list, dict))]
    lines += ["", *[f"- {n}" for n in notes or []]]
    versions = info.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(line for line in lines if line is not None) + "\n"
