"""The measurement store: one row per (device, software, shape, tokens, dtype, candidate), in SQL.

A SQLite file by default; any SQLAlchemy URL works (``postgresql://...`` for several workers), and the search
puts its Optuna study in the same database. Tables are prefixed ``circtune_`` so that they live beside Optuna's.
Every measurement is committed as soon as it is taken, so nothing is lost when a run stops halfway, and a
repeated run finds what it already has and measures only the rest.

The store keeps absolute numbers (the layer's whole step, its whole peak, and the medians of its frozen base layer
timed side by side with it); :func:`to_frame` subtracts the base to give what an adapter adds, in the CSV columns
of :data:`CSV_COLUMNS`. The database under it (URLs, engines, SQLite tuning) is set up by :mod:`._database`, and
workers' claims and locks live in :mod:`._claims`; this module re-exports the names other modules use from them.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
from sqlalchemy import Float, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from .._signals import deferred_interrupts
from ..candidate import Candidate
from . import _claims
from ._claims import dead_local_worker, this_worker
from ._database import (
    Base,
    masked_url,
    open_engine,
    sqlite_immediate_transactions,
    sqlite_pragmas,
    storage_url,
)
from .timing import Spread

# The names other modules import from here; the database set-up and the claims live in private modules.
__all__ = ["CSV_COLUMNS", "EXTRA_COLUMNS", "TEXT_COLUMNS", "Measurement", "MeasurementKey", "MeasurementStore",
           "dead_local_worker", "masked_url", "sqlite_immediate_transactions", "sqlite_pragmas", "storage_url",
           "this_worker", "to_frame"]

CSV_COLUMNS = ("model", "d_in", "d_out", "tokens", "dtype", "method", "block_size", "factors", "transform",
               "backend", "params", "fwd_ms", "bwd_ms", "step_ms", "step_ms_p25", "step_ms_p75", "peak_mem_mb",
               "flops_fwd", "flops_fwd_bwd", "status", "device_name", "device_fingerprint", "torch_version",
               "triton_version", "circtune_version", "timestamp")
# Further columns, after the required ones: how many target layers have this shape, the absolute numbers the
# added ones came from, and the spread of forward and backward.
EXTRA_COLUMNS = ("layers", "fwd_ms_p25", "fwd_ms_p75", "bwd_ms_p25", "bwd_ms_p75", "step_ms_total",
                 "base_step_ms", "peak_mem_mb_total", "reps")
# The columns of both that hold text; every other one is a number (blank where absent).
TEXT_COLUMNS = ("model", "dtype", "method", "transform", "backend", "status", "device_name", "device_fingerprint",
                "torch_version", "triton_version", "circtune_version", "timestamp")


@dataclass(frozen=True)
class MeasurementKey:
    device_fingerprint: str
    torch_version: str
    triton_version: str  # "" when Triton is not installed
    circtune_version: str
    d_in: int
    d_out: int
    tokens: int
    dtype: str
    candidate: Candidate

    @property
    def base_key(self) -> MeasurementKey:
        """The key of the frozen base layer's row that this row is compared with."""
        return replace(self, candidate=Candidate("none"))


@dataclass(frozen=True)
class Measurement:
    """Absolute numbers for one key. Times in ms (None when the run failed), memory in MiB."""

    key: MeasurementKey
    status: str  # "ok" or the reason it failed
    device_name: str
    params: int
    fwd: Spread | None = None
    bwd: Spread | None = None
    step: Spread | None = None
    peak_mem_mb: float | None = None
    flops_fwd: int | None = None
    flops_fwd_bwd: int | None = None
    reps: int = 0
    # Medians of the frozen base layer timed in the same window (absent for the base row itself).
    ref_fwd_ms: float | None = None
    ref_bwd_ms: float | None = None
    ref_step_ms: float | None = None
    timestamp: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    settings: Mapping = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _DeviceRow(Base):
    __tablename__ = "circtune_devices"
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    info: Mapped[str] = mapped_column(Text)  # JSON of DeviceInfo.to_dict()


_KEY_COLUMNS = ("device_fingerprint", "torch_version", "triton_version", "circtune_version", "d_in", "d_out",
                "tokens", "dtype", "method", "block_size", "factors", "transform", "backend")


class _MeasurementRow(Base):
    __tablename__ = "circtune_measurements"
    __table_args__ = (UniqueConstraint(*_KEY_COLUMNS, name="circtune_measurement_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    torch_version: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str] = mapped_column(String(64))
    circtune_version: Mapped[str] = mapped_column(String(64))
    d_in: Mapped[int] = mapped_column(Integer)
    d_out: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    # Not-applicable key fields are stored as 0 / "" (NULLs would defeat the unique constraint).
    method: Mapped[str] = mapped_column(String(16))
    block_size: Mapped[int] = mapped_column(Integer)
    factors: Mapped[int] = mapped_column(Integer)
    transform: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(Text)
    device_name: Mapped[str] = mapped_column(String(200))
    params: Mapped[int] = mapped_column(Integer)
    fwd_ms: Mapped[float | None] = mapped_column(Float)
    fwd_ms_p25: Mapped[float | None] = mapped_column(Float)
    fwd_ms_p75: Mapped[float | None] = mapped_column(Float)
    bwd_ms: Mapped[float | None] = mapped_column(Float)
    bwd_ms_p25: Mapped[float | None] = mapped_column(Float)
    bwd_ms_p75: Mapped[float | None] = mapped_column(Float)
    step_ms: Mapped[float | None] = mapped_column(Float)
    step_ms_p25: Mapped[float | None] = mapped_column(Float)
    step_ms_p75: Mapped[float | None] = mapped_column(Float)
    peak_mem_mb: Mapped[float | None] = mapped_column(Float)
    flops_fwd: Mapped[float | None] = mapped_column(Float)  # float: FLOPs of big layers overflow 64-bit SQL ints
    flops_fwd_bwd: Mapped[float | None] = mapped_column(Float)
    reps: Mapped[int] = mapped_column(Integer)
    ref_fwd_ms: Mapped[float | None] = mapped_column(Float)
    ref_bwd_ms: Mapped[float | None] = mapped_column(Float)
    ref_step_ms: Mapped[float | None] = mapped_column(Float)
    timestamp: Mapped[str] = mapped_column(String(40))
    settings: Mapped[str] = mapped_column(Text)


def _key_values(key: MeasurementKey) -> dict:
    c = key.candidate
    return {"device_fingerprint": key.device_fingerprint, "torch_version": key.torch_version,
            "triton_version": key.triton_version, "circtune_version": key.circtune_version, "d_in": key.d_in,
            "d_out": key.d_out, "tokens": key.tokens, "dtype": key.dtype, "method": c.method,
            "block_size": c.block_size or 0, "factors": c.factors or 0, "transform": c.transform or "",
            "backend": c.backend or ""}


def _claim_name(key: MeasurementKey | str) -> str:
    """What a claim is on: a measurement's key (as JSON), or a named lock such as ``study-seeds:NAME``."""
    return key if isinstance(key, str) else json.dumps(_key_values(key), sort_keys=True)


def _spread(row: _MeasurementRow, name: str) -> Spread | None:
    med = getattr(row, name)
    return None if med is None else Spread(getattr(row, f"{name}_p25"), med, getattr(row, f"{name}_p75"))


def _from_row(row: _MeasurementRow) -> Measurement:
    candidate = Candidate(row.method, row.block_size or None, row.factors or None, row.transform or None,
                          row.backend or None)
    key = MeasurementKey(row.device_fingerprint, row.torch_version, row.triton_version, row.circtune_version,
                         row.d_in, row.d_out, row.tokens, row.dtype, candidate)
    flops = [None if v is None else int(v) for v in (row.flops_fwd, row.flops_fwd_bwd)]
    return Measurement(key, row.status, row.device_name, row.params, _spread(row, "fwd_ms"), _spread(row, "bwd_ms"),
                       _spread(row, "step_ms"), row.peak_mem_mb, *flops, row.reps, row.ref_fwd_ms, row.ref_bwd_ms,
                       row.ref_step_ms, row.timestamp, json.loads(row.settings or "{}"))


def _to_row(m: Measurement) -> _MeasurementRow:
    values = _key_values(m.key)
    for name, s in (("fwd_ms", m.fwd), ("bwd_ms", m.bwd), ("step_ms", m.step)):
        values.update({name: s and s.median, f"{name}_p25": s and s.p25, f"{name}_p75": s and s.p75})
    return _MeasurementRow(**values, status=m.status, device_name=m.device_name, params=m.params,
                           peak_mem_mb=m.peak_mem_mb, flops_fwd=m.flops_fwd, flops_fwd_bwd=m.flops_fwd_bwd,
                           reps=m.reps, ref_fwd_ms=m.ref_fwd_ms, ref_bwd_ms=m.ref_bwd_ms, ref_step_ms=m.ref_step_ms,
                           timestamp=m.timestamp, settings=json.dumps(dict(m.settings), sort_keys=True))


class MeasurementStore:
    """Measurements and device fingerprints in one SQL database (created on first use)."""

    def __init__(self, url: str | os.PathLike):
        self.url = storage_url(url)
        self.engine = open_engine(self.url)
        self._check_writable()

    def _check_writable(self) -> None:
        """Fail at once, not after the first measurement, on a database that takes no writes (a read-only file or
        folder, a read-only user or transaction)."""
        try:
            _claims.check_writable(self.engine)
        except DBAPIError as e:
            self.engine.dispose()
            detail = str(e.orig).replace(self.url, masked_url(self.url)).splitlines()[0]
            raise ValueError(f"the measurement store {masked_url(self.url)} is read-only ({detail}); circtune "
                             "writes each measurement as it is taken: point --store at a writable database") from None

    def register_device(self, fingerprint: str, name: str, info: Mapping) -> None:
        try:
            with Session(self.engine) as s, s.begin():
                if s.get(_DeviceRow, fingerprint) is None:
                    s.add(_DeviceRow(fingerprint=fingerprint, name=name,
                                     info=json.dumps(dict(info), sort_keys=True)))
        except IntegrityError:  # another worker registered the same device between our look and our insert
            pass

    def device_info(self, fingerprint: str) -> dict | None:
        with Session(self.engine) as s:
            row = s.get(_DeviceRow, fingerprint)
            return None if row is None else json.loads(row.info)

    def _select(self, key: MeasurementKey):
        values = _key_values(key)
        return select(_MeasurementRow).where(*(getattr(_MeasurementRow, k) == v for k, v in values.items()))

    def get(self, key: MeasurementKey) -> Measurement | None:
        with Session(self.engine) as s:
            row = s.scalars(self._select(key)).first()
            return None if row is None else _from_row(row)

    def add(self, m: Measurement) -> bool:
        """Commit one measurement; False (and nothing changed) if its key is already there, e.g. from another
        worker that measured it first."""
        try:
            with deferred_interrupts(), Session(self.engine) as s, s.begin():
                s.add(_to_row(m))
        except IntegrityError:
            return False
        return True

    def delete(self, key: MeasurementKey) -> None:
        with deferred_interrupts(), Session(self.engine) as s, s.begin():
            for row in s.scalars(self._select(key)).all():
                s.delete(row)

    def query(self, *, device_fingerprint: str | None = None, shapes: Iterable[tuple[int, int]] | None = None,
              tokens: int | None = None, dtype: str | None = None,
              versions: Mapping[str, str] | None = None) -> list[Measurement]:
        """Measurements matching every given filter (``versions``: torch/triton/circtune_version values)."""
        stmt = select(_MeasurementRow)
        if device_fingerprint is not None:
            stmt = stmt.where(_MeasurementRow.device_fingerprint == device_fingerprint)
        if tokens is not None:
            stmt = stmt.where(_MeasurementRow.tokens == tokens)
        if dtype is not None:
            stmt = stmt.where(_MeasurementRow.dtype == dtype)
        for col, value in (versions or {}).items():
            stmt = stmt.where(getattr(_MeasurementRow, col) == value)
        with Session(self.engine) as s:
            rows = [_from_row(r) for r in s.scalars(stmt.order_by(_MeasurementRow.id)).all()]
        if shapes is not None:
            wanted = set(shapes)
            rows = [m for m in rows if (m.key.d_in, m.key.d_out) in wanted]
        return rows

    def claim(self, key: MeasurementKey | str, worker: str, timeout_s: float = 900.0) -> bool:
        """Atomically take ``key`` (a measurement's key or a lock's name) for ``worker``: True if this worker may
        measure it now. A claim older than ``timeout_s`` (its worker died) is taken over, never by two workers."""
        return _claims.claim(self.engine, _claim_name(key), worker, timeout_s)

    def release(self, key: MeasurementKey | str, worker: str) -> None:
        """Drop ``worker``'s claim on ``key`` (a claim another worker has taken over is left alone)."""
        _claims.release(self.engine, _claim_name(key), worker)

    def lock(self, name: str, worker: str, *, poll_s: float = 0.1, timeout_s: float = 900.0):
        """Hold the named lock ``name`` (a claim) for the ``with`` block, waiting while another worker holds it;
        a dead worker's lock is taken over as with :meth:`claim`."""
        return _claims.lock(self.engine, name, worker, poll_s=poll_s, timeout_s=timeout_s)

    def close(self) -> None:
        self.engine.dispose()


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _reference(m: Measurement, base: Mapping[MeasurementKey, Measurement]) -> tuple:
    """(fwd, bwd, step, peak) medians to subtract from ``m``: zero for the base row itself, the base layer timed
    beside it when recorded, else the base row of the same key; None where unknown."""
    if m.key.candidate.method == "none":
        return 0.0, 0.0, 0.0, 0.0
    row = base.get(m.key.base_key)
    fwd, bwd, step = (row.fwd.median, row.bwd.median, row.step.median) if row and row.step else (None,) * 3
    if m.ref_step_ms is not None:
        fwd, bwd, step = m.ref_fwd_ms, m.ref_bwd_ms, m.ref_step_ms
    return fwd, bwd, step, row.peak_mem_mb if row else None


def to_frame(measurements: Sequence[Measurement], model: str,
             layers_per_shape: Mapping[tuple[int, int], int] | None = None) -> pd.DataFrame:
    """One row per measurement in :data:`CSV_COLUMNS` (then :data:`EXTRA_COLUMNS`).

    Times are what the layer adds over its frozen base layer timed side by side with it (the layer's quartiles
    minus the base median); memory is the layer's peak minus the base row's peak. The base layer's own row
    (method ``none``) keeps its absolute numbers.
    """
    base = {m.key: m for m in measurements if m.key.candidate.method == "none" and m.ok}
    records = []
    for m in measurements:
        c = m.key.candidate
        ref_fwd, ref_bwd, ref_step, ref_mem = _reference(m, base)
        fwd, bwd, step = m.fwd, m.bwd, m.step
        records.append({
            "model": model, "d_in": m.key.d_in, "d_out": m.key.d_out, "tokens": m.key.tokens, "dtype": m.key.dtype,
            "method": c.method, "block_size": c.block_size, "factors": c.factors, "transform": c.transform or "",
            "backend": c.backend or "", "params": m.params,
            "fwd_ms": _minus(fwd and fwd.median, ref_fwd), "bwd_ms": _minus(bwd and bwd.median, ref_bwd),
            "step_ms": _minus(step and step.median, ref_step), "step_ms_p25": _minus(step and step.p25, ref_step),
            "step_ms_p75": _minus(step and step.p75, ref_step), "peak_mem_mb": _minus(m.peak_mem_mb, ref_mem),
            "flops_fwd": m.flops_fwd, "flops_fwd_bwd": m.flops_fwd_bwd, "status": m.status,
            "device_name": m.device_name, "device_fingerprint": m.key.device_fingerprint,
            "torch_version": m.key.torch_version, "triton_version": m.key.triton_version,
            "circtune_version": m.key.circtune_version, "timestamp": m.timestamp,
            "layers": (layers_per_shape or {}).get((m.key.d_in, m.key.d_out)),
            "fwd_ms_p25": _minus(fwd and fwd.p25, ref_fwd), "fwd_ms_p75": _minus(fwd and fwd.p75, ref_fwd),
            "bwd_ms_p25": _minus(bwd and bwd.p25, ref_bwd), "bwd_ms_p75": _minus(bwd and bwd.p75, ref_bwd),
            "step_ms_total": step and step.median, "base_step_ms": m.ref_step_ms if c.method != "none" else None,
            "peak_mem_mb_total": m.peak_mem_mb, "reps": m.reps,
        })
    frame = pd.DataFrame.from_records(records, columns=[*CSV_COLUMNS, *EXTRA_COLUMNS])
    for col in ("block_size", "factors", "flops_fwd", "flops_fwd_bwd", "layers"):
        frame[col] = frame[col].astype("Int64")
    return frame
