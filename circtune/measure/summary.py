"""The profile table: per shape, the fastest candidate at each parameter count beside the references (LoRA, PEFT C3A).

Built from the CSV frame (:func:`circtune.measure.store.to_frame`), so the table and ``measurements.csv`` can
never disagree. Times, memory and FLOPs are what a layer adds to the frozen base layer's training step (medians,
ms; MiB; forward + backward FLOPs minus the base layer's).
"""

from __future__ import annotations

import pandas as pd

from ..adapters.methods import method_names
from ..space import lora_rank_for


def _ms(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def _ratio(a, b) -> str:
    if a is None or b is None or pd.isna(a) or pd.isna(b) or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def _label(row) -> str:
    parts = [row.method, f"p={int(row.block_size)}"]
    if not pd.isna(row.factors):
        parts.append(f"m={int(row.factors)}")
    parts.append(f"{row.transform}/{row.backend}" if row.transform else row.backend)
    return " ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def summary_table(frame: pd.DataFrame, top: int | None = None) -> str:
    """A text table per (shape, tokens, dtype). ``top`` keeps that many parameter counts (the cheapest)."""
    out = []
    ok = frame[frame.status == "ok"]
    for (d_in, d_out, tokens, dtype), group in ok.groupby(["d_in", "d_out", "tokens", "dtype"], sort=False):
        base = group[group.method == "none"]
        lora = group[group.method == "lora"].set_index("factors")
        peft = group[group.method == "peft-c3a"].set_index("block_size")
        ours = group[group.method.isin(method_names("adapter"))]
        layers = group.layers.dropna()
        title = f"{d_in} x {d_out}" + (f" ({int(layers.iloc[0])} layers)" if len(layers) else "")
        title += f", {tokens} tokens, {dtype}"
        base_flops = base.flops_fwd_bwd.iloc[0] if len(base) else None
        if len(base):
            b = base.iloc[0]
            title += f": base layer step {_ms(b.step_ms)} ms (fwd {_ms(b.fwd_ms)}, bwd {_ms(b.bwd_ms)})"
        out.append(title)
        rows = []
        best = ours.sort_values(["params", "step_ms"]).groupby("params", sort=True).head(1)
        if top is not None:
            best = best.head(top)
        for row in best.itertuples():
            rank = lora_rank_for(row.params, d_in, d_out)
            lora_ms = lora.step_ms.get(rank)
            peft_ms = peft.step_ms.get(row.block_size) if row.method == "c3a" else None
            added = None if base_flops is None or pd.isna(base_flops) else row.flops_fwd_bwd - base_flops
            mflop = "-" if added is None or pd.isna(added) else f"{added / 1e6:,.0f}"
            rows.append([f"{row.params:,}", _label(row), _ms(row.step_ms), _ms(row.fwd_ms), _ms(row.bwd_ms),
                         _ms(row.peak_mem_mb), mflop, f"r={rank}", _ms(lora_ms), _ratio(row.step_ms, lora_ms),
                         _ms(peft_ms), _ratio(peft_ms, row.step_ms)])
        header = ["params", "fastest candidate", "step+ms", "fwd+ms", "bwd+ms", "mem+MB", "MFLOP+ f+b",
                  "LoRA", "LoRA ms", "vs LoRA", "PEFT-C3A ms", "PEFT/ours"]
        out += _table(header, rows) if rows else ["  (no successful candidate)"]
        out.append("")
    if out:
        out.append("step+/fwd+/bwd+ ms, mem+ MB, MFLOP+: what the layer adds to the frozen base layer (medians); "
                   "vs LoRA: ours / LoRA at the closest parameter count; PEFT/ours: PEFT's C3A at the same p / ours")
        out.append("")
    failed = frame[frame.status != "ok"]
    if len(failed):
        out.append(f"{len(failed)} failed:")
        for row in failed.itertuples():
            what = row.method if row.method not in method_names("adapter") else _label(row)
            out.append(f"  {row.d_in}x{row.d_out} {row.dtype} {what}: {row.status}")
    return "\n".join(out).rstrip() + "\n"

