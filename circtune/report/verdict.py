"""The answers a reader looks for first, as plain data: what the pick costs over the frozen model (measured, paired),
against LoRA, PEFT's C3A and uniform C3A at the same budget, which differences are inside the noise, how much of
the gradient energy each captures, and the line that applies the config; then the time-versus-capacity front
(front.csv) and the per-layer allocation (allocation.csv), and the checks a reader should see next to them
(memory predicted against measured, noisy measurements).

Older runs (no paired columns in validation.csv, no front.csv or allocation.csv) still give a verdict: the added
time is then the difference of two medians timed one after the other, and the page says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..adapters.methods import find_method
from ..candidate import Candidate
from ..outputs import CONFIG_FILE
from .folder import RunFolder, flag, integer, num, short_modules, split_layer_name, text

# A predicted whole-model memory further than this from the measured one gets a note.
MEMORY_TOLERANCE = 0.20
# A whole-model step whose p25-p75 spread is wider than this share of its median is flagged as noisy.
NOISY_SPREAD = 0.15
# A per-layer measurement more than this many times above (or below) both neighbours in its family is flagged.
OUTLIER_FACTOR = 3.0
_COMPARED = ("lora", "peft-c3a", "uniform-c3a")  # the baselines the verdict names (circtune.baselines ids), in order


def _varies_in_factors(method: str) -> bool:
    """Whether a family of ``method``'s points varies in ``factors``: LoRA's (keyed by its rank alone) does; one keyed
    by a block size varies in that and holds its factors fixed (CDVFT's m). Unknown methods: as LoRA."""
    spec = find_method(method)
    return spec is None or not spec.block_size


def _capacity_by_label(front: pd.DataFrame | None) -> dict[str, float]:
    if front is None:
        return {}
    return {text(r.get("label")): c for r in front.to_dict("records")
            if text(r.get("kind")) != "front" and (c := num(r.get("capacity"))) is not None}


def _interval(row: Mapping[str, Any]) -> tuple[float, float] | None:
    lo, hi = row.get("measured_overhead_ms_p25"), row.get("measured_overhead_ms_p75")
    return None if lo is None or hi is None else (lo, hi)


def _added(row: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The measured added time of a validation row: paired (new runs) or the difference of two medians (older)."""
    if row.get("measured_overhead_ms") is not None:
        own_base = row.get("measured_base_step_ms") or (base or {}).get("measured_step_ms")
        pct = row.get("overhead_pct")
        if pct is None and own_base:
            pct = 100 * row["measured_overhead_ms"] / own_base
        return {"ms": row["measured_overhead_ms"], "interval": _interval(row), "pct": pct, "base_ms": own_base,
                "paired": True}
    step, base_ms = row.get("measured_step_ms"), (base or {}).get("measured_step_ms")
    if step is None or base_ms is None:
        return {"ms": None, "interval": None, "pct": None, "base_ms": base_ms, "paired": False}
    lo, hi = row.get("measured_step_ms_p25"), row.get("measured_step_ms_p75")
    return {"ms": step - base_ms, "interval": None if lo is None or hi is None else (lo - base_ms, hi - base_ms),
            "pct": 100 * (step - base_ms) / base_ms if base_ms else None, "base_ms": base_ms, "paired": False}


def _noise(row: Mapping[str, Any], a: Mapping[str, Any], p: Mapping[str, Any]) -> bool | None:
    """validation.csv's ``within_noise_of_pick`` when written; else the same rule (overlapping p25-p75) on what
    the older file has."""
    if row.get("within_noise_of_pick") is not None:
        return row["within_noise_of_pick"]
    if a["interval"] is None or p["interval"] is None:
        return None
    return a["interval"][0] <= p["interval"][1] and p["interval"][0] <= a["interval"][1]


def _ms(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _pct(v: float | None) -> str:
    return "" if v is None else f", {v:+.1f} %"


def _comparison_sentence(c: Mapping[str, Any], pick_capacity: float | None) -> str:
    if c["ms"] is None:
        return f"{c['label']}: not measured ({c['status']})." if c["status"] != "ok" else f"{c['label']}: not measured."
    diff = c["diff_ms"]
    way = "faster" if diff < 0 else "slower"
    noise = {True: "within noise", False: "outside noise", None: "noise not known"}[c["within_noise"]]
    out = (f"{c['label']} measured {_ms(abs(diff))} ms {way} than the pick (adds {_ms(c['ms'])} ms{_pct(c['pct'])}),"
           f" {noise}")
    if c["capacity"] is not None:
        out += f"; it captures {100 * c['capacity']:.1f} % of the gradient energy"
        if pick_capacity is not None:
            out += f" against the pick's {100 * pick_capacity:.1f} %"
    return out + "."


def verdict(run: RunFolder, bars: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The verdict's data from the validation rows (``bars``, as :mod:`circtune.report.data` reads them), front.csv
    and the config's metadata."""
    cfg = run.config
    capacity = _capacity_by_label(run.front)
    pick_capacity = num(cfg.get("capacity"))
    if run.front is not None:
        picked = [num(r.get("capacity")) for r in run.front.to_dict("records") if flag(r.get("picked"))]
        pick_capacity = picked[0] if picked and picked[0] is not None else pick_capacity
    out: dict[str, Any] = {
        "apply": f'model = circtune.apply_adapter(model, "{run.path.rstrip("/")}/{CONFIG_FILE}")',
        "capacity_source": text(cfg.get("capacity_source")) or None, "pick_capacity": pick_capacity,
        "predicted_ms": num(cfg.get("predicted_overhead_ms")), "total_params": integer(cfg.get("total_params")),
        "budget": integer(cfg.get("budget")), "validated": False, "pick": None, "comparisons": [], "floor": None}
    measured = [b for b in bars if b.get("measured_step_ms") is not None or b.get("measured_overhead_ms") is not None]
    if run.validation is None or not measured:
        out["why_not"] = ("validation was skipped (--no-validate): nothing was measured on the whole model"
                          if run.validation is not None else "this folder has no validation.csv")
        return out
    base = next((b for b in bars if b.get("baseline") == "none" and b.get("measured_step_ms") is not None), None)
    pick_row = next((b for b in bars if b["picked"]), None)
    if pick_row is None or pick_row.get("measured_step_ms") is None:
        out["why_not"] = "the pick's whole-model step was not measured" + (
            f" ({pick_row['status']})" if pick_row else "")
        return out
    p = _added(pick_row, base)
    out["validated"] = True
    out["pick"] = {"label": pick_row["label"], **p, "predicted_ms": pick_row.get("predicted_overhead_ms")
                   or out["predicted_ms"], "params": pick_row.get("total_params")}
    if base is not None and base.get("measured_overhead_ms") is not None:
        out["floor"] = {"ms": base["measured_overhead_ms"], "interval": _interval(base)}
    for baseline in _COMPARED:
        for row in (b for b in bars if b.get("baseline") == baseline):
            a = _added(row, base)
            out["comparisons"].append({
                "label": row["label"], "status": row["status"], "ms": a["ms"], "interval": a["interval"],
                "pct": a["pct"], "params": row.get("total_params"), "capacity": capacity.get(row["label"]),
                "diff_ms": None if a["ms"] is None or p["ms"] is None else a["ms"] - p["ms"],
                "within_noise": _noise(row, a, p)})
    for c in out["comparisons"]:
        c["sentence"] = _comparison_sentence(c, pick_capacity)
    return out


def memory_check(bars: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The assignments whose predicted whole-model memory is off by more than :data:`MEMORY_TOLERANCE` of the
    measured one, and one sentence on why (None when every prediction is within it)."""
    off = []
    for b in bars:
        pred, meas = b.get("predicted_mem_mb"), b.get("measured_mem_mb")
        if pred is not None and meas and abs(pred - meas) > MEMORY_TOLERANCE * meas:
            off.append({"label": b["label"], "picked": b["picked"], "predicted_mb": pred, "measured_mb": meas,
                        "off_pct": 100 * (pred - meas) / meas})
    if not off:
        return None
    over = sum(o["off_pct"] > 0 for o in off)
    why = ("the additive model over-counts: it sums each layer's peak, measured alone, while in the whole model "
           "the layers' peaks do not coincide" if over == len(off) else
           "the additive model under-counts: the whole model holds memory that no single layer's measurement sees"
           if over == 0 else "the additive model misses in both directions here")
    return {"rows": off, "why": why}


def noisy(bars: Sequence[Mapping[str, Any]], shapes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Measurements a reader should not trust alone. Whole model: a step whose p25-p75 spread is wider than
    :data:`NOISY_SPREAD` of its median. Per layer: within one shape and one family (LoRA by rank; C3A and PEFT's
    C3A by block size per backend; CDVFT by block size per m), ordered by parameters, a step time more than
    :data:`OUTLIER_FACTOR` times above both neighbours' or below a third of both. (Per-layer p25-p75 spreads are
    not used: an added time near zero makes any ratio of them large.)"""
    out = []
    for b in bars:
        lo, mid, hi = (b.get(k) for k in ("measured_step_ms_p25", "measured_step_ms", "measured_step_ms_p75"))
        if None not in (lo, mid, hi) and mid > 0 and hi - lo > NOISY_SPREAD * mid:
            out.append(f"whole model, {b['label']}: step {mid:,.4g} ms with p25–p75 {lo:,.4g}–{hi:,.4g} ms "
                       f"(spread {100 * (hi - lo) / mid:.0f} % of the median)")
    for s in shapes:
        families: dict[tuple, list] = {}  # what varies within a family: LoRA's rank, the block size otherwise
        for pt in list(s["candidates"]) + list(s["references"]):
            if pt["step_ms"] is not None and pt["params"] is not None:
                key = (pt["method"], pt.get("variant"), None if _varies_in_factors(pt["method"]) else pt["factors"])
                families.setdefault(key, []).append(pt)
        for pts in families.values():
            pts.sort(key=lambda q: q["params"])
            for i in range(1, len(pts) - 1):
                y, a, c = pts[i]["step_ms"], pts[i - 1]["step_ms"], pts[i + 1]["step_ms"]
                if min(a, c) > 0 and (y > OUTLIER_FACTOR * max(a, c) or OUTLIER_FACTOR * y < min(a, c)):
                    out.append(f"{s['d_in']} × {s['d_out']}, {pts[i]['label']}: {y:.4g} ms against {a:.4g} and "
                               f"{c:.4g} ms for its neighbours {pts[i - 1]['label']} and {pts[i + 1]['label']}")
    return out


def front(run: RunFolder) -> dict[str, Any] | None:
    """front.csv's points as plain data (None without the file)."""
    if run.front is None:
        return None
    rows = [{"label": text(r.get("label")), "kind": text(r.get("kind")), "params": integer(r.get("params")),
             "step_ms": num(r.get("step_ms")), "mem_mb": num(r.get("mem_mb")), "capacity": num(r.get("capacity")),
             "picked": flag(r.get("picked"))} for r in run.front.to_dict("records")]
    rows = [r for r in rows if r["step_ms"] is not None and r["capacity"] is not None]
    return {"points": rows, "source": text(run.config.get("capacity_source")) or None,
            "tolerance": num(run.config.get("capacity_tolerance")), "allocation": text(run.config.get("allocation"))}


def allocation(run: RunFolder) -> list[dict[str, Any]] | None:
    """allocation.csv's rows as plain data (None without the file)."""
    if run.allocation is None:
        return None
    keys_num = ("share", "window_lo", "window_hi", "energy", "fraction", "capacity")
    records = run.allocation.to_dict("records")
    names = [text(r.get("layer")) for r in records]
    split = {n: split_layer_name(n) for n in names}
    short = short_modules([split[n][1] for n in names])
    out = []
    for name, r in zip(names, records, strict=True):
        index, path = split[name]
        method, p, m = text(r.get("method")), integer(r.get("block_size")), integer(r.get("factors"))
        out.append({"layer": name, "short": short[path] if index is None else f"{index}.{short[path]}",
                    "config": Candidate(method, p, m).label,
                    "method": method, "block_size": p, "factors": m, "params": integer(r.get("params")),
                    **{k: num(r.get(k)) for k in keys_num}})
    return out
