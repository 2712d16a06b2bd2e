"""Ctrl-C and SIGTERM stop a run between database writes, never inside one.

A library call routes both signals to :func:`interrupt` for its duration (:func:`handling_interrupts`); the CLI,
on interruption, prints one line with what the run kept, as the profiler and the study note it
(:func:`note_kept`). The signal is only noted, and raised as KeyboardInterrupt when the write is done, in two
places:

* inside :func:`deferred_interrupts` (a claim, a stored measurement, a release), so a stopped run never leaves a
  half-written row or a claim that no one releases; raised when the block ends;
* while the code running is a database library's (SQLAlchemy, its drivers) or Optuna's, including their
  finalizers, which the garbage collector may run at any moment: raised there, the exception would be logged
  with a traceback or swallowed, or would skip Optuna's clean-up (a heartbeat thread left running keeps the
  process alive). Raised at the next :func:`check_interrupted` (the next trial or measurement), or by a retry
  every few milliseconds that finds circtune's own code running.

A second Ctrl-C while one is pending stops at once. The study and the profiler also call :func:`check_interrupted`
at each trial and measurement: it raises a pending interrupt there, and raises again one that a finalizer elsewhere
swallowed.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
_pending = False
_raised = False
_kept: dict[str, str] = {}
_LIBRARIES = ("sqlalchemy", "psycopg", "psycopg2", "sqlite3", "alembic", "optuna")
_RETRY = getattr(signal, "SIGALRM", None)  # the retry of a deferred interrupt (POSIX)
_RETRY_S = 0.02


def note_kept(what: str, text: str) -> None:
    """Record, under ``what``, what this run has put in the store so far (for the interrupt summary)."""
    _kept[what] = text


def kept_summary() -> str:
    """What this run has kept, as noted by :func:`note_kept` ("nothing yet" before the first note)."""
    return "; ".join(_kept.values()) or "nothing new yet"


def reset_kept() -> None:
    _kept.clear()


def install() -> None:
    """Route SIGINT and SIGTERM (and the retry's SIGALRM) to :func:`interrupt`; call from the main thread."""
    global _pending, _raised
    _pending = _raised = False
    for name in ("SIGINT", "SIGTERM", "SIGALRM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupt)


@contextmanager
def handling_interrupts() -> Iterator[None]:
    """:func:`install` for the duration of the block (in the main thread; elsewhere signals are not ours to
    route), then the handlers as they were: a library call leaves the caller's process as it found it. SIGALRM
    and the real-time interval timer are the retry's while the block runs. What the run kept is noted afresh."""
    reset_kept()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGALRM") if hasattr(signal, n)]
    # None: a handler not set from Python; the default action is the closest one Python can put back
    saved = {s: signal.getsignal(s) for s in signals}
    install()
    try:
        yield
    finally:
        disarm()
        for s, handler in saved.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _in_library_code(frame) -> bool:
    """Whether the code running at ``frame`` belongs to one of :data:`_LIBRARIES`: the first frame outward that is
    not the standard library's (threading, contextlib, ...) decides."""
    while frame is not None:
        top = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if top in _LIBRARIES:
            return True
        if top not in sys.stdlib_module_names:
            return False
        frame = frame.f_back
    return False


def _raise() -> None:
    global _raised
    disarm()  # nothing left pending, no retry left armed
    _raised = True
    raise KeyboardInterrupt


def interrupt(signum, frame) -> None:
    global _pending
    retry = _RETRY is not None and signum == _RETRY
    if retry and not _pending:  # already raised
        return
    if _depth:  # a write of ours in progress: raised when the block ends
        _pending = True
        return
    if _RETRY is not None and _in_library_code(frame) and (retry or not _pending):
        _pending = True  # raised by the retry, in circtune's code
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _raise()


def disarm() -> None:
    """Forget an interrupt still waiting for a library to return: the command finished first. (An armed retry
    would otherwise fire at exit, after Python restored SIGALRM's default action, which kills.)"""
    global _pending
    _pending = False
    if _RETRY is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)


def check_interrupted() -> None:
    """Raise a pending interrupt now, or again one that was raised while the run is still going (a finalizer
    swallowed it). The study calls this at the start of each trial and after it, the profiler after each
    measurement: points where stopping loses nothing stored, and that come round every few milliseconds, whereas
    the retry may find library code running many times over (Optuna's sampler and storage take most of a trial)."""
    if (_pending and not _depth) or _raised:
        _raise()


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            _raise()
