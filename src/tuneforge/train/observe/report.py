"""RUN_DIR/report.html: one self-contained page (inline SVG and CSS, no scripts, no network) that shows a run.

Curves (train/eval loss, learning rate, gradient norm, tokens/s), the summary, the resolved config,
the data report and the generate-eval examples. Written at each checkpoint and at the end; `tuneforge
report RUN_DIR` rebuilds it from the files in the directory.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from tuneforge.rundir import RUN_INFO, RunDir
from tuneforge.train.observe.tracking import fsync_write, read_metrics

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:1em}
figure{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:.5em}figcaption{font-weight:600;margin-bottom:.3em}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
pre{background:#f6f8fa;padding:.8em;overflow:auto;max-height:420px}.status{font-weight:700}
.finished{color:#1a7f37}.failed{color:#cf222e}.interrupted,.running{color:#9a6700}"""


def svg_chart(series: dict[str, list[tuple[float, float]]], width: int = 500, height: int = 230) -> str:
    """A line chart of one or more (x, y) series as inline SVG; non-finite points are skipped."""
    colors = ["#0969da", "#cf222e", "#1a7f37", "#8250df"]
    pts = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    allp = [p for v in pts.values() for p in v]
    if not allp:
        return "<p>no data</p>"
    x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
    y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.05 - 1e-9, y1 + abs(y1) * 0.05 + 1e-9
    left, right, top, bottom = 60, 10, 10, 30
    w, h = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * w

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>']
    for frac in (0, 0.5, 1):
        yv, xv = y0 + frac * (y1 - y0), x0 + frac * (x1 - x0)
        out.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end">{yv:.4g}</text>')
        out.append(f'<text x="{sx(xv):.1f}" y="{height - 14}" font-size="10" text-anchor="middle">{xv:.0f}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 2}" font-size="10" text-anchor="middle">step</text>')
    for i, (name, p) in enumerate(pts.items()):
        if not p:
            continue
        color = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p)
        out.append(f'<polyline class="series" data-name="{html.escape(name)}" fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        if len(p) <= 40:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in p]
        out.append(f'<text x="{left + 8}" y="{top + 14 + 13 * i}" font-size="11" fill="{color}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def build_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    info = _read_json(rd.info_path) or {}
    rows = read_metrics(run_dir)
    status = str(info.get("status", "unknown"))
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tuneforge run {e(run_dir.name)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>tuneforge run: {e(run_dir.name)}</h1>",
             f"<p>status <span class='status {e(status)}'>{e(status)}</span>"
             + (f" — {e(str(info['error']))}" if info.get("error") else "") + "</p>"]
    summary = {k: info.get(k) for k in ("finetune", "step", "total_steps", "processes", "updated") if info.get(k) is not None}
    summary.update(info.get("summary") or {})
    parts.append("<h2>Summary</h2>" + _table({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    charts = [("loss", {"train loss": _series(rows, "loss"), "eval loss": _series(rows, "eval_loss")}),
              ("learning rate", {"lr": _series(rows, "lr")}), ("gradient norm", {"grad norm": _series(rows, "grad_norm")}),
              ("throughput (tokens/s)", {"tokens/s": _series(rows, "tokens_per_s")})]
    parts.append("<h2>Curves</h2><div class='grid'>")
    for title, series in charts:
        parts.append(f"<figure id='chart-{e(title.split()[0])}'><figcaption>{e(title)}</figcaption>{svg_chart(series)}</figure>")
    parts.append("</div>")
    parts.append("<h2>Throughput</h2>" + _table(throughput(rows)))
    cfg_path = rd.config
    if cfg_path.is_file():
        parts.append(f"<h2>Resolved config</h2><pre>{e(cfg_path.read_text())}</pre>")
    data = _read_json(rd.data_report)
    if data:
        parts.append(f"<h2>Data report</h2><pre>{e(json.dumps(data, indent=2, default=str))}</pre>")
    for tag in ("before", "after"):
        gen = _read_json(rd.generate_eval(tag))
        if gen:
            scores = {k: v for k, v in gen.items() if k.startswith("gen_")}
            parts.append(f"<h2>Generate-eval {tag} training (step {gen.get('step')})</h2>" + _table(scores))
            ex = gen.get("examples") or []
            parts.append("<table><tr><th>prompt</th><th>reference</th><th>prediction</th></tr>" + "".join(
                f"<tr><td>{e(str(x.get('prompt')))}</td><td>{e(str(x.get('reference')))}</td><td>{e(str(x.get('prediction')))}</td></tr>"
                for x in ex[:20]) + "</table>")
    parts += _online_rl(run_dir, rows)
    parts.append("</body></html>")
    return "".join(parts)


def _online_rl(run_dir: Path, rows: list[dict]) -> list[str]:
    """grpo runs: the reward curves and the last generated samples (RUN_DIR/samples.jsonl)."""
    if not any("reward" in r for r in rows):
        return []
    e = html.escape
    chart = svg_chart({"train reward": _series(rows, "reward"), "eval reward": _series(rows, "eval_reward")})
    out = [f"<h2>Rewards</h2><figure id='chart-reward'><figcaption>reward (mean)</figcaption>{chart}</figure>"]
    path = RunDir(run_dir).samples
    lines = path.read_text(encoding="utf-8").splitlines()[-20:] if path.is_file() else []
    samples = [json.loads(line) for line in lines if line.strip()]
    out.append("<h2>Generated samples (last 20)</h2><table><tr><th>step</th><th>prompt</th><th>completion</th><th>rewards</th>"
               "<th>advantage</th></tr>" + "".join(
                   f"<tr><td>{x.get('step')}</td><td>{e(str((x.get('prompt') or [{}])[-1].get('content')))}</td>"
                   f"<td>{e(str(x.get('completion')))}</td><td>{e(json.dumps(x.get('rewards')))}</td><td>{x.get('advantage')}</td></tr>"
                   for x in samples) + "</table>")
    return out


def throughput(rows: list[dict]) -> dict:
    tps = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    out = {}
    if tps:
        out["tokens/s (mean of logged steps)"] = round(sum(tps) / len(tps), 1)
        out["tokens/s (last)"] = tps[-1]
    tokens = sum(r.get("tokens", 0) or 0 for r in rows if isinstance(r.get("tokens"), int))
    if tokens:
        out["tokens trained (logged steps)"] = tokens
    mem = [r["peak_mem_gib"] for r in rows if isinstance(r.get("peak_mem_gib"), (int, float))]
    if mem:
        out["peak memory (GiB)"] = round(max(mem), 3)
    mfu = [r["mfu"] for r in rows if isinstance(r.get("mfu"), (int, float))]
    if mfu:
        out["MFU (mean)"] = f"{sum(mfu) / len(mfu):.1%}"
    return out


def _table(d: dict) -> str:
    if not d:
        return "<p>—</p>"
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items()) + "</table>"


def write_report(run_dir: Path) -> Path:
    out = RunDir(run_dir).report
    fsync_write(out, build_report(Path(run_dir)))
    return out


def list_runs(folder: Path) -> list[dict]:
    """Run directories under `folder` (itself, children, grandchildren) with their status and last numbers."""
    from tuneforge.train.safety.lock import read_owner

    found = []
    for info_path in sorted({*Path(folder).glob(RUN_INFO), *Path(folder).glob(f"*/{RUN_INFO}"),
                             *Path(folder).glob(f"*/*/{RUN_INFO}")}):
        run_dir = info_path.parent
        info = _read_json(info_path) or {}
        status = str(info.get("status", "?"))
        owner = read_owner(run_dir)
        if status == "running" and (owner is None or not owner.alive(stale_after=120)):
            status = "running (dead: no live owner)"  # killed with -9: nobody could record it
        rows = read_metrics(run_dir)
        losses = [r for r in rows if isinstance(r.get("loss"), (int, float))]
        evals = [r for r in rows if isinstance(r.get("eval_loss"), (int, float))]
        base = info.get("base_model") or {}
        found.append({
            "run": os.path.relpath(run_dir, folder) if run_dir != Path(folder) else run_dir.name, "status": status,
            "steps": f"{losses[-1]['step'] if losses else 0}/{info.get('total_steps', '?')}",
            "loss": f"{losses[-1]['loss']:.4f}" if losses else "-", "eval_loss": f"{evals[-1]['eval_loss']:.4f}" if evals else "-",
            "method": info.get("finetune", "?"), "base_model": base.get("path", "?") if isinstance(base, dict) else str(base),
            "updated": info.get("updated", "-"),
        })
    return found
