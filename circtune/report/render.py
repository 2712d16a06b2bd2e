"""The report's HTML: a thin drawing of :func:`circtune.report.data.build_report_data`'s output, answers first
(the verdict, the front, the allocation), then the pick's layers, the landscape, the search, predicted against
measured, and how it was measured with the run's metadata and device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from ..outputs import RunFiles
from .charts import (
    allocation_figure,
    backends_figure,
    bars_figure,
    display,
    flops_figure,
    front_figure,
    landscape_figure,
    memory_figure,
    overhead_figure,
    pick_map_figure,
    predicted_figure,
    search_figures,
)
from .data import report_data
from .html import PLOTLYJS, esc, figure, fmt, note, page, table
from .verdict import MEMORY_TOLERANCE, NOISY_SPREAD, OUTLIER_FACTOR


# --------------------------------------------------------------------------------------------------- sections
def device_table(device: Mapping[str, Any]) -> str:
    rows = [["kind", device["kind"]], ["fingerprint", device["fingerprint"]]]
    return table(["device", device["name"]], rows + device["properties"]
                 + [[f"{k} version", v] for k, v in device["software"]])


_NAV = (("verdict", "the answer"), ("front", "time against capacity"), ("allocation", "per layer"),
        ("pick", "the pick"), ("landscape", "landscape"), ("search", "search"),
        ("validation", "predicted vs measured"), ("method", "how it was measured"))


def _title_html(data: Mapping[str, Any]) -> list[str]:
    nav = " ".join(f'<a href="#{k}">{v}</a>' for k, v in _NAV)
    return [f"<h1>{esc(data['title'])}</h1>", f"<nav>{nav}</nav>",
            '<p class="muted">Green: the pick; blue: other candidates; grey: baselines.</p>']


def _run_html(data: Mapping[str, Any]) -> list[str]:
    """The run's metadata and device: below the answers."""
    h, t = data["header"], data["pick"]["totals"]
    fill = f" ({100 * t['fill']:.1f} % of the budget)" if t.get("fill") is not None else ""
    study = h.get("study") or {}
    tokens = fmt(h["tokens"]) + (f" (batch {h['batch_size']} × sequence {h['seq_len']})"
                                 if h.get("batch_size") and h.get("seq_len") else "")
    rows = [["model", h["model"]], ["budget", fmt(h["budget"])], ["adapter parameters", fmt(t["total_params"]) + fill],
            ["tokens per step", tokens], ["dtype", h["dtype"]], ["objective", h["objective"]],
            ["study", f"{study.get('name', '')} ({study.get('trials', '?')} trials)" if study else "–"],
            ["folder", h["folder"]]]
    out = ['<h2 id="run">The run</h2>', f"<p>command: <code>{esc(h['command'] or '–')}</code></p>",
           '<div class="grid"><div>', table(["run", ""], rows), "</div><div>", device_table(h["device"]),
           "</div></div>"]
    return out + [note(n) for n in data["notes"]]


def _spread(interval) -> str:
    return "" if not interval else f"p25–p75 {fmt(interval[0])} to {fmt(interval[1])} ms"


def _verdict_html(v: Mapping[str, Any]) -> list[str]:
    out = ['<h2 id="verdict">The answer</h2>']
    params = (f"{fmt(v['total_params'])} adapter parameters of the {fmt(v['budget'])} budget"
              if v["total_params"] is not None and v["budget"] is not None else "")
    if v["pick_capacity"] is not None:
        params += f"; it captures {100 * v['pick_capacity']:.1f} % of the weighted gradient energy"
    source = {"calibration": "capacity from the calibration texts' gradients",
              "uniform": "capacity without calibration data: every layer's gradient energy taken as equal (uniform)"}
    if not v["validated"]:
        predicted = (f" The pick's predicted added time is {fmt(v['predicted_ms'])} ms per step (summed from the "
                     "per-layer measurements)." if v["predicted_ms"] is not None else "")
        out.append(f'<p class="verdict">Not measured on the whole model: {esc(v["why_not"])}.{esc(predicted)}</p>')
    else:
        p = v["pick"]
        how = "measured paired with the frozen model" if p["paired"] else (
            "difference of two medians timed one after the other (a run of an older circtune: not paired)")
        base = f" to the frozen model's {fmt(p['base_ms'])} ms training step" if p["base_ms"] else ""
        pct = f" ({p['pct']:+.1f} %)" if p["pct"] is not None else ""
        name = "The pick" if p["label"] == "pick" else f"The pick ({p['label']})"
        head = (f"{name} adds {fmt(p['ms'])} ms{pct}{base}; {_spread(p['interval'])}, {how}"
                + (f"; predicted {fmt(p['predicted_ms'])} ms." if p["predicted_ms"] is not None else "."))
        out.append(f'<p class="verdict"><b>{esc(head)}</b></p>')
        if v["comparisons"]:
            out.append("<ul>" + "".join(f"<li>{esc(c['sentence'])}</li>" for c in v["comparisons"]) + "</ul>")
            rows = [[display({"label": p["label"], "picked": True}), p["params"], p["ms"], _spread(p["interval"]),
                     p["pct"], None if v["pick_capacity"] is None else 100 * v["pick_capacity"], "–"]]
            rows += [[c["label"], c["params"], c["ms"], _spread(c["interval"]), c["pct"],
                      None if c["capacity"] is None else 100 * c["capacity"],
                      {True: "within noise", False: "outside noise", None: "–"}[c["within_noise"]]]
                     for c in v["comparisons"]]
            out.append(table(["assignment", "parameters", "added ms", "spread", "added %", "capacity %",
                              "against the pick"], rows))
        if v["floor"] is not None:
            out.append(f'<p class="muted">Noise floor: the frozen model paired with itself adds '
                       f"{esc(fmt(v['floor']['ms']))} ms ({esc(_spread(v['floor']['interval']))}). Two assignments "
                       "are within noise of each other when the p25–p75 ranges of their paired differences "
                       "overlap.</p>")
    if params:
        out.append(f"<p>{esc(params)}.</p>")
    out.append(f"<p>{esc(source.get(v['capacity_source'] or '', 'no capacity data in this run (no front.csv)'))}."
               "</p>")
    out.append(f"<p>Apply it in a training script: <code>{esc(v['apply'])}</code></p>")
    return out


def _front_html(front: Mapping[str, Any] | None) -> list[str]:
    out = ['<h2 id="front">Time against capacity</h2>']
    if front is None or not front["points"]:
        return out + [note("No front.csv in this folder (a run of an older circtune): the time-against-capacity "
                           "front is not shown.")]
    tol = front["tolerance"]
    rule = (f" The pick is the fastest assignment within {100 * tol:.0f} % of the best capacity at this budget."
            if tol is not None else "")
    return out + [f'<p class="muted">Predicted added step time (summed per layer) against the share of the '
                  f"weighted gradient energy each assignment can express.{esc(rule)}</p>",
                  figure(front_figure(front), "front-chart", 480),
                  table(["point", "kind", "parameters", "added ms", "added MiB", "capacity %"],
                        [[display(r), r["kind"], r["params"], r["step_ms"], r["mem_mb"], 100 * r["capacity"]]
                         for r in front["points"] if r["kind"] != "front"])]


def _allocation_html(rows: Sequence[Mapping[str, Any]] | None) -> list[str]:
    out = ['<h2 id="allocation">The pick per layer</h2>']
    if not rows:
        return out + [note("No allocation.csv in this folder (a run of an older circtune): the per-layer parameters "
                           "and capacity are not shown.")]
    return out + [figure(allocation_figure(rows), "allocation-chart", 640)]


def _checks_html(checks: Mapping[str, Sequence[str]]) -> list[str]:
    out = []
    m = checks["memory"]
    if m:
        rows = "; ".join(f"{display(o)}: predicted {fmt(o['predicted_mb'])} MiB, measured {fmt(o['measured_mb'])} "
                         f"MiB ({o['off_pct']:+.0f} %)" for o in m["rows"])
        out.append(note(f"Whole-model memory predicted more than {100 * MEMORY_TOLERANCE:.0f} % off the measured: "
                        f"{rows}. {m['why'][0].upper() + m['why'][1:]}."))
    if checks["noisy"]:
        out.append(note(f"Noisy measurements (a whole-model step whose p25–p75 is wider than {100 * NOISY_SPREAD:.0f} "
                        f"% of its median; a per-layer time over {OUTLIER_FACTOR:g}× both neighbours' in its family, "
                        "or under a third of both): " + "; ".join(checks["noisy"])))
    return out


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
           ]
    bars = pick["bars"]
    if any(b.get("measured_overhead_ms") is not None for b in bars):
        out += ['<div class="grid">', figure(overhead_figure(bars), "pick-overhead"),
                figure(bars_figure(bars, "mem"), "pick-mem"), "</div>"]
    elif bars:
        out += ['<div class="grid">', figure(bars_figure(bars, "step"), "pick-step"),
                figure(bars_figure(bars, "mem"), "pick-mem"), "</div>"]
    else:
        out.append(note("Validation was skipped: no whole-model measurement to chart."))
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
        return out + [note("Nothing was measured on the whole model (validation skipped, or no validation.csv).")]
    return out + ['<div class="grid">', figure(predicted_figure(rows, "step"), "pred-step"),
                  figure(predicted_figure(rows, "mem"), "pred-mem"), "</div>",
                  table(["assignment", "kind", "predicted ms", "measured ms", "error %", "predicted MiB",
                         "measured MiB", "error %", "status"],
                        [[display(r), "pick" if r["picked"] else r["kind"], r["predicted_step_ms"],
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
            "(additive model); validation then times whole-model training steps, each assignment's paired with the "
            "frozen model's (one frozen step, one adapted step, repeated in one window on the same model): what it "
            "adds is the median of the per-pair differences, with their 25th and 75th percentiles.</p>",
            table(["setting", "value"], rows)]


def render_html(data: Mapping[str, Any], plotlyjs: str = "inline") -> str:
    """The report page for ``data`` from :func:`circtune.report.data.build_report_data`."""
    body = (_title_html(data) + _verdict_html(data["verdict"]) + _checks_html(data["checks"])
            + _front_html(data["front"]) + _allocation_html(data["allocation"]) + _pick_html(data["pick"])
            + _landscape_html(data["landscape"]) + _search_html(data["search"])
            + _validation_html(data["validation"]) + _method_html(data["method"]) + _run_html(data))
    return page(data["title"], body, plotlyjs)


def write_report(folder: str | Path, out: str | Path | None = None, plotlyjs: str = "inline") -> Path:
    """Build the report of a search folder and write it (default ``<folder>/report.html``)."""
    if plotlyjs not in PLOTLYJS:
        raise ValueError(f"plotlyjs: {plotlyjs!r} is not a mode; accepted: {', '.join(PLOTLYJS)}")
    text = render_html(report_data(folder), plotlyjs)
    return write_text_atomic(Path(out) if out is not None else RunFiles(folder).report, text)
