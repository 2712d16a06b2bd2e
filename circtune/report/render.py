"""The report's HTML: a thin drawing of :func:`circtune.report.data.build_report_data`'s output with plotly.

One page, one copy of plotly.js (inlined, so the file works offline; or one CDN ``<script src>`` with
``plotlyjs="cdn"``), then each chart as a ``<div>`` and a ``Plotly.newPlot`` call. Every piece of text from the
folder (model, layer and device names, commands) is escaped with :func:`html.escape`, in the page and inside the
charts (plotly draws a few HTML tags and decodes entities, so escaped text shows as written).
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from .._io import write_text_atomic
from .data import report_data

PLOTLYJS = ("inline", "cdn")
_METHOD_COLOURS = {"c3a": "Blues", "cdvft": "Oranges"}
_KIND_COLOURS = {"pick": "#2ca02c", "candidate": "#1f77b4", "baseline": "#9a9a9a"}
# One colour per transform/backend in every chart; unknown variants take the rest in turn.
# (dense and triton take no transform: their variant is the backend alone)
_VARIANT_COLOURS = {"rfft/torch": "#1f77b4", "fft/torch": "#d62728", "dft/torch": "#ff7f0e", "dense": "#2ca02c",
                    "triton": "#9467bd"}
_SPARE = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;
padding:0 24px 48px;color:#1d2330}
h1{font-size:1.6em;margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin:20px 0 6px;font-size:1.1em}nav a{margin-right:14px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f5f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f3f5f8;padding:1px 4px;border-radius:3px;word-break:break-all}.note{background:#fff7e0;
border-left:4px solid #f0b400;padding:6px 12px;margin:8px 0}.muted{color:#667}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}.fig{min-width:0}
"""


# --------------------------------------------------------------------------------------------------- helpers
def esc(v: Any) -> str:
    return "" if v is None else html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers for tables: thousands separators for counts and values from 1000 up, ``digits`` significant digits
    below (107.7 ms and 108.0 ms must stay apart)."""
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return "–"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; every cell escaped, numbers formatted with :func:`fmt`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{esc(fmt(c))}</td>' if i in numeric or isinstance(c, int | float)
                                    and not isinstance(c, bool) else f"<td>{esc(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def note(text: str) -> str:
    return f'<div class="note">{esc(text)}</div>'


def figure(fig: go.Figure, div_id: str, height: int = 420) -> str:
    """One chart as a ``<div>`` plus its ``Plotly.newPlot`` script (plotly.js itself is loaded once by :func:`page`)."""
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=50, b=50),
                      hoverlabel=dict(align="left"))
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, default_width="100%",
                      default_height=f"{height}px", config={"displaylogo": False, "responsive": True})
    return f'<div class="fig">{div}</div>'


@cache
def _plotlyjs_sri() -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(get_plotlyjs().encode()).digest()).decode()


def plotlyjs_tag(mode: str) -> str:
    if mode not in PLOTLYJS:
        raise ValueError(f"plotlyjs: {mode!r} is not a mode; accepted: {', '.join(PLOTLYJS)}")
    config = "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>"
    if mode == "cdn":
        url = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
        return (f'{config}<script charset="utf-8" src="{url}" integrity="{_plotlyjs_sri()}" '
                'crossorigin="anonymous"></script>')
    return f'{config}<script charset="utf-8">{get_plotlyjs()}</script>'


def page(title: str, body: Sequence[str], plotlyjs: str = "inline", kind: str = "report") -> str:
    # The generator tag lets a later command tell a circtune page (which it may rebuild) from any other file.
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"circtune {esc(kind)}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style>{plotlyjs_tag(plotlyjs)}</head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _hover(*lines: str) -> str:
    return "<br>".join(lines) + "<extra></extra>"


def variant_colours(variants: Iterable[str]) -> dict[str, str]:
    spare = iter(_SPARE * 10)
    return {v: _VARIANT_COLOURS.get(v) or next(spare) for v in dict.fromkeys(variants)}


def class_colours(classes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """A blue shade per C3A block size and an orange one per CDVFT block size, darker for larger p."""
    out = {}
    for method in {c["method"] for c in classes}:
        mine = [c["class"] for c in classes if c["method"] == method]
        ts = [0.45 + 0.5 * i / max(1, len(mine) - 1) for i in range(len(mine))]
        for name, colour in zip(mine, sample_colorscale(_METHOD_COLOURS.get(method, "Greys"), ts), strict=True):
            out[name] = colour
    return out


# --------------------------------------------------------------------------------------------------- charts
def pick_map_figure(m: Mapping[str, Any]) -> go.Figure:
    fig = go.Figure()
    colours = class_colours(m["classes"])
    size = max(7, min(24, 760 // max(1, len(m["x"]))))
    for k in m["classes"]:
        cells = [c for c in m["cells"] if c["class"] == k["class"]]
        fig.add_trace(go.Scatter(
            x=[esc(c["x"]) for c in cells], y=[esc(c["y"]) for c in cells], mode="markers", name=esc(k["class"]),
            marker=dict(symbol="square", size=size, color=colours[k["class"]], line=dict(width=0.5, color="#333")),
            customdata=[[esc(c["name"]), esc(c["label"])] for c in cells],
            hovertemplate=_hover("%{customdata[0]}", "%{customdata[1]}")))
    fig.update_xaxes(title="layer index", type="category", categoryorder="array",
                     categoryarray=[esc(x) for x in m["x"]])
    fig.update_yaxes(title="module", type="category", categoryorder="array",
                     categoryarray=[esc(y) for y in reversed(m["y"])])
    fig.update_layout(title="Chosen configuration per layer (colour: method and block size)", legend_title="")
    return fig


def bars_figure(bars: Sequence[Mapping[str, Any]], what: str) -> go.Figure:
    """Measured whole-model ``what`` ("step" or "mem") per assignment, with the prediction as a marker."""
    key, pred, unit = (("measured_step_ms", "predicted_step_ms", "ms") if what == "step" else
                       ("measured_mem_mb", "predicted_mem_mb", "MiB"))
    rows = [b for b in bars if b.get(key) is not None or b.get(pred) is not None]
    x = [esc(b["label"]) for b in rows]
    kind = ["pick" if b["picked"] else b["kind"] for b in rows]
    err = {}
    if what == "step":
        lo = [None if b.get("measured_step_ms_p25") is None or b.get(key) is None
              else b[key] - b["measured_step_ms_p25"] for b in rows]
        hi = [None if b.get("measured_step_ms_p75") is None or b.get(key) is None
              else b["measured_step_ms_p75"] - b[key] for b in rows]
        if any(v is not None for v in lo + hi):
            err = dict(error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#444"))
    fig = go.Figure(go.Bar(x=x, y=[b.get(key) for b in rows], name="measured", **err,
                           marker_color=[_KIND_COLOURS.get(k, "#1f77b4") for k in kind],
                           hovertemplate=_hover("%{x}", f"measured %{{y:.4g}} {unit}")))
    if any(b.get(pred) is not None for b in rows):
        fig.add_trace(go.Scatter(x=x, y=[b.get(pred) for b in rows], mode="markers", name="predicted",
                                 marker=dict(symbol="diamond", size=11, color="#d62728"),
                                 hovertemplate=_hover("%{x}", f"predicted %{{y:.4g}} {unit}")))
    title = "Whole-model training step" if what == "step" else "Whole-model peak memory"
    fig.update_layout(title=f"{title} (green: the pick; grey: baselines; bars p25–p75)" if what == "step" else title,
                      yaxis_title=f"{'step time' if what == 'step' else 'memory'} ({unit})", showlegend=True)
    return fig


def _point_trace(points, name, colour, symbol="circle", x="params", y="step_ms", size=8) -> go.Scatter:
    return go.Scatter(
        x=[p[x] for p in points], y=[p[y] for p in points], mode="markers", name=esc(name),
        marker=dict(color=colour, symbol=symbol, size=size, line=dict(width=0.5, color="#333")),
        customdata=[[esc(p["label"]), p["params"], p["step_ms"], p.get("mem_mb"), p.get("picked_layers", 0)]
                    for p in points],
        hovertemplate=_hover("%{customdata[0]}", "params %{customdata[1]:,}", "step +%{customdata[2]:.4g} ms",
                             "memory +%{customdata[3]:.4g} MiB", "picked for %{customdata[4]} layer(s)"))


def landscape_figure(shape: Mapping[str, Any]) -> go.Figure:
    fig = go.Figure()
    for method, colour in (("c3a", "#1f77b4"), ("cdvft", "#ff7f0e")):
        pts = [p for p in shape["candidates"] if p["method"] == method and p["step_ms"] is not None]
        if pts:
            fig.add_trace(_point_trace(pts, method, colour))
    for method, name, colour, symbol in (("lora", "LoRA", "#7f7f7f", "x"), ("peft-c3a", "PEFT C3A", "#9467bd",
                                                                             "triangle-up")):
        pts = [p for p in shape["baselines"] if p["method"] == method and p["step_ms"] is not None]
        if pts:
            fig.add_trace(_point_trace(pts, name, colour, symbol))
    front = shape["pareto"]
    if front:
        fig.add_trace(go.Scatter(x=[p["params"] for p in front], y=[p["step_ms"] for p in front], mode="lines",
                                 name="Pareto front", line=dict(color="#2ca02c", width=2, shape="vh"),
                                 hoverinfo="skip"))
    picked = [p for p in shape["candidates"] if p["picked_layers"]]
    if picked:
        fig.add_trace(_point_trace(picked, "picked", "#d62728", "circle-open", size=18))
        fig.data[-1].marker.line = dict(width=2.5, color="#d62728")
    fig.update_xaxes(title="trainable parameters per layer", type="log")
    fig.update_yaxes(title="added step time per layer (ms)")
    fig.update_layout(title="Step time against parameters")
    return fig


def flops_figure(shape: Mapping[str, Any]) -> go.Figure:
    fig = go.Figure()
    pts = [p for p in shape["candidates"] if p["flops_added"] is not None and p["step_ms"] is not None]
    known = list(_VARIANT_COLOURS)
    variants = sorted({p["variant"] for p in pts}, key=lambda v: (known.index(v) if v in known else len(known), v))
    for variant, colour in variant_colours(variants).items():
        mine = [dict(p, mflop=p["flops_added"] / 1e6) for p in pts if p["variant"] == variant]
        fig.add_trace(_point_trace(mine, variant, colour, x="mflop"))
    rho = shape["flops"]["spearman"]
    # a log axis would hide a candidate that adds no FLOPs (or fewer than the base layer's, when counted apart)
    fig.update_xaxes(title="added FLOPs, forward + backward (MFLOP)",
                     type="log" if all(p["flops_added"] > 0 for p in pts) else "linear")
    fig.update_yaxes(title="added step time per layer (ms)")
    fig.update_layout(title="FLOPs against time" + (f" (Spearman ρ {rho:.2f})" if rho is not None else ""))
    return fig


def memory_figure(shape: Mapping[str, Any]) -> go.Figure:
    fig = go.Figure()
    for method, colour in (("c3a", "#1f77b4"), ("cdvft", "#ff7f0e")):
        pts = [p for p in shape["candidates"] if p["method"] == method and p["mem_mb"] is not None]
        if pts:
            fig.add_trace(_point_trace(pts, method, colour, y="mem_mb"))
    for method, name, colour, symbol in (("lora", "LoRA", "#7f7f7f", "x"), ("peft-c3a", "PEFT C3A", "#9467bd",
                                                                             "triangle-up")):
        pts = [p for p in shape["baselines"] if p["method"] == method and p["mem_mb"] is not None]
        if pts:
            fig.add_trace(_point_trace(pts, name, colour, symbol, y="mem_mb"))
    fig.update_xaxes(title="trainable parameters per layer", type="log")
    fig.update_yaxes(title="added peak memory per layer (MiB)")
    fig.update_layout(title="Memory against parameters")
    return fig


def backends_figure(shape: Mapping[str, Any]) -> go.Figure:
    b = shape["backends"]
    x = [[esc(g["family"]) for g in b["groups"]], [f"p={g['block_size']}" for g in b["groups"]]]
    colours = variant_colours(s["variant"] for s in b["series"])
    fig = go.Figure([go.Bar(x=x, y=s["step_ms"], name=esc(s["variant"]), marker_color=colours[s["variant"]],
                            hovertemplate=_hover("%{x}", esc(s["variant"]) + ": %{y:.4g} ms")) for s in b["series"]])
    fig.update_layout(title="Backends compared per block size", barmode="group", yaxis_title="added step time (ms)")
    return fig


def search_figures(search: Mapping[str, Any]) -> tuple[go.Figure, go.Figure]:
    trials = [t for t in search["trials"] if t["step_ms"] is not None]
    hist = go.Figure()
    for name, keep, colour, symbol in (("infeasible", lambda t: not t["feasible"], "#c7c7c7", "circle"),
                                       ("sampled", lambda t: t["feasible"] and t["source"] in ("", "sampler"),
                                        "#1f77b4", "circle"),
                                       ("seeded", lambda t: t["feasible"] and t["source"] not in ("", "sampler"),
                                        "#d62728", "diamond")):
        ts = [t for t in trials if keep(t)]
        if ts:
            hist.add_trace(go.Scatter(
                x=[t["number"] for t in ts], y=[t["step_ms"] for t in ts], mode="markers", name=name,
                marker=dict(color=colour, symbol=symbol, size=7),
                customdata=[[esc(t["label"] or t["source"]), t["total_params"], t["mem_mb"]] for t in ts],
                hovertemplate=_hover("trial %{x} %{customdata[0]}", "step +%{y:.4g} ms", "params %{customdata[1]:,}",
                                     "memory +%{customdata[2]:.4g} MiB")))
    best = search["best_so_far"]
    if best:
        last = trials[-1]["number"] if trials else best[-1]["number"]
        hist.add_trace(go.Scatter(x=[b["number"] for b in best] + [last], y=[b["step_ms"] for b in best]
                                  + [best[-1]["step_ms"]], mode="lines", name="best feasible",
                                  line=dict(color="#2ca02c", shape="hv")))
    hist.update_layout(title="Search history", xaxis_title="trial", yaxis_title="predicted added step time (ms)")
    front = go.Figure()
    feasible = [t for t in trials if t["feasible"] and t["mem_mb"] is not None]
    front.add_trace(go.Scatter(x=[t["step_ms"] for t in feasible], y=[t["mem_mb"] for t in feasible], mode="markers",
                               name="feasible trials", marker=dict(color="#9ecae1", size=7),
                               customdata=[[t["number"], esc(t["label"])] for t in feasible],
                               hovertemplate=_hover("trial %{customdata[0]} %{customdata[1]}", "step +%{x:.4g} ms",
                                                    "memory +%{y:.4g} MiB")))
    pf = [t for t in search["front"] if t["step_ms"] is not None and t["mem_mb"] is not None]
    if pf:
        front.add_trace(go.Scatter(x=[t["step_ms"] for t in pf], y=[t["mem_mb"] for t in pf], mode="lines+markers",
                                   name="Pareto front", line=dict(color="#d62728", shape="hv"),
                                   marker=dict(size=9, color="#d62728"), hoverinfo="skip"))
    front.update_layout(title="Pareto front of the study", xaxis_title="predicted added step time (ms)",
                        yaxis_title="predicted added memory (MiB)")
    return hist, front


def predicted_figure(rows: Sequence[Mapping[str, Any]], what: str) -> go.Figure:
    p, m, unit = (("predicted_step_ms", "measured_step_ms", "ms") if what == "step" else
                  ("predicted_mem_mb", "measured_mem_mb", "MiB"))
    rows = [r for r in rows if r[p] is not None and r[m] is not None]
    fig = go.Figure()
    if rows:
        lo, hi = min(min(r[p], r[m]) for r in rows), max(max(r[p], r[m]) for r in rows)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="measured = predicted",
                                 line=dict(color="#999", dash="dash"), hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=[r[p] for r in rows], y=[r[m] for r in rows], mode="markers+text", name="assignments",
            text=[esc(r["label"]) for r in rows], textposition="top center",
            marker=dict(size=10, color=[_KIND_COLOURS["pick" if r["picked"] else r["kind"]] for r in rows]),
            hovertemplate=_hover("%{text}", f"predicted %{{x:.4g}} {unit}", f"measured %{{y:.4g}} {unit}")))
    name = "step time" if what == "step" else "peak memory"
    fig.update_layout(title=f"Predicted against measured {name}", xaxis_title=f"predicted ({unit})",
                      yaxis_title=f"measured ({unit})")
    return fig


# --------------------------------------------------------------------------------------------------- sections
def device_table(device: Mapping[str, Any]) -> str:
    rows = [["kind", device["kind"]], ["fingerprint", device["fingerprint"]]]
    return table(["device", device["name"]], rows + device["properties"]
                 + [[f"{k} version", v] for k, v in device["software"]])


def _header_html(data: Mapping[str, Any]) -> list[str]:
    h, t = data["header"], data["pick"]["totals"]
    fill = f" ({100 * t['fill']:.1f} % of the budget)" if t.get("fill") is not None else ""
    study = h.get("study") or {}
    tokens = fmt(h["tokens"]) + (f" (batch {h['batch_size']} × sequence {h['seq_len']})"
                                 if h.get("batch_size") and h.get("seq_len") else "")
    rows = [["model", h["model"]], ["budget", fmt(h["budget"])], ["adapter parameters", fmt(t["total_params"]) + fill],
            ["tokens per step", tokens], ["dtype", h["dtype"]], ["objective", h["objective"]],
            ["study", f"{study.get('name', '')} ({study.get('trials', '?')} trials)" if study else "–"],
            ["folder", h["folder"]]]
    nav = " ".join(f'<a href="#{k}">{v}</a>' for k, v in (("pick", "the pick"), ("landscape", "landscape"),
                                                          ("search", "search"), ("validation", "predicted vs measured"),
                                                          ("method", "how it was measured")))
    out = [f"<h1>{esc(data['title'])}</h1>", f"<nav>{nav}</nav>",
           f"<p>command: <code>{esc(h['command'] or '–')}</code></p>", '<div class="grid"><div>',
           table(["run", ""], rows), "</div><div>", device_table(h["device"]), "</div></div>"]
    return out + [note(n) for n in data["notes"]]


def _pick_html(pick: Mapping[str, Any]) -> list[str]:
    t = pick["totals"]
    out = ['<h2 id="pick">The pick</h2>',
           figure(pick_map_figure(pick["map"]), "pick-map", 160 + 30 * len(pick["map"]["y"])),
           "<h3>Totals</h3>",
           table(["configuration", "layers", "parameters"],
                 [[k["class"], k["layers"], k["params"]] for k in pick["map"]["classes"]]
                 + [["total", t["layers"], t["total_params"]]]),
           table(["whole model and totals", "ms / MiB"], [[k.replace("_", " "), t[k]] for k in (
               "predicted_overhead_ms", "optimum_overhead_ms", "sum_layer_step_ms", "base_step_ms",
               "predicted_step_ms", "measured_step_ms", "predicted_mem_mb", "measured_mem_mb") if t[k] is not None]),
           '<div class="grid">', figure(bars_figure(pick["bars"], "step"), "pick-step"),
           figure(bars_figure(pick["bars"], "mem"), "pick-mem"), "</div>"]
    return out


def _landscape_html(shapes: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ['<h2 id="landscape">The landscape</h2>',
           '<p class="muted">Per layer shape: what each candidate adds to the frozen layer\'s training step (median '
           "time, peak memory). Pareto front: the candidates that no other beats with at least as many parameters "
           "and no more time. Red rings: the candidates the pick uses.</p>"]
    for i, s in enumerate(shapes):
        base = s["base"] or {}
        title = f"{s['d_in']} × {s['d_out']}" + (f" ({s['layers']} layers)" if s["layers"] else "")
        out.append(f"<h3>{esc(title)}</h3>")
        if base.get("step_ms") is not None:
            out.append(f"<p>frozen base layer: step {esc(fmt(base['step_ms']))} ms, memory "
                       f"{esc(fmt(base.get('peak_mem_mb')))} MiB</p>")
        out += ['<div class="grid">', figure(landscape_figure(s), f"land-{i}"), figure(flops_figure(s), f"flops-{i}"),
                figure(memory_figure(s), f"mem-{i}"), figure(backends_figure(s), f"backends-{i}"), "</div>"]
        f = s["flops"]
        if f["fewest"] and f["fastest"] and f["fewest"]["label"] != f["fastest"]["label"]:
            out.append(note(f"FLOPs mislead here: the fewest FLOPs ({f['fewest']['label']}, "
                            f"{fmt(f['fewest']['step_ms'])} ms) is not the fastest ({f['fastest']['label']}, "
                            f"{fmt(f['fastest']['step_ms'])} ms)."))
        if s["pareto"]:
            out.append(table(["Pareto front", "params", "step +ms", "memory +MiB"],
                             [[p["label"], p["params"], p["step_ms"], p["mem_mb"]] for p in s["pareto"]]))
        if s["failed"] or s["excluded"]:
            out.append(table(["not measured", "why"], [[f["label"], f["status"]] for f in s["failed"]]
                             + [[e["what"], e["reason"]] for e in s["excluded"]]))
    return out


def _search_html(search: Mapping[str, Any] | None) -> list[str]:
    out = ['<h2 id="search">The search</h2>']
    if search is None:
        return out + [note("No trials.csv in the folder: the search history is not shown.")]
    c = search["counts"]
    hist, front = search_figures(search)
    out += [f"<p>{c['trials']} trials, {c['feasible']} feasible, {c['seeded']} seeded (exact optimum, baselines), "
            f"{c['pareto']} on the Pareto front.</p>", '<div class="grid">', figure(hist, "search-history"),
            figure(front, "search-front"), "</div>",
            table(["trial", "source", "label", "step +ms", "memory +MiB", "params"],
                  [[t["number"], t["source"], t["label"], t["step_ms"], t["mem_mb"], t["total_params"]]
                   for t in search["front"]])]
    return out


def _validation_html(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ['<h2 id="validation">Predicted against measured</h2>']
    if not rows:
        return out + [note("No validation.csv in the folder: nothing was measured on the whole model.")]
    return out + ['<div class="grid">', figure(predicted_figure(rows, "step"), "pred-step"),
                  figure(predicted_figure(rows, "mem"), "pred-mem"), "</div>",
                  table(["assignment", "kind", "predicted ms", "measured ms", "error %", "predicted MiB",
                         "measured MiB", "error %", "status"],
                        [[r["label"], "pick" if r["picked"] else r["kind"], r["predicted_step_ms"],
                          r["measured_step_ms"], r["step_error_pct"], r["predicted_mem_mb"], r["measured_mem_mb"],
                          r["mem_error_pct"], r["status"]] for r in rows])]


def _method_html(m: Mapping[str, Any]) -> list[str]:
    timing = m["timing"] or {}
    rows = [["profile command", m["profile_command"] or "–"], ["search command", m["search_command"] or "–"],
            ["search space", m["space"] or "–"], ["measurement store", m["store"] or "–"],
            ["rows", f"{m['rows']} ({m['ok']} ok)"],
            ["repetitions per configuration", "–" if not m["reps"] else f"{m['reps'][0]}–{m['reps'][1]}"]]
    rows += [[f"timing: {k}", v] for k, v in timing.items()]
    rows += [[f"{k} (profile)", v] for k, v in m["counts"].items()]
    rows += [[f"{k} version(s)", ", ".join(v) or "–"] for k, v in m["versions"].items()]
    if m["timestamps"]:
        rows.append(["measured", f"{m['timestamps'][0]} to {m['timestamps'][1]}"])
    return ['<h2 id="method">How it was measured</h2>',
            "<p>Each unique (layer shape, tokens, dtype, configuration) is timed once on this device: forward, "
            "backward and the whole step of one layer, paired with its frozen base layer, after warm-up and until "
            "both a minimum number of repetitions and a minimum time are reached; medians with the 25th and 75th "
            "percentiles. Memory is the peak the adapter adds during the step. The search adds the per-layer costs "
            "(additive model); validation then times whole-model training steps.</p>",
            table(["setting", "value"], rows)]


def render_html(data: Mapping[str, Any], plotlyjs: str = "inline") -> str:
    """The report page for ``data`` from :func:`circtune.report.data.build_report_data`."""
    body = (_header_html(data) + _pick_html(data["pick"]) + _landscape_html(data["landscape"])
            + _search_html(data["search"]) + _validation_html(data["validation"]) + _method_html(data["method"]))
    return page(data["title"], body, plotlyjs)


def write_report(folder: str | Path, out: str | Path | None = None, plotlyjs: str = "inline") -> Path:
    """Build the report of a search folder and write it (default ``<folder>/report.html``)."""
    if plotlyjs not in PLOTLYJS:
        raise ValueError(f"plotlyjs: {plotlyjs!r} is not a mode; accepted: {', '.join(PLOTLYJS)}")
    text = render_html(report_data(folder), plotlyjs)
    return write_text_atomic(Path(out) if out is not None else Path(folder) / "report.html", text)
