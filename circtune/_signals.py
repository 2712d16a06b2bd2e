"""Ctrl-C and SIGTERM stop a run between database writes, never inside one.

The CLI routes both signals to :func:`interrupt`, and on interruption prints one line with what the run kept, as
the profiler and the study note it (:func:`note_kept`). Inside :func:`deferred_interrupts` (a claim, a stored
measurement, a release) the signal is only noted, and raised as KeyboardInterrupt when the write is done, so a
stopped run never leaves a half-written row or a claim that no one releases.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
_pending = False
_kept: dict[str, str] = {}


def note_kept(what: str, text: str) -> None:
    """Record, under ``what``, what this run has put in the store so far (for the interrupt summary)."""
    _kept[what] = text


def kept_summary() -> str:
    """What this run has kept, as noted by :func:`note_kept` ("nothing yet" before the first note)."""
    return "; ".join(_kept.values()) or "nothing new yet"


def reset_kept() -> None:
    _kept.clear()


def interrupt(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = True
    else:
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            _pending = False
            raise KeyboardInterrupt
