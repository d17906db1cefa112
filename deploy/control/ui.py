"""The control plane's web UI: server-rendered pages over the same views as the JSON API.

No Node build step: each page is HTML rendered here (every value through ``html.escape``), with
the data its script needs as a JSON island (``<script type="application/json" id="page-data">``)
and two static scripts: uPlot (vendored from npm, ``static/vendor/README.md``) for the charts
and ``static/kloop.js`` for what changes live (the watches, the charts, the buttons).

The write token never travels as a cookie (a cookie would let any page make the browser write:
CSRF): the header's token box keeps it in the page's ``localStorage`` and ``kloop.js`` sends it
as ``Authorization: Bearer`` on its own requests. Pages are reads, behind the same read guard
as the API.

The runs list renders one keyset page (``ControlPlane.list_runs``): the cost of a page does not
grow with the number of runs.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import html
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from deploy.control import views
from deploy.control.progress import read_progress, run_curves
from deploy.control.service import ControlPlane, InvalidArgument, Missing
from deploy.local.runs import STATUSES, STEPS

STATIC = Path(__file__).parent / "static"
PAGE_SIZE = 50
MAX_COMPARE = 8  # runs side by side on one page

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Guard = Callable[[Handler], Handler]

# The pages' scripts and styles only come from here; the JSON island is data, not script.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def add_ui(app: web.Application, plane: ControlPlane, read: Guard) -> None:
    ui = _Ui(plane)
    r = app.router
    r.add_get("/", read(ui.runs))
    r.add_get("/runs/{id}", read(ui.run))
    r.add_get("/rollouts", read(ui.rollouts))
    r.add_get("/rollouts/{id}", read(ui.rollout))
    r.add_get("/models", read(ui.models))
    r.add_get("/compare", read(ui.compare))
    r.add_static("/static/", STATIC, append_version=False)


class _Ui:
    def __init__(self, plane: ControlPlane):
        self.plane = plane

    async def runs(self, request: web.Request) -> web.Response:
        q = request.query
        model, status = q.get("model", ""), q.get("status", "")
        try:
            after = views.parse_page_token(q.get("page_token", ""))
        except ValueError as e:
            return _error_page(400, str(e))
        try:
            page = await asyncio.to_thread(self.plane.list_runs, model=model or None,
                                           status=status or None, limit=PAGE_SIZE, after=after)
        except InvalidArgument as e:
            return _error_page(400, str(e))
        models = await asyncio.to_thread(self.plane.registry.models)
        rows = [views.run_view(run, full=False) for run in page.runs]
        nxt = views.page_token(page.next)
        body = (_filters(model, status, models) + _runs_table(rows)
                + _next_link(nxt, model, status) + _new_run_form())
        return _page("Runs", "runs", body)

    async def run(self, request: web.Request) -> web.Response:
        try:
            run = await asyncio.to_thread(self.plane.get_run, request.match_info["id"])
        except Missing as e:
            return _error_page(404, str(e))
        progress = await asyncio.to_thread(read_progress, run.run_dir)
        curves = await asyncio.to_thread(run_curves, run.run_dir)
        view = views.run_view(run, progress)
        data = {"run": view, "curves": {k: [xs, ys] for k, (xs, ys) in curves.items()}}
        return _page(f"Run {run.id}", "run", _run_body(view, curves), data)

    async def rollouts(self, request: web.Request) -> web.Response:
        q = request.query
        model = q.get("model", "")
        try:
            after = views.parse_page_token(q.get("page_token", ""))
            items, nxt = await asyncio.to_thread(self.plane.rollouts.page, model=model or None,
                                                 active_only=False, limit=PAGE_SIZE, after=after)
        except ValueError as e:
            return _error_page(400, str(e))
        rows = [views.rollout_view(r, full=False) for r in items]
        more = ""
        if nxt is not None:
            qs = urlencode({k: v for k, v in (("model", model),
                                              ("page_token", views.page_token(nxt))) if v})
            more = f'<p><a id="next-page" href="/rollouts?{_e(qs)}">next page →</a></p>'
        return _page("Rollouts", "rollouts", _rollouts_table(rows) + more)

    async def rollout(self, request: web.Request) -> web.Response:
        try:
            r = await asyncio.to_thread(self.plane.get_rollout, request.match_info["id"])
        except Missing as e:
            return _error_page(404, str(e))
        view = views.rollout_view(r)
        return _page(f"Rollout {r.id}", "rollout", _rollout_body(view), {"rollout": view})

    async def models(self, request: web.Request) -> web.Response:
        def load() -> list[dict[str, Any]]:
            return [views.model_view(self.plane.registry, m, self.plane.rollouts.list(model=m))
                    for m in self.plane.registry.models()]
        found = await asyncio.to_thread(load)
        body = "".join(_model_section(m) for m in found) or "<p>No models published yet.</p>"
        return _page("Models", "models", body)

    async def compare(self, request: web.Request) -> web.Response:
        # "?ids=A,B" (a link) or "?ids=A&ids=B" (the runs list's checkboxes)
        ids = [i for value in request.query.getall("ids", []) for i in value.split(",") if i]
        ids = list(dict.fromkeys(ids))
        if not 2 <= len(ids) <= MAX_COMPARE:
            return _error_page(400, f"compare needs 2 to {MAX_COMPARE} run ids (?ids=A,B); "
                                    f"got {len(ids)}")
        try:
            runs = [await asyncio.to_thread(self.plane.get_run, i) for i in ids]
        except Missing as e:
            return _error_page(404, str(e))
        doc = await asyncio.to_thread(views.comparison, runs)
        return _page("Compare", "compare", _compare_body(doc), {"compare": doc})


# ---- the page frame ---------------------------------------------------------------------------


@functools.cache
def _asset(name: str) -> str:
    """A static file's URL with its content's digest, so a new release is never served stale."""
    digest = hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]
    return f"/static/{name}?v={digest}"


_NAV = (("runs", "/", "Runs"), ("rollouts", "/rollouts", "Rollouts"), ("models", "/models", "Models"))


def _page(title: str, kind: str, body: str, data: Mapping[str, Any] | None = None) -> web.Response:
    nav = "".join(f'<a href="{href}" data-nav="{key}"{" aria-current=page" if key == kind else ""}>'
                  f"{label}</a>" for key, href, label in _NAV)
    island = ""
    if data is not None:
        island = (f'<script type="application/json" id="page-data">{_json_island(data)}'
                  "</script>")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · kloop</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{_asset('vendor/uplot/uPlot.min.css')}">
<link rel="stylesheet" href="{_asset('kloop.css')}">
<script src="{_asset('vendor/uplot/uPlot.iife.min.js')}" defer></script>
<script src="{_asset('kloop.js')}" defer></script>
</head><body data-page="{_e(kind)}">
<header><a class="brand" href="/">kloop</a><nav>{nav}</nav>
<form id="token-box" autocomplete="off"><label>token
<input id="token" type="password" placeholder="paste &lt;home&gt;/control.token"></label>
<button type="submit" id="token-save">save</button>
<span id="token-state" data-set="false">not set</span></form></header>
<main><h1>{_e(title)}</h1>
<p id="message" role="status" hidden></p>
{body}</main>{island}</body></html>"""
    return web.Response(text=doc, content_type="text/html", charset="utf-8", headers=_HEADERS)


def _error_page(status: int, message: str) -> web.Response:
    resp = _page("Error", "error", f'<p class="error" id="error">{_e(message)}</p>')
    resp.set_status(status)
    return resp


def _json_island(data: Mapping[str, Any]) -> str:
    """JSON that cannot end its <script> element early, whatever strings it holds."""
    text = json.dumps(data, allow_nan=False, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- the runs list ----------------------------------------------------------------------------


def _filters(model: str, status: str, models: Sequence[str]) -> str:
    opts = _options(["", *models], model, "any model")
    st = _options(["", *STATUSES], status, "any status")
    return (f'<form id="filters" method="get" action="/" class="filters">'
            f'<label>model <select name="model" id="filter-model">{opts}</select></label>'
            f'<label>status <select name="status" id="filter-status">{st}</select></label>'
            '<button type="submit">filter</button></form>')


def _options(values: Iterable[str], selected: str, blank: str) -> str:
    return "".join(f'<option value="{_e(v)}"{" selected" if v == selected else ""}>'
                   f'{_e(v or blank)}</option>' for v in values)


def _runs_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return '<p id="no-runs">No runs.</p>'
    body = "".join(
        f'<tr data-run="{_e(r["id"])}" data-status="{_e(r["status"])}">'
        f'<td><input type="checkbox" name="ids" value="{_e(r["id"])}" form="compare-form" '
        f'aria-label="compare {_e(r["id"])}"></td>'
        f'<td><a href="/runs/{_q(r["id"])}">{_e(r["id"])}</a>'
        f'{_label(r["label"])}</td>'
        f'<td>{_status(r["status"])}</td><td>{_e(r["model"])}</td>'
        f'<td class="metric">{_primary(r)}</td><td>{_e(r["outcome"])}</td>'
        f'<td class="num">{_duration(r["duration_s"])}</td><td>{_time(r["created"])}</td></tr>'
        for r in rows)
    return ('<form id="compare-form" method="get" action="/compare"></form>'
            '<table id="runs" class="grid"><thead><tr><th></th><th>run</th><th>status</th>'
            '<th>model</th><th>primary metric</th><th>decision</th><th>duration</th>'
            f'<th>created</th></tr></thead><tbody>{body}</tbody></table>'
            '<p><button type="submit" form="compare-form" id="compare-selected">compare '
            'selected</button></p>')


def _label(label: str) -> str:
    return f' <span class="label">{_e(label)}</span>' if label else ""


def _primary(r: Mapping[str, Any]) -> str:
    name = r.get("primary_metric") or ""
    if not name:
        return "—"
    arrow = {"higher": "↑", "lower": "↓"}.get(r.get("direction") or "", "")
    value = _num(r["primary_value"]) if r.get("has_primary_value") else "—"
    title = f"{r.get('direction')} is better" if arrow else ""
    return (f'<span class="value">{value}</span> <span class="name" title="{_e(title)}">'
            f'{_e(name)} {arrow}</span>')


def _next_link(token: str, model: str, status: str) -> str:
    if not token:
        return ""
    qs = urlencode({k: v for k, v in (("model", model), ("status", status),
                                      ("page_token", token)) if v})
    return f'<p><a id="next-page" href="/?{_e(qs)}">next page →</a></p>'


def _new_run_form() -> str:
    return """<details id="new-run-box" open><summary>New run</summary>
<form id="new-run" class="stack">
<label>task <input name="task" value="digits" required></label>
<label>epochs <input name="epochs" type="number" min="1" value="3" required></label>
<label>config (JSON) <textarea name="config" rows="2">{}</textarea></label>
<label>label <input name="label"></label>
<label>policy (JSON, optional) <textarea name="policy" rows="2"
 placeholder='{"steps": [10, 50, 100]}'></textarea></label>
<button type="submit" id="new-run-submit">start run</button>
</form></details>"""


# ---- a run ------------------------------------------------------------------------------------

_BOX_W, _BOX_H, _GAP = 118, 48, 28


def _run_body(run: Mapping[str, Any], curves: Mapping[str, Any]) -> str:
    rollout = (f'<a id="rollout-link" href="/rollouts/{_q(run["rollout_id"])}">'
               f'{_e(run["rollout_id"])}</a>' if run["rollout_id"] else "—")
    version = f'v{run["version"]}' if run["version"] else "—"
    facts = _facts([
        ("status", f'<span id="run-status" class="status" data-status="{_e(run["status"])}">'
                   f'{_e(run["status"])}</span>'),
        ("model", _e(run["model"])), ("version", f'<span id="run-version">{version}</span>'),
        ("decision", f'<span id="run-outcome">{_e(run["outcome"]) or "—"}</span>'),
        ("primary metric", f'<span id="run-primary">{_primary(run)}</span>'),
        ("rollout", rollout), ("label", _e(run["label"]) or "—"),
        ("created", _time(run["created"])),
        ("duration", f'<span id="run-duration">{_duration(run["duration_s"])}</span>'),
    ])
    buttons = ('<p class="buttons"><button id="cancel" data-op="cancel">Cancel</button> '
               '<button id="retry" data-op="retry">Retry</button></p>')
    points = max((len(xs) for xs, _ in curves.values()), default=0)
    return (f'{facts}{buttons}<h2>Steps</h2>{_steps_svg(run["steps"])}{_steps_table(run["steps"])}'
            f'<h2>Training</h2>{_progress(run.get("progress"))}'
            f'<div id="curve" class="chart" data-points="{points}"></div>'
            '<h2>Log</h2><p><label><input type="radio" name="log-source" value="pipeline" checked>'
            ' pipeline</label> <label><input type="radio" name="log-source" value="train"> '
            'training processes</label></p>'
            '<pre id="log" data-lines="0" aria-live="polite"></pre>')


def _steps_svg(steps: Sequence[Mapping[str, Any]]) -> str:
    by_name = {s["name"]: s for s in steps}
    order = [n for n in STEPS if n in by_name] + [s["name"] for s in steps if s["name"] not in STEPS]
    width = len(order) * (_BOX_W + _GAP) - _GAP
    parts = []
    for i, name in enumerate(order):
        st = by_name[name]
        x = i * (_BOX_W + _GAP)
        if i:
            parts.append(f'<line class="arrow" x1="{x - _GAP + 2}" y1="{_BOX_H / 2 + 1}" '
                         f'x2="{x - 4}" y2="{_BOX_H / 2 + 1}" marker-end="url(#arrowhead)"/>')
        parts.append(
            f'<g class="step" data-step="{_e(name)}" data-status="{_e(st["status"])}" '
            f'data-attempts="{int(st.get("attempts") or 0)}" transform="translate({x},1)">'
            f'<title>{_e(st.get("message") or name)}</title>'
            f'<rect width="{_BOX_W}" height="{_BOX_H}" rx="6"/>'
            f'<text class="name" x="{_BOX_W / 2}" y="20">{_e(name)}</text>'
            f'<text class="sub" x="{_BOX_W / 2}" y="38">{_e(_step_sub(st))}</text></g>')
    return (f'<svg id="steps" class="steps" viewBox="0 0 {width} {_BOX_H + 2}" '
            f'width="{width}" height="{_BOX_H + 2}" role="img" aria-label="pipeline steps">'
            '<defs><marker id="arrowhead" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker>'
            f'</defs>{"".join(parts)}</svg>')


def _step_sub(st: Mapping[str, Any]) -> str:
    """The status line under a step's name; kloop.js writes the same (``stepSub``)."""
    attempts = int(st.get("attempts") or 0)
    return str(st["status"]) + (f" · {attempts} attempts" if attempts > 1 else "")


def _steps_table(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = "".join(
        f'<tr data-step-row="{_e(s["name"])}"><td>{_e(s["name"])}</td>'
        f'<td data-col="status">{_status(s["status"])}</td>'
        f'<td class="num" data-col="duration">{_duration(s.get("duration_s") or 0)}</td>'
        f'<td data-col="message">{_e(s.get("message") or "")}</td></tr>' for s in steps)
    return (f'<table id="step-table" class="grid compact"><thead><tr><th>step</th><th>status</th>'
            f'<th>duration</th><th>message</th></tr></thead><tbody>{rows}</tbody></table>')


_PROGRESS_FIELDS = (("epoch", "epoch"), ("step", "step"), ("loss", "loss"),
                    ("samples_per_s", "samples/s"), ("percent", "done %"),
                    ("remaining_s", "remaining s"))


def _progress(p: Mapping[str, Any] | None) -> str:
    p = p or {}
    cells = []
    for key, label in _PROGRESS_FIELDS:
        value = p.get(key)
        if key == "epoch" and p.get("epochs"):
            text = f"{value}/{p['epochs']}"
        elif key == "step" and p.get("steps"):
            text = f"{value}/{p['steps']}"
        else:
            text = _num(value) if value is not None and value != "" else "—"
        cells.append(f'<div><dt>{label}</dt><dd data-field="{key}">{_e(text)}</dd></div>')
    return f'<dl id="progress" class="fields">{"".join(cells)}</dl>'


# ---- rollouts ---------------------------------------------------------------------------------


def _rollouts_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return '<p id="no-rollouts">No rollouts.</p>'
    body = "".join(
        f'<tr data-rollout="{_e(r["id"])}" data-phase="{_e(r["phase"])}">'
        f'<td><a href="/rollouts/{_q(r["id"])}">{_e(r["id"])}</a></td><td>{_e(r["model"])}</td>'
        f'<td>v{r["candidate"]}</td><td>{_champion(r)}</td><td>{_phase(r["phase"])}</td>'
        f'<td>{_weights(r["weights"])}</td><td>{_e(r["reason"])}</td>'
        f'<td>{_time(r["updated"])}</td></tr>' for r in rows)
    return ('<table id="rollouts" class="grid"><thead><tr><th>rollout</th><th>model</th>'
            '<th>candidate</th><th>champion</th><th>phase</th><th>weights</th><th>reason</th>'
            f'<th>updated</th></tr></thead><tbody>{body}</tbody></table>')


def _rollout_body(r: Mapping[str, Any]) -> str:
    run = (f'<a href="/runs/{_q(r["run_id"])}">{_e(r["run_id"])}</a>' if r["run_id"] else "—")
    steps = ", ".join(f"{s} %" for s in r["steps"])
    facts = _facts([
        ("phase", f'{_phase(r["phase"], "phase")}'
                  f'<span id="paused"{"" if r["paused"] else " hidden"}> (paused)</span>'),
        ("model", f'<a href="/models#model-{_e(r["model"])}">{_e(r["model"])}</a>'),
        ("candidate", f'v{r["candidate"]}'), ("champion", _champion(r)),
        ("weights", f'<span id="weights">{_weights(r["weights"])}</span>'),
        ("step", f'<span id="step">{r["step"] + 1} of {len(r["steps"])}</span> ({_e(steps)})'),
        ("reason", f'<span id="reason">{_e(r["reason"]) or "—"}</span>'),
        ("failed analyses", f'<span id="failed">{r["failed_analyses"]}</span> of '
                            f'{r["failure_limit"]} allowed'),
        ("run", run), ("resource version", f'<code id="resource-version">'
                                           f'{_e(r["resource_version"])}</code>'),
        ("created", _time(r["created"])), ("updated", f'<span id="updated">'
                                                      f'{_time(r["updated"])}</span>'),
    ])
    buttons = "".join(f'<button id="{op}" data-op="{op}">{op.capitalize()}</button> '
                      for op in ("promote", "abort", "pause", "resume"))
    charts = "".join(f'<figure><figcaption>{label}</figcaption><div id="{cid}" class="chart" '
                     f'data-points="0"></div></figure>'
                     for cid, label in (("weights-chart", "traffic weight % per version"),
                                        ("rate-chart", "requests/s per version"),
                                        ("error-chart", "error rate per version"),
                                        ("p99-chart", "p99 latency ms per version")))
    return (f'{facts}<p class="buttons" id="ops">{buttons}</p><h2>Gate</h2>{_gate(r["gate"])}'
            f'<h2>Over time</h2><p id="series-note" class="note" hidden></p>'
            f'<div class="charts">{charts}</div>'
            f'<h2>History</h2>{_history(r["history"])}')


def _gate(gate: Mapping[str, Any] | None) -> str:
    """The gate's verdict and reasons; kloop.js writes the same (``renderGate``)."""
    if not gate:
        return '<div id="gate" data-verdict=""><p>not evaluated yet</p></div>'
    reasons = "".join(f"<li>{_e(x)}</li>" for x in gate["reasons"])
    return (f'<div id="gate" data-verdict="{_e(gate["verdict"])}"><p class="verdict">'
            f'{_e(gate["verdict"])}</p><ul>{reasons}</ul></div>')


def _history(events: Sequence[Mapping[str, Any]]) -> str:
    """The history table; kloop.js writes the same rows (``historyRow``)."""
    rows = "".join(
        f'<tr data-kind="{_e(ev["kind"])}" data-verdict="{_e(ev["verdict"])}">'
        f'<td>{_time(ev["at"])}</td><td>{_e(ev["kind"])}</td>'
        f'<td class="verdict">{_e(ev["verdict"])}</td><td>{_e(ev["message"])}</td>'
        f'<td>{_weights(ev["weights"])}</td>'
        f'<td class="num">{ev["count"] if ev["count"] > 1 else ""}</td></tr>' for ev in events)
    return ('<table id="history" class="grid compact"><thead><tr><th>at</th><th>event</th>'
            '<th>verdict</th><th>reason</th><th>weights</th><th>×</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _champion(r: Mapping[str, Any]) -> str:
    return f'v{r["champion"]}' if r["champion"] else "—"


def _phase(phase: str, element_id: str = "") -> str:
    ident = f' id="{element_id}"' if element_id else ""
    return f'<span{ident} class="phase" data-phase="{_e(phase)}">{_e(phase)}</span>'


def _weights(weights: Mapping[str, int]) -> str:
    return _e(", ".join(f"v{v} {w} %" for v, w in sorted(weights.items(), key=lambda kv: int(kv[0])))
              or "—")


# ---- models -----------------------------------------------------------------------------------


def _model_section(m: Mapping[str, Any]) -> str:
    name = m["name"]
    champion = m["aliases"].get("champion")
    aliases = ", ".join(f"{a} → v{v}" for a, v in sorted(m["aliases"].items())) or "—"
    active = (f' · active rollout <a href="/rollouts/{_q(m["active_rollout"])}">'
              f'{_e(m["active_rollout"])}</a>' if m["active_rollout"] else "")
    rows = "".join(_version_row(name, v, champion) for v in m["versions"])
    return (f'<section class="model" id="model-{_e(name)}" data-model="{_e(name)}">'
            f'<h2>{_e(name)}</h2><p>aliases: {_e(aliases)}{active}</p>'
            '<table class="grid versions"><thead><tr><th>version</th><th>created</th>'
            '<th>metrics</th><th>aliases</th><th>lineage: run → version → rollouts</th><th></th>'
            f'</tr></thead><tbody>{rows}</tbody></table></section>')


def _version_row(model: str, v: Mapping[str, Any], champion: int | None) -> str:
    n = v["version"]
    metrics = ", ".join(f"{k} {_num(x)}" for k, x in sorted(v["metrics"].items()))
    primary = v.get("primary_metric") or ""
    run = (f'<a href="/runs/{_q(v["run_id"])}">{_e(v["run_id"])}</a>' if v["run_id"] else "—")
    rollouts = ", ".join(f'<a href="/rollouts/{_q(rid)}">{_e(rid)}</a>' for rid in v["rollouts"])
    undo = ("" if n == champion else
            f'<button class="undo" data-model="{_e(model)}" data-undo="{n}">undo to v{n}</button>')
    return (f'<tr data-version="{n}"><td>v{n}</td><td>{_time(v["created"])}</td>'
            f'<td title="primary: {_e(primary)}">{_e(metrics) or "—"}</td>'
            f'<td>{_e(", ".join(v["aliases"])) or ""}</td>'
            f'<td class="lineage">{run} → v{n} → {rollouts or "no rollouts"}</td>'
            f"<td>{undo}</td></tr>")


# ---- compare ----------------------------------------------------------------------------------


def _compare_body(doc: Mapping[str, Any]) -> str:
    runs = doc["runs"]
    head = "".join(f'<th><a href="/runs/{_q(r["id"])}">{_e(r["id"])}</a></th>' for r in runs)

    def row(label: str, cells: Iterable[str], attrs: str = "") -> str:
        return f"<tr{attrs}><th>{_e(label)}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"

    summary = "".join([
        row("status", (_status(r["status"]) for r in runs)),
        row("model", (_e(r["model"]) for r in runs)),
        row("version", (f'v{r["version"]}' if r["version"] else "—" for r in runs)),
        row("primary metric", (_primary(r) for r in runs)),
        row("decision", (_e(r["outcome"]) for r in runs)),
        row("duration", (_duration(r["duration_s"]) for r in runs)),
    ])
    diff = "".join(row(k, (_e(_value(x)) for x in values), f' data-param="{_e(k)}"')
                   for k, values in sorted(doc["param_diff"].items()))
    metrics = "".join(row(k, (_e(_num(x)) for x in values), f' data-metric="{_e(k)}"')
                      for k, values in sorted(doc["metrics"].items()))
    names = sorted({c["metric"] for c in doc["curves"]})
    charts = "".join(f'<figure><figcaption>{_e(n)}</figcaption><div class="chart compare-curve" '
                     f'data-metric="{_e(n)}" data-points="0"></div></figure>' for n in names)
    table = '<table class="grid side" id="{id}"><thead><tr><th></th>{head}</tr></thead>' \
            "<tbody>{rows}</tbody></table>"
    return (table.format(id="compare-runs", head=head, rows=summary)
            + "<h2>Parameters that differ</h2>"
            + (table.format(id="param-diff", head=head, rows=diff) if diff
               else '<p id="param-diff">none: the runs have the same parameters</p>')
            + "<h2>Metrics</h2>" + table.format(id="compare-metrics", head=head, rows=metrics)
            + f'<h2>Curves</h2><div class="charts" id="curves">{charts or "<p>no curves</p>"}</div>')


# ---- small renderers ---------------------------------------------------------------------------


def _facts(items: Sequence[tuple[str, str]]) -> str:
    """A definition list; the values are HTML already escaped by the caller."""
    return ('<dl class="facts">' + "".join(f"<div><dt>{_e(k)}</dt><dd>{v}</dd></div>"
                                           for k, v in items) + "</dl>")


def _status(status: str) -> str:
    return f'<span class="status" data-status="{_e(status)}">{_e(status)}</span>'


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _q(v: str) -> str:
    return _e(quote(v, safe=""))


def _num(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "—" if v is None else str(v)
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e15):
        return str(int(v))
    return f"{v:.4g}" if math.isfinite(v) else "—"


def _value(v: object) -> str:
    return json.dumps(v, sort_keys=True) if not isinstance(v, str) else v


def _duration(seconds: float) -> str:
    s = int(round(seconds or 0))
    if s < 60:
        return f"{seconds or 0:.1f} s" if s < 10 else f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} m {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} m"


def _time(unix: float) -> str:
    if not unix:
        return "—"
    at = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return (f'<time datetime="{at.isoformat(timespec="seconds")}">'
            f'{at.strftime("%Y-%m-%d %H:%M:%S")}Z</time>')
