"""The SQL database under the measurement store and the search's Optuna study: URLs, engines and SQLite tuning.

Nothing here knows what is stored: the tables derive from :class:`Base` (claims in :mod:`._claims`, measurements
and devices in :mod:`.store`), and :func:`open_engine` creates whichever of them are missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase

# How long a worker opening a SQLite store keeps trying when SQLite answers "database is locked" at once (the
# connection's own busy timeout, 60 s, covers the waits SQLite does itself).
_LOCKED_RETRY_S = 60.0


class Base(DeclarativeBase):
    """circtune's tables (all prefixed ``circtune_``, so that they live beside Optuna's)."""


def storage_url(spec: str | os.PathLike) -> str:
    """A SQLAlchemy URL as given, or ``sqlite:///<path>`` for a file path (its folder is created)."""
    spec = str(spec)
    if "://" in spec:
        return spec
    path = Path(spec).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def masked_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages, logs and output files."""
    try:
        parsed = make_url(url)
        # Without a password, the URL as typed (rendering would escape it: sqlite:///file%3A/... for file:/...).
        return url if parsed.password is None else parsed.render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: say nothing that might be a secret
        return "<unparsable storage URL>"


def engine_kwargs(url: str) -> dict:
    """``create_engine`` keywords for ``url``: on SQLite, writers from several processes wait up to a minute for
    each other's short transactions instead of failing."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def _is_locked(error: BaseException) -> bool:
    return "database is locked" in str(error).lower()


def _set_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # Switching a new database to WAL takes its exclusive lock. Two workers opening it together can each hold the
    # shared lock that the other's switch waits for; SQLite breaks that deadlock by answering "database is locked"
    # at once, without its busy timeout (seen on CI: a spawned search worker failed to open the store). Try again.
    deadline = time.monotonic() + _LOCKED_RETRY_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except Exception as e:  # the driver's OperationalError
            if not _is_locked(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def sqlite_pragmas(engine: Engine) -> None:
    """On a SQLite engine, every new connection uses write-ahead logging with ``synchronous=NORMAL``: readers
    and the one writer of several worker processes no longer block each other, and a commit costs no fsync (a
    power cut may lose the last commits, never corrupt the file). An Optuna trial writes one row per parameter,
    so this makes a study about 3x faster on SQLite. Other databases are left alone."""
    if engine.dialect.name != "sqlite" or event.contains(engine, "connect", _set_pragmas):
        return
    event.listen(engine, "connect", _set_pragmas)
    engine.dispose()  # connections opened before now reconnect with the pragmas


def _driver_autocommit(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # pysqlite begins no transaction of its own: SQLAlchemy's "begin" does


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_immediate_transactions(engine: Engine) -> None:
    """On a SQLite engine, every transaction starts with ``BEGIN IMMEDIATE``, taking the write lock first.

    Python's sqlite3 driver opens a transaction only at the first write, so a read followed by a write is two
    steps that another process can come between. Optuna's storage relies on that pair being atomic (it reads a
    waiting trial's state "for update", then marks it running), and two workers have both popped the same
    enqueued trial that way. With this, the second waits for the first to commit, then sees the trial running.
    Other databases are left alone (PostgreSQL honours FOR UPDATE)."""
    if engine.dialect.name != "sqlite" or event.contains(engine, "begin", _begin_immediate):
        return
    event.listen(engine, "connect", _driver_autocommit)
    event.listen(engine, "begin", _begin_immediate)
    engine.dispose()


def _check_sqlite_folder(url: str) -> None:
    """A SQLite URL whose folder does not exist: say so (SQLite itself only says 'unable to open database file')."""
    try:
        parsed = make_url(url)
    except Exception:  # reported with the driver's own words when the engine is created
        return
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return
    folder = Path(database).expanduser().absolute().parent
    if not folder.is_dir():
        raise ValueError(f"cannot open the measurement store {masked_url(url)}: folder {folder} does not exist "
                         "(create it, or pass a file path instead of a URL: its folder is created)")


def _create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create circtune's tables where missing. Workers opening a new database together race between SQLAlchemy's
    look for a table and its CREATE: the loser sees "already exists" (SQLite, PostgreSQL) or a duplicate key in
    PostgreSQL's catalogue, and looks again, when the tables are there. SQLite may also answer "database is
    locked" at once when the two deadlock on its locks: that is tried again for up to a minute."""
    attempt, deadline = 0, time.monotonic() + _LOCKED_RETRY_S
    while True:
        try:
            Base.metadata.create_all(engine)
            return
        except DBAPIError as e:
            text = str(e.orig).lower()
            if _is_locked(e.orig) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            attempt += 1
            if attempt == attempts or not ("already exists" in text or "duplicate key" in text):
                raise
            time.sleep(0.05 * attempt)


def open_engine(url: str) -> Engine:
    """An engine on ``url`` (as from :func:`storage_url`) with circtune's tables created and, on SQLite, the
    pragmas of :func:`sqlite_pragmas`. Any failure (a bad URL, a missing driver, an unreachable server, a missing
    folder) is a one-line ``ValueError`` naming the store, its password masked."""
    _check_sqlite_folder(url)
    try:
        engine = create_engine(url, **engine_kwargs(url))
        sqlite_pragmas(engine)
        _create_tables(engine)
    except Exception as e:
        detail = str(e).replace(url, masked_url(url)).splitlines()[0]
        if isinstance(e, ModuleNotFoundError) and "psycopg" in str(e):
            detail += " (PostgreSQL needs the driver: pip install 'circtune[postgres]')"
        raise ValueError(f"cannot open the measurement store {masked_url(url)}: {detail}") from None
    return engine
