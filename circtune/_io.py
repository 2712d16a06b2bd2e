"""Output files are written to a temporary name beside them and renamed: a reader never sees half a file, and a
run stopped halfway leaves the previous complete file in place."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, frame.to_csv(index=False, float_format="%.6g"))
