"""HTML primitives shared by the report and ``circtune compare``: escaping, number formatting, tables, notes,
charts as ``<div>`` s, the page with one copy of plotly.js, and the colours every chart uses.

One page, one copy of plotly.js (inlined, so the file works offline; or one CDN ``<script src>`` with
``plotlyjs="cdn"``), then each chart as a ``<div>`` and a ``Plotly.newPlot`` call. Every piece of text from a
folder (model, layer and device names, commands) is escaped with :func:`html.escape`, in the page and inside the
charts (plotly draws a few HTML tags and decodes entities, so escaped text shows as written).
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs, get_plotlyjs_version

PLOTLYJS = ("inline", "cdn")
# How each registered method is drawn: (marker colour, colour scale of its block sizes in the per-layer map, marker
# symbol). A method without an entry (one registered later) is drawn in a spare colour, so it never needs one.
METHOD_STYLES = {"c3a": ("#1f77b4", "Blues", "circle"), "cdvft": ("#ff7f0e", "Oranges", "circle"),
                 "lora": ("#7f7f7f", "Greys", "x"), "peft-c3a": ("#9467bd", "Purples", "triangle-up")}
KIND_COLOURS = {"pick": "#2ca02c", "candidate": "#1f77b4", "baseline": "#9a9a9a"}
# One colour per transform/backend in every chart; unknown variants take the rest in turn.
# (dense and triton take no transform: their variant is the backend alone)
VARIANT_COLOURS = {"rfft/torch": "#1f77b4", "fft/torch": "#d62728", "dft/torch": "#ff7f0e", "dense": "#2ca02c",
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


def hover(*lines: str) -> str:
    return "<br>".join(lines) + "<extra></extra>"


def method_style(method: str) -> tuple[str, str, str]:
    """(colour, colour scale, symbol) of ``method``'s points (see METHOD_STYLES)."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    return _SPARE[sum(map(ord, method)) % len(_SPARE)], "Greys", "diamond"


def variant_colours(variants: Iterable[str]) -> dict[str, str]:
    spare = iter(_SPARE * 10)
    return {v: VARIANT_COLOURS.get(v) or next(spare) for v in dict.fromkeys(variants)}

