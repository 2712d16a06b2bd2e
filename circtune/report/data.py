"""The data behind the report of one ``circtune search`` folder: pure functions from the loaded files
(:mod:`circtune.report.folder`) to plain, JSON-serialisable dicts, one entry per chart or table.
:mod:`circtune.report.render` only draws them.

Units follow ``measurements.csv`` (per layer: what an adapter adds to its frozen base layer). Whole-model numbers
come from ``validation.csv`` and the top-level keys of ``adapter_config.json``; the verdict, the front and the
allocation from :mod:`circtune.report.verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..adapters.methods import method_names
from ..baselines import BASELINE_IDS
from ..candidate import Candidate
from ..cost import ok_table, summed_cost
from . import verdict
from .folder import (  # noqa: F401  (FolderError, load_folder, short_modules: this module's public names too)
    FolderError,
    RunFolder,
    baseline_id,
    flag,
    integer,
    layer_candidate,
    layer_class,
    layer_shapes,
    load_folder,
    num,
    row_candidate,
    run_frame,
    short_modules,
    split_layer_name,
    text,
)

_VARIANT_ORDER = ("rfft/torch", "fft/torch", "dft/torch", "dense", "triton")


def pareto_front(points: Sequence[Mapping[str, Any]], x: str = "params", y: str = "step_ms") -> list[dict]:
    """The candidates no other one beats: none has at least as many ``x`` (parameters) and a smaller or equal ``y``
    (step time), one of them strictly. Parameters count as a gain here, not a cost: the search must spend
    ``min_fill`` of the budget, so a faster candidate with more parameters is the better choice, while a faster one
    with fewer is not a substitute. Sorted by ``x``; a point equal to an earlier one is kept once."""
    best, front = math.inf, []
    for p in sorted((p for p in points if p.get(x) is not None and p.get(y) is not None),
                    key=lambda p: (-p[x], p[y], str(p.get("label", "")))):
        if p[y] < best:
            best = p[y]
            front.append(dict(p))
    return front[::-1]


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = pd.Series(a).rank(), pd.Series(b).rank()
    return num(ra.corr(rb))


def _variant(c: Candidate) -> str:
    return f"{c.transform}/{c.backend}" if c.transform else str(c.backend)


def _family(c: Candidate) -> str:
    return c.method if c.factors is None else f"{c.method} m={c.factors}"


# --------------------------------------------------------------------------------------------------- sections
def _device(run: RunFolder, frame: pd.DataFrame) -> dict[str, Any]:
    dev = run.config.get("device") or (run.profile or {}).get("device") or {}
    if not dev and len(frame) and "device_name" in frame.columns:
        first = frame.iloc[0]
        dev = {"name": first.get("device_name"), "fingerprint": first.get("device_fingerprint")}
    return {"name": text(dev.get("name")) or "unknown device", "kind": text(dev.get("kind")),
            "index": dev.get("index"), "fingerprint": text(dev.get("fingerprint")),
            "properties": [[str(k), text(v)] for k, v in (dev.get("properties") or {}).items()],
            "software": [[str(k), text(v)] for k, v in (dev.get("software") or {}).items()]}


def _header(run: RunFolder, frame: pd.DataFrame) -> dict[str, Any]:
    cfg = run.config
    return {"model": text(cfg.get("base_model")), "budget": integer(cfg.get("budget")),
            "total_params": integer(cfg.get("total_params")), "tokens": integer(cfg.get("tokens")),
            "dtype": text(cfg.get("dtype")), "command": text(cfg.get("command")),
            "objective": text(cfg.get("objective")), "min_fill": num(cfg.get("min_fill")),
            "batch_size": integer(cfg.get("batch_size")), "seq_len": integer(cfg.get("seq_len")),
            "study": cfg.get("study") if isinstance(cfg.get("study"), Mapping) else None,
            "device": _device(run, frame), "folder": run.path}


def _pick(run: RunFolder, table, shapes) -> dict[str, Any]:
    layers, priced, names = [], [], list(run.config["layers"])
    split = {n: split_layer_name(n) for n in names}
    short = short_modules([split[n][1] for n in names])
    for name in names:
        c = layer_candidate(run.config["layers"][name])
        index, path = split[name]
        shape = shapes.get(name)
        priced.append((name, shape, c))
        row = (table.get(shape) or {}).get(c) if shape else None
        layers.append({"name": name, "index": index, "module": short[path], "label": c.label, "class": layer_class(c),
                       "method": c.method, "block_size": c.block_size, "factors": c.factors,
                       "transform": c.transform, "backend": c.backend,
                       "d_in": shape[0] if shape else None, "d_out": shape[1] if shape else None,
                       "params": integer(row["params"]) if row else None,
                       "step_ms": num(row["step_ms"]) if row else None,
                       "mem_mb": num(row.get("peak_mem_mb")) if row else None})
    indices = sorted({lay["index"] for lay in layers if lay["index"] is not None})
    x = [str(i) for i in indices] + (["–"] if any(lay["index"] is None for lay in layers) else [])
    classes: dict[str, dict[str, Any]] = {}
    for lay in layers:
        k = classes.setdefault(lay["class"], {"class": lay["class"], "method": lay["method"],
                                              "block_size": lay["block_size"], "layers": 0, "params": 0})
        k["layers"] += 1
        k["params"] = None if k["params"] is None or lay["params"] is None else k["params"] + lay["params"]
    order = {m: i for i, m in enumerate(method_names("adapter"))}
    by_class = sorted(classes.values(), key=lambda k: (order.get(k["method"], 9), k["block_size"] or 0))
    cells = [{"x": "–" if lay["index"] is None else str(lay["index"]), "y": lay["module"], "name": lay["name"],
              "class": lay["class"], "label": lay["label"]} for lay in layers]
    cfg = run.config
    # The pick's summed time is priced as every assignment is priced from measurement rows (the search's
    # baselines, compare's regret): None when some layer's configuration was not measured.
    cost = summed_cost(priced, table)
    totals = {"layers": len(layers), "budget": integer(cfg.get("budget")), "min_fill": num(cfg.get("min_fill")),
              "total_params": integer(cfg.get("total_params")),
              "sum_layer_params": sum(lay["params"] for lay in layers) if all(lay["params"] is not None
                                                                              for lay in layers) else None,
              "sum_layer_step_ms": cost.step_ms,
              **{k: num(cfg.get(k)) for k in ("predicted_overhead_ms", "optimum_overhead_ms", "base_step_ms",
                                              "predicted_step_ms", "measured_step_ms", "predicted_mem_mb",
                                              "measured_mem_mb")}}
    if totals["total_params"] is None:
        totals["total_params"] = totals["sum_layer_params"]
    b, t = totals["budget"], totals["total_params"]
    totals["fill"] = t / b if b and t is not None else None
    return {"layers": layers, "totals": totals,
            "map": {"x": x, "y": list(dict.fromkeys(lay["module"] for lay in layers)), "cells": cells,
                    "classes": by_class}}


def _baseline_rank(row: Mapping[str, Any]) -> int:
    """Baselines in the table's order (unknown ones last)."""
    i = baseline_id(row)
    return BASELINE_IDS.index(i) if i in BASELINE_IDS else len(BASELINE_IDS)


def _bars(run: RunFolder, notes: list[str]) -> list[dict[str, Any]]:
    cols = ("total_params", "predicted_overhead_ms", "predicted_step_ms", "measured_step_ms", "measured_step_ms_p25",
            "measured_step_ms_p75", "predicted_mem_mb", "measured_mem_mb", "measured_overhead_ms",
            "measured_overhead_ms_p25", "measured_overhead_ms_p75", "overhead_pct", "measured_base_step_ms")
    if run.validation is None:
        cfg = run.config
        notes.append("validation.csv is missing: the whole-model comparison with the baselines is not available; "
                     "only the pick's own totals from adapter_config.json are shown")
        bars = [{"label": "pick", "kind": "candidate", "picked": True, "status": "ok",
                 **{c: num(cfg.get(c)) for c in cols}}]
        if num(cfg.get("base_step_ms")) is not None:
            bars.append({"label": "no adapter", "kind": "baseline", "baseline": "none", "picked": False, "status": "ok",
                         **{c: None for c in cols}, "total_params": 0.0, "measured_step_ms": num(cfg["base_step_ms"])})
        return bars
    rows = []
    for i, row in enumerate(run.validation.to_dict("records")):
        label, kind = text(row.get("label")), text(row.get("kind")) or "candidate"
        rows.append((kind != "candidate", not flag(row.get("picked")),
                     _baseline_rank(row) if kind != "candidate" else 0, i,
                     {"label": label, "kind": kind, "baseline": baseline_id(row), "picked": flag(row.get("picked")),
                      "status": text(row.get("status")) or "ok", **{c: num(row.get(c)) for c in cols},
                      "within_noise_of_pick": None if text(row.get("within_noise_of_pick")) in ("", "nan")
                      else flag(row.get("within_noise_of_pick"))}))
    failed = [f"{r[-1]['label']} ({r[-1]['status']})" for r in rows if r[-1]["status"] != "ok"]
    if failed:
        notes.append(f"whole-model validation failed for {len(failed)} assignment(s): {'; '.join(failed)}")
    return [r[-1] for r in sorted(rows, key=lambda r: r[:4])]


def _landscape(frame: pd.DataFrame, table, picked: dict[tuple[int, int], dict[str, int]],
               excluded: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for (d_in, d_out), group in frame.groupby(["d_in", "d_out"], sort=True):
        shape = (int(d_in), int(d_out))
        rows = table.get(shape, {})
        base = next((r for c, r in rows.items() if c.method == "none"), None)
        base_flops = num(base.get("flops_fwd_bwd")) if base else None
        chosen = picked.get(shape, {})
        points, references = [], []
        adapters = method_names("adapter")
        for c, r in sorted(rows.items(), key=lambda kv: (num(kv[1]["params"]) or 0, kv[0].label)):
            flops = num(r.get("flops_fwd_bwd"))
            pt = {"label": c.label, "method": c.method, "block_size": c.block_size, "factors": c.factors,
                  "transform": c.transform, "backend": c.backend, "variant": _variant(c) if c.backend else "",
                  "params": integer(r["params"]), "step_ms": num(r["step_ms"]),
                  "step_ms_p25": num(r.get("step_ms_p25")), "step_ms_p75": num(r.get("step_ms_p75")),
                  "fwd_ms": num(r.get("fwd_ms")), "bwd_ms": num(r.get("bwd_ms")),
                  "mem_mb": num(r.get("peak_mem_mb")),
                  "flops_added": None if flops is None else flops - (base_flops or 0.0),
                  "picked_layers": chosen.get(c.label, 0)}
            if c.method in adapters:
                points.append(pt)
            elif c.method != "none":  # the base layer is every other row's reference, not a point
                references.append(pt)
        timed = [p for p in points if p["flops_added"] is not None and p["step_ms"] is not None]
        fewest = min(timed, key=lambda p: (p["flops_added"], p["step_ms"]), default=None)
        fastest = min(timed, key=lambda p: (p["step_ms"], p["flops_added"]), default=None)
        failed = group[group.status != "ok"]
        layers = group.layers.dropna() if "layers" in group.columns else pd.Series(dtype=float)
        key = f"{shape[0]}x{shape[1]}"
        out.append({
            "key": key, "d_in": shape[0], "d_out": shape[1], "layers": integer(layers.iloc[0]) if len(layers) else None,
            "base": None if base is None else {k: num(base.get(k)) for k in ("step_ms", "fwd_ms", "bwd_ms",
                                                                               "peak_mem_mb", "flops_fwd_bwd")},
            "candidates": points, "references": references, "pareto": pareto_front(points),
            "flops": {"spearman": _spearman([p["flops_added"] for p in timed], [p["step_ms"] for p in timed]),
                      "fewest": fewest and {k: fewest[k] for k in ("label", "flops_added", "step_ms")},
                      "fastest": fastest and {k: fastest[k] for k in ("label", "flops_added", "step_ms")},
                      "base_counted": base_flops is not None},
            "failed": [{"label": row_candidate(r).label, "status": text(r.get("status"))}
                       for r in failed.to_dict("records")],
            "excluded": [{"what": text(e.get("what")), "reason": text(e.get("reason"))}
                         for e in excluded.get(key, []) if isinstance(e, Mapping)],
            "backends": _backends(points)})
    return out


def _backends(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Step time per (family, block size) and per transform/backend variant, aligned for grouped bars."""
    fams = {}
    for p in points:
        fams.setdefault((p["method"], p["factors"] or 0, p["block_size"] or 0), {})[p["variant"]] = p["step_ms"]
    groups = sorted(fams)
    variants = sorted({v for d in fams.values() for v in d},
                      key=lambda v: (_VARIANT_ORDER.index(v) if v in _VARIANT_ORDER else len(_VARIANT_ORDER), v))
    return {"groups": [{"family": m if not f else f"{m} m={f}", "block_size": p} for m, f, p in groups],
            "series": [{"variant": v, "step_ms": [fams[g].get(v) for g in groups]} for v in variants]}


def _search(trials: pd.DataFrame | None, notes: list[str]) -> dict[str, Any] | None:
    if trials is None:
        notes.append("trials.csv is missing: the search history is not available")
        return None
    rows = []
    for r in trials.to_dict("records"):
        rows.append({"number": integer(r.get("number")), "state": text(r.get("state")) or "COMPLETE",
                     "source": text(r.get("source")), "label": text(r.get("label")),
                     "step_ms": num(r.get("step_ms")), "mem_mb": num(r.get("mem_mb")),
                     "total_params": integer(r.get("total_params")), "feasible": flag(r.get("feasible")),
                     "pareto": flag(r.get("pareto"))})
    rows.sort(key=lambda r: (r["number"] is None, r["number"] or 0))
    best, history = math.inf, []
    for r in rows:
        if r["feasible"] and r["step_ms"] is not None and r["step_ms"] < best:
            best = r["step_ms"]
            history.append({"number": r["number"], "step_ms": best})
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: (r["step_ms"] or 0, r["mem_mb"] or 0))
    return {"trials": rows, "best_so_far": history, "front": front,
            "counts": {"trials": len(rows), "feasible": sum(r["feasible"] for r in rows), "pareto": len(front),
                       "seeded": sum(r["source"] not in ("", "sampler") for r in rows)}}


def _predicted_vs_measured(bars: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b in bars:
        pred, meas = b.get("predicted_step_ms"), b.get("measured_step_ms")
        pm, mm = b.get("predicted_mem_mb"), b.get("measured_mem_mb")
        if pred is None and pm is None:
            continue
        out.append({"label": b["label"], "kind": b["kind"], "picked": b["picked"], "status": b["status"],
                    "predicted_step_ms": pred, "measured_step_ms": meas,
                    "step_error_pct": 100 * (pred - meas) / meas if pred is not None and meas else None,
                    "predicted_mem_mb": pm, "measured_mem_mb": mm,
                    "mem_error_pct": 100 * (pm - mm) / mm if pm is not None and mm else None})
    return out


def _method(run: RunFolder, frame: pd.DataFrame) -> dict[str, Any]:
    prof = run.profile or {}
    reps = frame.reps.dropna() if "reps" in frame.columns else pd.Series(dtype=float)
    versions = {}
    for col in ("torch_version", "triton_version", "circtune_version"):
        if col in frame.columns:
            versions[col.removesuffix("_version")] = sorted({text(v) for v in frame[col].dropna() if text(v)})
    stamps = sorted(text(v) for v in frame.timestamp.dropna()) if "timestamp" in frame.columns else []
    space = prof.get("space") if isinstance(prof.get("space"), Mapping) else {}
    return {"timing": prof.get("timing") if isinstance(prof.get("timing"), Mapping) else None,
            "reps": [integer(reps.min()), integer(reps.max())] if len(reps) else None,
            "rows": len(frame), "ok": int((frame.status == "ok").sum()),
            "profile_command": text(prof.get("command")), "search_command": text(run.config.get("command")),
            "space": text(space.get("description") or space.get("source")), "store": text(prof.get("store")),
            "counts": {k: integer(prof.get(k)) for k in ("measured", "reused", "failed") if k in prof},
            "versions": versions, "timestamps": [stamps[0], stamps[-1]] if stamps else None}


def build_report_data(run: RunFolder) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-serialisable data (pure: reads nothing but ``run``)."""
    frame, notes = run_frame(run)
    if run.profile is None:
        notes.append("profile.json is missing: layer shapes are taken from the measurements when there is only one, "
                     "and the timing settings are not shown")
    table, shapes = ok_table(frame), layer_shapes(run, frame)
    pick = _pick(run, table, shapes)
    unmeasured = [lay["name"] for lay in pick["layers"] if lay["step_ms"] is None]
    if unmeasured:
        notes.append(f"{len(unmeasured)} picked layer(s) have no successful measurement of their configuration "
                     f"(first: {unmeasured[0]})")
    picked: dict[tuple[int, int], dict[str, int]] = {}
    for lay in pick["layers"]:
        if lay["d_in"] is not None:
            counts = picked.setdefault((lay["d_in"], lay["d_out"]), {})
            counts[lay["label"]] = counts.get(lay["label"], 0) + 1
    excluded = ((run.profile or {}).get("excluded") or {})
    bars = _bars(run, notes)
    header = _header(run, frame)
    landscape = _landscape(frame, table, picked, excluded if isinstance(excluded, Mapping) else {})
    answer = verdict.verdict(run, bars)
    measured = [b for b in bars if b["measured_step_ms"] is not None] if answer["validated"] else []
    return {"title": f"circtune report: {header['model'] or 'model'} on {header['device']['name']}",
            "header": header, "verdict": answer, "front": verdict.front(run), "allocation": verdict.allocation(run),
            "checks": {"memory": verdict.memory_check(measured), "noisy": verdict.noisy(measured, landscape)},
            "pick": {**pick, "bars": bars if answer["validated"] or run.validation is None else []},
            "landscape": landscape, "search": _search(run.trials, notes),
            "validation": _predicted_vs_measured(measured) if answer["validated"] else [],
            "method": _method(run, frame), "notes": notes}


def report_data(folder: str | Path) -> dict[str, Any]:
    """:func:`load_folder` then :func:`build_report_data`."""
    return build_report_data(load_folder(folder))
