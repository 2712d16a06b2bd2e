"""The report's charts: plotly figures drawn from :func:`circtune.report.data.build_report_data`'s plain data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from ..adapters.methods import get_method, method_names
from .html import KIND_COLOURS, VARIANT_COLOURS, esc, method_style, variant_colours
from .html import hover as _hover

_SYMBOLS = ("diamond", "square", "triangle-up", "x", "cross", "pentagon", "hexagon", "triangle-down")
_NAMED_COLOURS = ("#7f7f7f", "#9467bd", "#ff7f0e", "#d62728", "#8c564b", "#17becf")


def class_colours(classes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """A shade of the method's colour scale per block size (C3A blue, CDVFT orange), darker for larger p."""
    out = {}
    for method in {c["method"] for c in classes}:
        mine = [c["class"] for c in classes if c["method"] == method]
        ts = [0.45 + 0.5 * i / max(1, len(mine) - 1) for i in range(len(mine))]
        for name, colour in zip(mine, sample_colorscale(method_style(method)[1], ts), strict=True):
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
    x = [esc(display(b)) for b in rows]
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
                           marker_color=[KIND_COLOURS.get(k, "#1f77b4") for k in kind],
                           hovertemplate=_hover("%{x}", f"measured %{{y:.4g}} {unit}")))
    if any(b.get(pred) is not None for b in rows):
        fig.add_trace(go.Scatter(x=x, y=[b.get(pred) for b in rows], mode="markers", name="predicted",
                                 marker=dict(symbol="diamond", size=11, color="#d62728"),
                                 hovertemplate=_hover("%{x}", f"predicted %{{y:.4g}} {unit}")))
    title = "Whole-model training step" if what == "step" else "Whole-model peak memory"
    fig.update_layout(title=f"{title} (bars: p25–p75)" if what == "step" else title,
                      yaxis_title=f"{'step time' if what == 'step' else 'memory'} ({unit})", showlegend=True)
    return fig


def display(row: Mapping[str, Any]) -> str:
    """An assignment's name on the page: the chosen one is "pick" (with its predicted rank when it has one)."""
    label = row["label"]
    return label if not row.get("picked") or label == "pick" else f"pick ({label})"


def overhead_figure(bars: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Measured added time over the frozen model (paired; bars p25–p75) per assignment, the prediction as a marker."""
    rows = [b for b in bars if b.get("measured_overhead_ms") is not None]
    x = [esc(display(b)) for b in rows]
    lo = [b["measured_overhead_ms"] - b["measured_overhead_ms_p25"] if b.get("measured_overhead_ms_p25") is not None
          else None for b in rows]
    hi = [b["measured_overhead_ms_p75"] - b["measured_overhead_ms"] if b.get("measured_overhead_ms_p75") is not None
          else None for b in rows]
    fig = go.Figure(go.Bar(
        x=x, y=[b["measured_overhead_ms"] for b in rows], name="measured (paired)",
        error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#444"),
        marker_color=[KIND_COLOURS["pick" if b["picked"] else b["kind"]] for b in rows],
        customdata=[[b.get("overhead_pct")] for b in rows],
        hovertemplate=_hover("%{x}", "measured +%{y:.4g} ms (%{customdata[0]:+.2f} %)")))
    if any(b.get("predicted_overhead_ms") is not None for b in rows):
        fig.add_trace(go.Scatter(x=x, y=[b.get("predicted_overhead_ms") for b in rows], mode="markers",
                                 name="predicted (summed per layer)", marker=dict(symbol="diamond", size=11,
                                                                                  color="#d62728"),
                                 hovertemplate=_hover("%{x}", "predicted +%{y:.4g} ms")))
    fig.update_layout(title="Added time over the frozen model (bars: p25–p75)",
                      yaxis_title="added step time (ms)")
    return fig


def front_figure(front: Mapping[str, Any]) -> go.Figure:
    """Predicted added time against captured capacity: the exact front, the validated candidates, the named
    baselines (one legend entry each, so no label sits on another) and the pick."""
    pts = front["points"]
    fig = go.Figure()

    def trace(rows, name, colour, symbol, size=10, mode="markers", **kw):
        fig.add_trace(go.Scatter(
            x=[100 * r["capacity"] for r in rows], y=[r["step_ms"] for r in rows], mode=mode, name=esc(name),
            marker=dict(color=colour, symbol=symbol, size=size, line=dict(width=0.5, color="#333")),
            customdata=[[esc(r["label"]), r["params"], r["mem_mb"]] for r in rows],
            hovertemplate=_hover("%{customdata[0]}", "capacity %{x:.2f} %", "added +%{y:.4g} ms",
                                 "params %{customdata[1]:,}", "memory +%{customdata[2]:.4g} MiB"), **kw))

    line = sorted((r for r in pts if r["kind"] == "front"), key=lambda r: r["capacity"])
    if line:
        trace(line, "front (exact)", "#9ecae1", "circle", 7, "lines+markers", line=dict(color="#6baed6", shape="hv"))
    cands = [r for r in pts if r["kind"] == "candidate" and not r["picked"]]
    if cands:
        trace(cands, "validated candidates", "#1f77b4", "circle", 9)
    named = [r for r in pts if r["kind"] == "baseline"]
    for i, r in enumerate(named):
        trace([r], r["label"], _NAMED_COLOURS[i % len(_NAMED_COLOURS)], _SYMBOLS[i % len(_SYMBOLS)], 12)
    for r in (r for r in pts if r["picked"]):
        trace([r], display(r), KIND_COLOURS["pick"], "star", 18)
    fig.update_xaxes(title="captured capacity (% of the weighted gradient energy)")
    fig.update_yaxes(title="predicted added step time (ms)")
    fig.update_layout(title="Time against capacity at this budget")
    return fig


def allocation_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Per layer of the pick: parameters with the layer's share of the budget and its window (top), captured
    capacity with the layer's share of the gradient energy (bottom)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("parameters (marker: share of the budget; whiskers: allowed window)",
                                        "captured capacity (marker: the layer's share of the gradient energy)"))
    x = [esc(r["short"]) for r in rows]
    names = [[esc(r["layer"]), esc(r["config"])] for r in rows]
    fig.add_trace(go.Bar(x=x, y=[r["params"] for r in rows], name="parameters", marker_color="#1f77b4",
                         customdata=names, hovertemplate=_hover("%{customdata[0]}", "%{customdata[1]}",
                                                                "%{y:,} parameters")), row=1, col=1)
    if any(r["share"] is not None for r in rows):
        fig.add_trace(go.Scatter(
            x=x, y=[r["share"] for r in rows], mode="markers", name="share and window",
            marker=dict(symbol="line-ew-open", size=16, color="#d62728", line=dict(width=2)),
            error_y=dict(type="data", symmetric=False, color="#d62728",
                         array=[None if r["window_hi"] is None or r["share"] is None else r["window_hi"] - r["share"]
                                for r in rows],
                         arrayminus=[None if r["window_lo"] is None or r["share"] is None
                                     else r["share"] - r["window_lo"] for r in rows]),
            customdata=[[r["window_lo"], r["window_hi"]] for r in rows],
            hovertemplate=_hover("%{x}", "share %{y:,.0f}", "window %{customdata[0]:,.0f}–%{customdata[1]:,.0f}")),
            row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=[None if r["capacity"] is None else 100 * r["capacity"] for r in rows],
                         name="captured capacity", marker_color="#2ca02c", customdata=names,
                         hovertemplate=_hover("%{customdata[0]}", "captured %{y:.3g} %")), row=2, col=1)
    if any(r["energy"] is not None for r in rows):
        fig.add_trace(go.Scatter(x=x, y=[None if r["energy"] is None else 100 * r["energy"] for r in rows],
                                 mode="markers", name="gradient energy", marker=dict(symbol="diamond", color="#555"),
                                 hovertemplate=_hover("%{x}", "energy %{y:.3g} %")), row=2, col=1)
    fig.update_yaxes(title_text="parameters", row=1, col=1)
    fig.update_yaxes(title_text="% of the total", row=2, col=1)
    fig.update_xaxes(tickangle=-60, row=2, col=1)
    fig.update_layout(title="The pick per layer", barmode="overlay")
    return fig


def _point_trace(points, name, colour, symbol="circle", x="params", y="step_ms", size=8) -> go.Scatter:
    return go.Scatter(
        x=[p[x] for p in points], y=[p[y] for p in points], mode="markers", name=esc(name),
        marker=dict(color=colour, symbol=symbol, size=size, line=dict(width=0.5, color="#333")),
        customdata=[[esc(p["label"]), p["params"], p["step_ms"], p.get("mem_mb"), p.get("picked_layers", 0)]
                    for p in points],
        hovertemplate=_hover("%{customdata[0]}", "params %{customdata[1]:,}", "step +%{customdata[2]:.4g} ms",
                             "memory +%{customdata[3]:.4g} MiB", "picked for %{customdata[4]} layer(s)"))


def _method_traces(fig: go.Figure, shape: Mapping[str, Any], y: str) -> None:
    """One trace per registered method with points of ``y`` in ``shape``: the adapters under their names, then the
    references (the base layer is no point: every time is added over it) under their titles."""
    for name in method_names():
        spec = get_method(name)
        pts = [p for p in shape["candidates" if spec.is_adapter else "references"]
               if p["method"] == name and p[y] is not None]
        if pts and spec.expresses != "nothing":
            colour, _, symbol = method_style(name)
            fig.add_trace(_point_trace(pts, name if spec.is_adapter else spec.title, colour, symbol, y=y))


def landscape_figure(shape: Mapping[str, Any]) -> go.Figure:
    fig = go.Figure()
    _method_traces(fig, shape, "step_ms")
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
    known = list(VARIANT_COLOURS)
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
    _method_traces(fig, shape, "mem_mb")
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
        # One legend entry per assignment and the name on hover: text labels beside close points overlap.
        for i, r in enumerate(rows):
            kind = "pick" if r["picked"] else r["kind"]
            fig.add_trace(go.Scatter(
                x=[r[p]], y=[r[m]], mode="markers", name=esc(display(r)),
                marker=dict(size=13 if r["picked"] else 10, color=KIND_COLOURS[kind],
                            symbol="star" if r["picked"] else _SYMBOLS[i % len(_SYMBOLS)],
                            line=dict(width=0.5, color="#333")),
                hovertemplate=_hover(esc(display(r)), f"predicted %{{x:.4g}} {unit}", f"measured %{{y:.4g}} {unit}")))
    name = "step time" if what == "step" else "peak memory"
    fig.update_layout(title=f"Predicted against measured {name}", xaxis_title=f"predicted ({unit})",
                      yaxis_title=f"measured ({unit})")
    return fig
