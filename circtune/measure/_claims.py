"""Worker identity, and claims: which worker is measuring a key, and named locks, in the store's database.

A claim is a row whose primary key is the digest of what is claimed, so taking one is an atomic insert on every
database. The profiler claims each measurement it takes; the search and the pipeline hold named locks (Optuna's
table creation, a study's seeds, a run's outputs). A worker that dies leaves its claim behind: another worker
takes it over after a timeout, or at once when the dead worker was a process on this host.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, Float, String, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from .._signals import deferred_interrupts
from ._database import Base


class ClaimRow(Base):
    """A worker's claim on a key it is measuring: the primary key makes claiming atomic on every database."""

    __tablename__ = "circtune_claims"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    worker: Mapped[str] = mapped_column(String(200))
    claimed_at: Mapped[float] = mapped_column(Float)


def this_worker() -> str:
    """This process's worker name, ``host:pid``: what claims and trials record as their owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_worker(worker: str) -> bool:
    """True for a ``host:pid`` worker on this host whose process is gone (a killed run being re-run): its claim
    need not wait for the timeout."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def claim(engine: Engine, name: str, worker: str, timeout_s: float = 900.0) -> bool:
    """Atomically take ``name`` for ``worker``: True if this worker holds it now. A claim older than
    ``timeout_s`` (its worker died) is taken over with a compare-and-set on its timestamp, so two workers never
    both win it."""
    with deferred_interrupts():
        return _claim(engine, _digest(name), worker, timeout_s)


def _claim(engine: Engine, digest: str, worker: str, timeout_s: float) -> bool:
    now = time.time()
    try:
        with Session(engine) as s, s.begin():
            s.add(ClaimRow(key=digest, worker=worker, claimed_at=now))
        return True
    except IntegrityError:  # held already
        pass
    with Session(engine) as s, s.begin():
        row = s.get(ClaimRow, digest)
        if row is None:  # released in between: try again from the top
            return _claim(engine, digest, worker, timeout_s)
        if row.worker == worker:
            return True
        if now - row.claimed_at < timeout_s and not dead_local_worker(row.worker):
            return False
        taken = s.execute(update(ClaimRow).where(ClaimRow.key == digest, ClaimRow.claimed_at == row.claimed_at)
                          .values(worker=worker, claimed_at=now))
        return taken.rowcount == 1


def release(engine: Engine, name: str, worker: str) -> None:
    """Drop ``worker``'s claim on ``name`` (a claim another worker has taken over is left alone)."""
    with deferred_interrupts(), Session(engine) as s, s.begin():
        s.execute(delete(ClaimRow).where(ClaimRow.key == _digest(name), ClaimRow.worker == worker))


@contextmanager
def lock(engine: Engine, name: str, worker: str, *, poll_s: float = 0.1, timeout_s: float = 900.0) -> Iterator[None]:
    """Hold the named lock ``name`` (a claim) for the ``with`` block, waiting while another worker holds it; a
    dead worker's lock is taken over as with :func:`claim`."""
    while not claim(engine, name, worker, timeout_s):
        time.sleep(poll_s)
    try:
        yield
    finally:
        release(engine, name, worker)


def check_writable(engine: Engine) -> None:
    """Raise the driver's error at once on a database that takes no writes: a write that changes nothing (no
    claim has an empty key) must be allowed."""
    with Session(engine) as s, s.begin():
        s.execute(delete(ClaimRow).where(ClaimRow.key == ""))
