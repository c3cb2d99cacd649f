"""The job dashboard served at `/` by `tuneforge serve`: jobs, live curves, log tail, submit, cancel.

One server-rendered page with plain JavaScript and inline SVG charts: no build step, no CDN, nothing
fetched from outside the server (the page works on an air-gapped cluster). It talks to the same JSON
API as any client, with the bearer token the user pastes once (kept in the browser's localStorage).
Its Content-Security-Policy allows exactly its own inline script and style (by SHA-256), nothing else:
no inline `style=`/`on*=` attributes, no eval, no other origin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

from tuneforge.rundir import RunDir

MAX_POINTS = 2000  # a curve keeps at most this many points (evenly thinned), so a long run stays light


def add_dashboard(app: FastAPI, current_user: Callable, own_job: Callable) -> None:
    """Register `/` (the page) and `/v1/jobs/{id}/metrics` (the full metric history the curves need)."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/v1/jobs/{job_id}/metrics")
    def metrics(job_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        job = own_job(job_id, user)
        return {"rows": metric_rows(RunDir(job.run_dir).metrics)}


def metric_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of rows, skipping a torn last line (a run may be writing it right now)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    stride = max(1, len(rows) // MAX_POINTS)
    return rows[::stride] if stride > 1 else rows


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tuneforge jobs</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:.7em 1.2em;display:flex;gap:1em;align-items:center}
header h1{font-size:1.1em;margin:0;flex:1} header input{width:22em}
main{display:grid;grid-template-columns:minmax(420px,1fr) minmax(480px,1.3fr);gap:1em;padding:1em}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.8em 1em}
h2{font-size:1em;margin:.2em 0 .6em}
table{border-collapse:collapse;width:100%;font-size:.9em} td,th{border-bottom:1px solid #eaeef2;padding:4px 6px;text-align:left}
tr.job{cursor:pointer} tr.job:hover,tr.sel{background:#f0f6ff}
.st{font-weight:600}.finished{color:#1a7f37}.failed,.cancelled{color:#cf222e}.running{color:#9a6700}.queued{color:#57606a}
textarea{width:100%;height:11em;font-family:ui-monospace,monospace;font-size:.85em}
pre{background:#f6f8fa;padding:.6em;max-height:16em;overflow:auto;font-size:.8em;white-space:pre-wrap}
button{cursor:pointer} .err{color:#cf222e} svg{background:#fff;border:1px solid #eaeef2}
.k-train{color:#0969da} .k-eval{color:#cf222e}
</style></head><body>
<header><h1>tuneforge — jobs</h1>
<label>token <input id="token" type="password" placeholder="bearer token (tuneforge serve token create)"></label>
<button id="save-token">use</button></header>
<main>
<div>
<section><h2>Jobs</h2><table><thead><tr><th>id</th><th>run</th><th>status</th><th>step</th><th>loss</th><th></th></tr></thead>
<tbody id="jobs"></tbody></table><p id="jobs-error" class="err"></p></section>
<section><h2>Submit a job</h2>
<p>Paste a worker request <code>{"input": {...}}</code> or a tuneforge config <code>{"config": {...}}</code> (JSON).</p>
<textarea id="request"></textarea><br><button id="submit">submit</button> <span id="submit-result"></span></section>
</div>
<div>
<section id="detail"><h2>Job <span id="d-id">—</span> <span id="d-status" class="st"></span></h2>
<p id="d-progress"></p>
<svg id="chart" width="560" height="240" role="img" aria-label="loss curve"></svg>
<p><span class="k-train">■</span> train loss <span class="k-eval">■</span> eval loss</p>
<h2>Log</h2><pre id="log"></pre></section>
</div>
</main>
<script>
const $ = (id) => document.getElementById(id);
let selected = null;
$("token").value = localStorage.getItem("tuneforge-token") || "";
$("save-token").onclick = () => { localStorage.setItem("tuneforge-token", $("token").value.trim()); refresh(); };
async function api(path, opts = {}) {
  const headers = {"Authorization": "Bearer " + (localStorage.getItem("tuneforge-token") || ""), ...(opts.headers || {})};
  const r = await fetch(path, {...opts, headers});
  const text = await r.text();
  let body = null; try { body = JSON.parse(text); } catch (e) { body = text; }
  if (!r.ok) throw new Error((body && body.detail) ? body.detail.map(d => d.loc + ": " + d.msg).join("; ") : r.status + "");
  return body;
}
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
async function refresh() {
  try {
    const {jobs} = await api("/v1/jobs?newest_first=true");
    const body = $("jobs"); body.replaceChildren();
    for (const j of jobs) {
      const tr = document.createElement("tr"); tr.className = "job" + (j.id === selected ? " sel" : "");
      tr.dataset.id = j.id; tr.dataset.status = j.status;
      const st = cell(j.status); st.className = "st " + j.status;
      tr.append(cell(j.id), cell(j.run_id), st, cell(""), cell(""));
      const act = document.createElement("td");
      if (!["finished", "failed", "cancelled"].includes(j.status)) {
        const b = document.createElement("button"); b.textContent = "cancel"; b.className = "cancel";
        b.onclick = async (ev) => { ev.stopPropagation(); await api(`/v1/jobs/${j.id}/cancel`, {method: "POST"}); refresh(); };
        act.append(b);
      }
      tr.append(act); tr.onclick = () => { selected = j.id; refresh(); };
      body.append(tr);
    }
    $("jobs-error").textContent = "";
    if (!selected && jobs.length) selected = jobs[0].id;
    if (selected) await detail(selected);
  } catch (e) { $("jobs-error").textContent = "error: " + e.message; }
}
async function detail(id) {
  const job = await api(`/v1/jobs/${id}`);
  $("d-id").textContent = id; $("d-status").textContent = job.status; $("d-status").className = "st " + job.status;
  const p = job.progress || {};
  $("d-progress").textContent = `step ${p.step ?? "—"} of ${p.total_steps ?? "—"}` + (job.reason ? ` — ${job.reason}` : "");
  const row = document.querySelector(`tr[data-id="${id}"]`);
  if (row) { row.children[3].textContent = p.step ?? ""; row.children[4].textContent = job.metrics && job.metrics.loss != null ? job.metrics.loss.toFixed(4) : ""; }
  const {rows} = await api(`/v1/jobs/${id}/metrics`);
  draw(rows);
  const logText = await fetch(`/v1/jobs/${id}/logs?follow=false`, {headers: {"Authorization": "Bearer " + localStorage.getItem("tuneforge-token")}}).then(r => r.text());
  $("log").textContent = logText.split("\\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).slice(-60).join("\\n");
}
function series(rows, key) { return rows.filter(r => typeof r[key] === "number" && isFinite(r[key])).map(r => [r.step, r[key]]); }
function draw(rows) {
  const svg = $("chart"), W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), pad = 36;
  const train = series(rows, "loss"), evals = series(rows, "eval_loss"), all = train.concat(evals);
  svg.replaceChildren();
  svg.dataset.points = train.length; svg.dataset.evalPoints = evals.length;
  if (!all.length) return;
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const sx = x => pad + (x - x0) / (x1 - x0) * (W - 2 * pad), sy = y => H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const text = (x, y, s) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "11"); t.textContent = s; svg.append(t); };
  text(2, pad, y1.toPrecision(3)); text(2, H - pad, y0.toPrecision(3)); text(pad, H - 8, "step " + x0); text(W - pad - 40, H - 8, "step " + x1);
  for (const [pts, color, cls] of [[train, "#0969da", "train-loss"], [evals, "#cf222e", "eval-loss"]]) {
    if (!pts.length) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2"); line.setAttribute("class", cls);
    svg.append(line);
  }
}
$("submit").onclick = async () => {
  try {
    const res = await api("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: $("request").value});
    $("submit-result").textContent = "submitted " + res.id; $("submit-result").className = ""; selected = res.id; refresh();
  } catch (e) { $("submit-result").textContent = "error: " + e.message; $("submit-result").className = "err"; }
};
refresh(); setInterval(refresh, 1500);
</script></body></html>
"""


def _csp(page: str) -> str:
    """The page's policy: its one inline <script> and <style> by hash; API calls to this origin only."""
    def digest(tag: str) -> str:
        body = re.search(f"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


PAGE_CSP = _csp(PAGE)
