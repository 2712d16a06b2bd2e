"""``circtune compare``: search folders of one model from different devices, side by side.

:func:`build_compare_data` (pure) gives the device fingerprints, per-candidate step-time ratios per shared layer
shape (each run against the first), each run's pick, and the regret of using run A's pick on device B: the added
step time of A's pick summed over B's measurements, minus that of B's own pick (same additive model as the search,
so it is what B's search would have paid for taking A's answer). :func:`render_compare_html` draws it.

Runs of different models, budgets, token counts or dtypes are refused; with ``allow_different=True`` they are
compared on what they share (shapes, candidates, layers), and the page says what differed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from .._io import write_text_atomic
from ..adapters.methods import method_names
from ..cost import ok_table, summed_cost
from .folder import RunFolder, layer_candidate, layer_shapes, load_folder, num, run_frame
from .html import esc, figure, note, page, table

_CHECKED = (("base_model", "model"), ("budget", "budget"), ("tokens", "tokens"), ("dtype", "dtype"))
# Rows in the registry's order, the base layer (every other row's reference) first.
_METHOD_ORDER = ("none", *(m for m in method_names() if m != "none"))


def _tag(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i + 1}"


def _device(run: RunFolder) -> Mapping[str, Any]:
    return run.config.get("device") or (run.profile or {}).get("device") or {}


def _differences(runs: Sequence[RunFolder]) -> list[str]:
    out = []
    for key, what in _CHECKED:
        values = [r.config.get(key) for r in runs]
        for run, v in zip(runs[1:], values[1:], strict=True):
            if v != values[0]:
                out.append(f"different {what}s: {runs[0].path} has {values[0]!r}, {run.path} has {v!r}")
    return out


def pick_cost(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], table) -> dict[str, Any]:
    """Added step time and memory of ``config``'s layers, summed from ``table`` (one run's ok measurements);
    the layers whose shape or configuration that run did not measure are listed, and the sums are then None."""
    cost = summed_cost(((name, shapes.get(name), layer_candidate(layer)) for name, layer in config["layers"].items()),
                       table)
    return {"step_ms": cost.step_ms, "mem_mb": cost.mem_mb, "missing": list(cost.missing)}


def _ratio_rows(tables: Sequence[Mapping], shape: tuple[int, int]) -> tuple[list[dict], list[dict]]:
    per_run = [t.get(shape, {}) for t in tables]
    shared = set(per_run[0]).intersection(*per_run[1:])
    order = {m: i for i, m in enumerate(_METHOD_ORDER)}
    rows = []
    for c in sorted(shared, key=lambda c: (order.get(c.method, 9), num(per_run[0][c]["params"]) or 0, c.label)):
        ms = [num(t[c]["step_ms"]) for t in per_run]
        # An added time at or below zero is within the noise of the paired timing: no ratio for it.
        rows.append({"label": c.label, "method": c.method, "params": num(per_run[0][c]["params"]), "step_ms": ms,
                     "ratio": [None if m is None or ms[0] is None or m <= 0 or ms[0] <= 0 else m / ms[0]
                               for m in ms]})
    only = [{"label": c.label, "in": [i for i, t in enumerate(per_run) if c in t]}
            for c in sorted(set().union(*per_run) - shared, key=lambda c: c.label)]
    return rows, only


def build_compare_data(runs: Sequence[RunFolder | str | Path], *, allow_different: bool = False) -> dict[str, Any]:
    """Everything the comparison page shows, as plain data. Raises ValueError for fewer than two runs, or for runs
    of different models/budgets/tokens/dtypes unless ``allow_different``."""
    runs = [r if isinstance(r, RunFolder) else load_folder(r) for r in runs]
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two search folders, got {len(runs)}")
    differences = _differences(runs)
    if differences and not allow_different:
        raise ValueError("cannot compare these runs: " + "; ".join(differences)
                         + ". Compare runs of the same model, budget, tokens and dtype, or allow differences "
                         "(--allow-different) to compare only what they share")
    frames = [run_frame(r)[0] for r in runs]
    tables = [ok_table(f) for f in frames]
    shapes = [layer_shapes(r, f) for r, f in zip(runs, frames, strict=True)]
    tags = [_tag(i) for i in range(len(runs))]
    info = []
    for tag, run in zip(tags, runs, strict=True):
        dev = _device(run)
        info.append({"tag": tag, "path": run.path, "device": str(dev.get("name") or "unknown device"),
                     "fingerprint": str(dev.get("fingerprint") or ""), "model": run.config.get("base_model"),
                     "budget": run.config.get("budget"), "tokens": run.config.get("tokens"),
                     "dtype": run.config.get("dtype")})

    keys: list[str] = ["name", "kind", "fingerprint"]
    for run in runs:
        keys += [k for k in (_device(run).get("properties") or {}) if k not in keys]
    soft: list[str] = []
    for run in runs:
        soft += [k for k in (_device(run).get("software") or {}) if k not in soft]
    devices = [[k] + [_str(_device(r).get(k) if k in ("name", "kind", "fingerprint")
                           else (_device(r).get("properties") or {}).get(k)) for r in runs] for k in keys]
    devices += [[f"{k} version"] + [_str((_device(r).get("software") or {}).get(k)) for r in runs] for k in soft]

    shared_shapes = sorted(set(tables[0]).intersection(*tables[1:]))
    all_shapes = set().union(*tables)
    ratio_shapes = []
    for shape in shared_shapes:
        rows, only = _ratio_rows(tables, shape)
        geo = []
        for i in range(len(runs)):
            rs = [r["ratio"][i] for r in rows if r["ratio"][i] is not None and r["method"] != "none"]
            geo.append(math.exp(sum(map(math.log, rs)) / len(rs)) if rs else None)
        ratio_shapes.append({"key": f"{shape[0]}x{shape[1]}", "d_in": shape[0], "d_out": shape[1], "rows": rows,
                             "geomean": geo, "no_ratio": sum(None in r["ratio"][1:] for r in rows),
                             "only_some": [{"label": o["label"], "in": [tags[i] for i in o["in"]]} for o in only]})

    picks = []
    for tag, run in zip(tags, runs, strict=True):
        counts: dict[str, int] = {}
        for layer in run.config["layers"].values():
            label = layer_candidate(layer).label
            counts[label] = counts.get(label, 0) + 1
        picks.append({"tag": tag, "classes": [{"label": k, "layers": v} for k, v in sorted(counts.items())],
                      "total_params": num(run.config.get("total_params")),
                      "predicted_overhead_ms": num(run.config.get("predicted_overhead_ms")),
                      "measured_step_ms": num(run.config.get("measured_step_ms")),
                      "measured_overhead_ms": num(run.config.get("measured_overhead_ms"))})
    names = list(dict.fromkeys(n for r in runs for n in r.config["layers"]))
    layers = []
    for name in names:
        choices = [layer_candidate(r.config["layers"][name]).label if name in r.config["layers"] else None
                   for r in runs]
        layers.append({"name": name, "choices": choices, "same": len(set(choices)) == 1})

    regret = []
    for a, run_a in enumerate(runs):
        for b, run_b in enumerate(runs):
            if a == b:
                continue
            entry = {"pick_of": tags[a], "on": tags[b], "cost_ms": None, "own_ms": None, "regret_ms": None,
                     "regret_pct": None, "cost_mem_mb": None, "own_mem_mb": None, "missing": [], "note": ""}
            if set(run_a.config["layers"]) != set(run_b.config["layers"]):
                entry["note"] = f"{tags[a]} and {tags[b]} adapt different layers"
            else:
                both = {**shapes[a], **shapes[b]}
                cost, own = pick_cost(run_a.config, both, tables[b]), pick_cost(run_b.config, both, tables[b])
                entry.update(cost_ms=cost["step_ms"], own_ms=own["step_ms"], cost_mem_mb=cost["mem_mb"],
                             own_mem_mb=own["mem_mb"], missing=cost["missing"] + own["missing"])
                if cost["step_ms"] is not None and own["step_ms"] is not None:
                    entry["regret_ms"] = cost["step_ms"] - own["step_ms"]
                    # a percentage of an added time at or below zero (timing noise) means nothing
                    entry["regret_pct"] = 100 * entry["regret_ms"] / own["step_ms"] if own["step_ms"] > 0 else None
                elif entry["missing"]:
                    entry["note"] = f"{len(entry['missing'])} layer(s) not measured on {tags[b]}"
            regret.append(entry)

    compared = [f"{len(shared_shapes)} layer shape(s) measured on every device"
                + (f" (of {len(all_shapes)})" if len(all_shapes) != len(shared_shapes) else ""),
                "ratios: each run's median added step time over run A's, per candidate measured on every device",
                "regret: added step time of one run's pick, summed over another device's own measurements, minus "
                "that device's own pick (same additive model as the search)"]
    return {"title": f"circtune compare: {info[0]['model']} on " + ", ".join(f"{i['tag']}: {i['device']}"
                                                                             for i in info),
            "runs": info, "differences": differences, "compared": compared, "devices": devices,
            "shapes": ratio_shapes, "picks": picks, "layers": layers, "regret": regret}


def _str(v: Any) -> str:
    return "" if v is None else str(v)


# --------------------------------------------------------------------------------------------------- rendering
def ratio_figure(shape: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> go.Figure:
    fig = go.Figure()
    x = [esc(r["label"]) for r in shape["rows"]]
    for i, run in enumerate(runs[1:], start=1):
        fig.add_trace(go.Bar(
            x=x, y=[r["ratio"][i] for r in shape["rows"]], name=esc(f"{run['tag']} / A"),
            customdata=[[r["step_ms"][0], r["step_ms"][i]] for r in shape["rows"]],
            hovertemplate="%{x}<br>%{y:.3g}× (A %{customdata[0]:.4g} ms, " + esc(run["tag"])
                          + " %{customdata[1]:.4g} ms)<extra></extra>"))
    fig.add_hline(y=1, line=dict(color="#555", dash="dash"))
    ratios = [v for r in shape["rows"] for v in r["ratio"][1:] if v is not None]
    fig.update_yaxes(type="log" if ratios and min(ratios) > 0 else "linear")  # 2x and 0.5x equally far from 1
    fig.update_layout(title=f"Step time relative to A ({shape['d_in']} × {shape['d_out']})", barmode="group",
                      yaxis_title="time ratio (lower: faster than A)", xaxis_tickangle=-40)
    return fig


def regret_figure(regret: Sequence[Mapping[str, Any]]) -> go.Figure:
    rows = [r for r in regret if r["regret_ms"] is not None]
    fig = go.Figure(go.Bar(x=[f"{r['pick_of']}'s pick on {r['on']}" for r in rows], y=[r["regret_ms"] for r in rows],
                           customdata=[[r["cost_ms"], r["own_ms"], r["regret_pct"]] for r in rows],
                           hovertemplate="%{x}<br>costs %{customdata[0]:.4g} ms, own pick %{customdata[1]:.4g} ms"
                                         "<br>regret %{y:.4g} ms (%{customdata[2]:.3g} %)<extra></extra>"))
    fig.update_layout(title="Regret of using another device's pick", yaxis_title="added step time lost (ms)")
    return fig


def render_compare_html(data: Mapping[str, Any], plotlyjs: str = "inline") -> str:
    runs = data["runs"]
    body = [f"<h1>{esc(data['title'])}</h1>",
            table(["run", "folder", "device", "fingerprint", "model", "budget", "tokens", "dtype"],
                  [[r["tag"], r["path"], r["device"], r["fingerprint"], r["model"], r["budget"], r["tokens"],
                    r["dtype"]] for r in runs]),
            "<h2>What is compared</h2><ul>" + "".join(f"<li>{esc(c)}</li>" for c in data["compared"]) + "</ul>"]
    body += [note(f"Compared only on what the runs share: {d}") for d in data["differences"]]
    body += ["<h2>Devices</h2>", table([""] + [f"{r['tag']}: {r['device']}" for r in runs], data["devices"])]
    body.append("<h2>Step time per candidate</h2>")
    for i, s in enumerate(data["shapes"]):
        geo = ", ".join(f"{r['tag']}/A {g:.3g}×" for r, g in zip(runs[1:], s["geomean"][1:], strict=True)
                        if g is not None)
        body += [f"<h3>{esc(s['d_in'])} × {esc(s['d_out'])}</h3>",
                 f"<p>geometric mean over adapters and the LoRA/PEFT references: {esc(geo or '–')}"
                 + (f"; {s['no_ratio']} candidate(s) without a ratio (an added time at or below zero is within the "
                    "timing noise)" if s["no_ratio"] else "") + "</p>",
                 figure(ratio_figure(s, runs), f"ratio-{i}", 460),
                 table(["candidate", "params"] + [f"{r['tag']} ms" for r in runs] + [f"{r['tag']}/A" for r in runs[1:]],
                       [[r["label"], r["params"], *r["step_ms"], *r["ratio"][1:]] for r in s["rows"]])]
        if s["only_some"]:
            body.append(table(["measured on some devices only", "on"],
                              [[o["label"], ", ".join(o["in"])] for o in s["only_some"]]))
    if not data["shapes"]:
        body.append(note("No layer shape was measured on every device."))
    body += ["<h2>Each device's pick</h2>",
             table(["run", "configurations", "parameters", "predicted added ms", "measured added ms (paired)",
                    "measured step ms"],
                   [[p["tag"], "; ".join(f"{c['label']} × {c['layers']}" for c in p["classes"]), p["total_params"],
                     p["predicted_overhead_ms"], p["measured_overhead_ms"], p["measured_step_ms"]]
                    for p in data["picks"]])]
    differ = [lay for lay in data["layers"] if not lay["same"]]
    body.append(f"<p>{len(differ)} of {len(data['layers'])} layers are configured differently.</p>")
    if differ:
        body.append(table(["layer"] + [r["tag"] for r in runs],
                          [[lay["name"], *[c or "–" for c in lay["choices"]]] for lay in differ]))
    body += ["<h2>Regret</h2>", figure(regret_figure(data["regret"]), "regret", 380),
             table(["pick of", "measured on", "its cost (ms)", "own pick (ms)", "regret (ms)", "regret %",
                    "its memory (MiB)", "own memory (MiB)", "note"],
                   [[r["pick_of"], r["on"], r["cost_ms"], r["own_ms"], r["regret_ms"], r["regret_pct"],
                     r["cost_mem_mb"], r["own_mem_mb"], r["note"]] for r in data["regret"]])]
    return page(data["title"], body, plotlyjs, kind="compare")


def write_compare(folders: Sequence[str | Path], out: str | Path, plotlyjs: str = "inline",
                  allow_different: bool = False) -> Path:
    text = render_compare_html(build_compare_data(folders, allow_different=allow_different), plotlyjs)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path
