"""Loading one ``circtune search`` folder for the report and ``circtune compare``: the files, checked and
normalised, and the small readers both use (numbers, candidates, layer names, the run's measurement rows).

Units follow ``measurements.csv``: for adapters and the LoRA / PEFT references, times (ms) and memory (MiB) are what
a layer *adds* to its frozen base layer's training step; the ``none`` rows are the base layer's absolute cost.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..measure.store import CSV_COLUMNS, EXTRA_COLUMNS, TEXT_COLUMNS
from ..outputs import (
    ALLOCATION_FILE,
    CONFIG_FILE,
    FRONT_FILE,
    MEASUREMENTS_FILE,
    TRIALS_FILE,
    VALIDATION_FILE,
    RunFiles,
)
from ..space import Candidate, finite_number

REQUIRED_FILES = (CONFIG_FILE, MEASUREMENTS_FILE)
# The columns the report reads from the optional tables that a search writes next to the config (older runs lack
# the files, which is fine; a file without these columns is not one the report can read).
OPTIONAL_COLUMNS = {FRONT_FILE: ("label", "kind", "step_ms", "capacity", "picked"),
                    ALLOCATION_FILE: ("layer", "params", "share", "window_lo", "window_hi", "capacity")}
# Baselines named by their label's start, in folders written before validation.csv and front.csv had a
# ``baseline`` column (see baseline_id).
_LEGACY_BASELINES = {"no adapter": "none", "lora": "lora", "peft": "peft-c3a", "uniform": "uniform-c3a",
                     "latency-only": "latency-only"}
# What the report reads of measurements.csv (the store's schema, circtune.measure.store): the candidate key, the
# parameters and the time are required; text and number columns are told apart as the store writes them.
_REQUIRED_COLUMNS = ("d_in", "d_out", "method", "block_size", "factors", "transform", "backend", "params", "step_ms",
                     "status")
_NUMERIC = tuple(c for c in CSV_COLUMNS + EXTRA_COLUMNS if c not in TEXT_COLUMNS)
# Backends in the order a reader expects them side by side; others follow alphabetically.


class FolderError(ValueError):
    """A folder that is not a usable ``circtune search`` output; names the folder and the file."""


@dataclass(frozen=True)
class RunFolder:
    """The loaded files of one search folder; the optional ones are None when absent."""

    path: str
    config: dict[str, Any]  # adapter_config.json as JSON (not validated against this machine's backends)
    measurements: pd.DataFrame
    profile: dict[str, Any] | None = None
    trials: pd.DataFrame | None = None
    validation: pd.DataFrame | None = None
    front: pd.DataFrame | None = None  # front.csv: the time-vs-capacity front, candidates and baselines
    allocation: pd.DataFrame | None = None  # allocation.csv: the pick's layers with their share and capacity


# --------------------------------------------------------------------------------------------------- loading
def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f"{folder}: {path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FolderError(f"{folder}: {path.name} should hold a JSON object, got {type(data).__name__}")
    return data


def _read_csv(path: Path, folder: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FolderError(f"{folder}: {path.name} is not a readable CSV: {str(e).splitlines()[0]}") from None


def normalise_measurements(frame: pd.DataFrame, source: str = MEASUREMENTS_FILE) -> pd.DataFrame:
    """Strings with '' for missing, numbers as floats (NaN for missing); refuses a table without the key columns."""
    missing = [c for c in _REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise FolderError(f"{source}: missing column(s) {', '.join(missing)}")
    out = frame.copy()
    for col in TEXT_COLUMNS:
        if col in out.columns:
            out[col] = out[col].fillna("").astype(str)
    for col in _NUMERIC:
        if col in out.columns:
            out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    return out


def load_folder(path: str | Path) -> RunFolder:
    """Read a search folder; refuses one without adapter_config.json or measurements.csv."""
    folder = Path(path)
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a folder (expected the output folder of 'circtune search')")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FolderError(f"{folder}: missing {' and '.join(missing)}; is this the output folder of 'circtune search'?")
    files = RunFiles(folder)
    config = _read_json(files.config, folder)
    if not isinstance(config.get("layers"), Mapping) or not config["layers"]:
        raise FolderError(f"{folder}: adapter_config.json has no 'layers' object")
    measurements = normalise_measurements(_read_csv(files.measurements, folder), str(files.measurements))
    tables = {TRIALS_FILE: files.trials, VALIDATION_FILE: files.validation, FRONT_FILE: files.front,
              ALLOCATION_FILE: files.allocation}
    csv = {name: _read_csv(path, folder) if path.is_file() else None for name, path in tables.items()}
    for name, columns in OPTIONAL_COLUMNS.items():
        frame = csv[name]
        missing = [] if frame is None else [c for c in columns if c not in frame.columns]
        if missing:
            raise FolderError(f"{folder}: {name} lacks column(s) {', '.join(missing)}")
    return RunFolder(
        path=str(folder), config=config, measurements=measurements,
        profile=_read_json(files.profile, folder) if files.profile.is_file() else None,
        trials=csv[TRIALS_FILE], validation=csv[VALIDATION_FILE], front=csv[FRONT_FILE],
        allocation=csv[ALLOCATION_FILE])


# --------------------------------------------------------------------------------------------------- helpers
def num(v: Any) -> float | None:
    """A JSON-safe float: None for missing, NaN and infinities."""
    return finite_number(v)


def integer(v: Any) -> int | None:
    f = num(v)
    return None if f is None else int(round(f))


def flag(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def text(v: Any) -> str:
    return "" if v is None or isinstance(v, float) and math.isnan(v) else str(v)


def baseline_id(row: Mapping[str, Any]) -> str | None:
    """The baseline id (:data:`circtune.baselines.BASELINE_IDS`) of a validation.csv or front.csv row; None for a
    candidate or a front point. Read from the ``baseline`` column; from the label only in older folders."""
    if text(row.get("kind")) != "baseline":
        return None
    given = text(row.get("baseline")).strip()
    if given:
        return given
    low = text(row.get("label")).lower()
    return next((i for prefix, i in _LEGACY_BASELINES.items() if low.startswith(prefix)), None)


def row_candidate(row: Mapping[str, Any]) -> Candidate:
    """The candidate of a measurement row (the key shared with the search)."""
    return Candidate.from_row(row)


def layer_candidate(layer: Mapping[str, Any]) -> Candidate:
    """The candidate an adapter_config.json layer entry names."""
    return Candidate.from_layer(layer)


def layer_class(c: Candidate) -> str:
    """What the per-layer map colours by: method and block size."""
    return f"{c.method} p={c.block_size}"


def split_layer_name(name: str) -> tuple[int | None, str]:
    """``encoder.layer.17.attention.self.query`` -> (17, ``encoder.layer.attention.self.query``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[:i] + parts[i + 1:])
    return None, name


def short_modules(paths: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each path that no other path ends with (``...self.query`` -> ``query``)."""
    unique = list(dict.fromkeys(paths))
    split = {p: p.split(".") for p in unique}
    out = {}
    for p in unique:
        for k in range(1, len(split[p]) + 1):
            suffix = split[p][-k:]
            if not any(q != p and split[q][-k:] == suffix for q in unique):
                break
        out[p] = ".".join(suffix)
    return out


def run_frame(run: RunFolder) -> tuple[pd.DataFrame, list[str]]:
    """The measurement rows this run's search used (its model, tokens, dtype and device), and notes on what was
    left out."""
    frame, notes, cfg = run.measurements, [], run.config
    device = cfg.get("device") if isinstance(cfg.get("device"), Mapping) else {}
    for col, want in (("model", cfg.get("base_model")), ("tokens", cfg.get("tokens")), ("dtype", cfg.get("dtype")),
                      ("device_fingerprint", device.get("fingerprint"))):
        if want is None or col not in frame.columns:
            continue
        keep = frame[col] == (float(want) if col == "tokens" else str(want))
        if keep.any() and not keep.all():
            notes.append(f"measurements.csv: {int((~keep).sum())} row(s) with another {col} than {want!r} left out")
            frame = frame[keep]
    return frame, notes


def layer_shapes(run: RunFolder, frame: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) per target layer: from profile.json, or the single shape of the measurements."""
    targets = ((run.profile or {}).get("model") or {}).get("targets") or []
    shapes = {t["name"]: (int(t["d_in"]), int(t["d_out"])) for t in targets if {"name", "d_in", "d_out"} <= set(t)}
    if not shapes:
        unique = frame[["d_in", "d_out"]].dropna().drop_duplicates()
        if len(unique) == 1:
            shape = (int(unique.d_in.iloc[0]), int(unique.d_out.iloc[0]))
            shapes = {name: shape for name in run.config.get("layers", {})}
    return shapes
