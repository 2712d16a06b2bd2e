"""Checks that need no measurement, run before any: each takes plain values and raises :class:`PreflightError`
with one line naming the value, the rule and what would work.

They are what the CLI runs first (and what a library call will run first): a budget that no assignment can meet
is refused from parameter counts, not after minutes of profiling; a sequence longer than the model's positions,
a token count that cannot fit in memory, a space that fits no target layer, a model that cannot be validated,
likewise.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from .errors import UsageError

# The study evaluates a trial in milliseconds; a million would take hours and fill the store with rows.
MAX_TRIALS = 100_000
MAX_MIN_TIME_S = 3600.0
_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")
# Activations and gradients a layer's training step holds at the least: its input, its output and their
# gradients (the profiler keeps more: the base layer's output beside the adapter's).
_TENSORS_PER_STEP = 2


class PreflightError(UsageError):
    """A value refused before anything is measured."""


def format_count(n: float) -> str:
    """1234567 -> '1.23M', 100000 -> '100k'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


def _bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{int(n)} B"


def check_trials(trials: int) -> None:
    if trials < 1:
        raise PreflightError(f"--trials must be at least 1, got {trials}")
    if trials > MAX_TRIALS:
        raise PreflightError(f"--trials {trials} is more than one study runs (at most {MAX_TRIALS:,}; 200 trials "
                             "take about half a minute on a CPU)")


def check_min_time(seconds: float | None) -> None:
    """``--min-time``: finite, zero or more, at most an hour per configuration (nan would be written into
    profile.json and time nothing)."""
    if seconds is None:
        return
    if not math.isfinite(seconds) or seconds < 0:
        raise PreflightError(f"--min-time must be a number of seconds, zero or more, got {seconds}")
    if seconds > MAX_MIN_TIME_S:
        raise PreflightError(f"--min-time {seconds:g} s is more than an hour per configuration; accepted: 0 to "
                             f"{MAX_MIN_TIME_S:g}")


def clamp_threads(threads: int | None, cpus: int | None = None) -> tuple[int | None, str | None]:
    """``--threads`` above the CPUs this process may use is clamped to them: (threads, the note to print)."""
    if threads is None:
        return None, None
    cpus = cpus or _usable_cpus()
    if threads > cpus:
        return cpus, f"--threads {threads} is more than the {cpus} CPUs here; using {cpus}"
    return threads, None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_device(text: str | None) -> str | None:
    """``cpu``, ``cuda`` or ``cuda:N`` (whitespace and case forgiven); None stays None (the default device)."""
    if text is None:
        return None
    match = _DEVICE.fullmatch(text.strip().lower())
    if not match:
        raise PreflightError(f"device {text!r} is not a device torch knows that circtune measures on; accepted: "
                             "cpu, cuda, cuda:N")
    kind, index = match.groups()
    if kind == "cpu" and index is not None:
        raise PreflightError(f"device {text!r}: the CPU has no index (all its cores are one device; --threads sets "
                             "how many are used); accepted: cpu, cuda, cuda:N")
    return kind if index is None else f"{kind}:{int(index)}"


def check_tokens_fit(tokens: int, shapes: Sequence[tuple[int, int]], dtype_bytes: int, memory_bytes: int | None,
                     device: str) -> None:
    """Refuse a token count whose smallest possible training step of the largest target layer (input, output and
    their gradients) exceeds the device's memory: it would fail in every configuration."""
    if not shapes or not memory_bytes:
        return
    d_in, d_out = max(shapes, key=lambda s: s[0] + s[1])
    need = tokens * (d_in + d_out) * dtype_bytes * _TENSORS_PER_STEP
    if need > memory_bytes:
        fits = memory_bytes // ((d_in + d_out) * dtype_bytes * _TENSORS_PER_STEP)
        raise PreflightError(f"--tokens {tokens:,}: one training step of the {d_in}x{d_out} layer needs at least "
                             f"{_bytes(need)}, more than the {_bytes(memory_bytes)} of {device}; use at most "
                             f"{format_count(fits)} tokens (a few thousand measure well)")


def max_positions(config) -> int | None:
    """The longest sequence a transformers config takes, or None when it does not say (RoBERTa's positions start
    after the padding index)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm"):
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return max(1, limit)


def check_seq_len(seq_len: int, limit: int | None, model: str) -> None:
    if limit is not None and seq_len > limit:
        raise PreflightError(f"--seq-len {seq_len} is longer than {model} takes ({limit} positions); use "
                             f"--seq-len {limit} or less")


def budget_range(layer_ranges: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(smallest, largest) total adapter parameters over the target layers, from each layer's (min, max)."""
    return sum(lo for lo, _ in layer_ranges), sum(hi for _, hi in layer_ranges)


def check_budget(budget: int, min_fill: float, layer_ranges: Sequence[tuple[int, int]], what: str) -> None:
    """A budget that no assignment can meet: every total lies in [smallest, largest], and the search needs one in
    [min_fill·budget, budget]. ``what`` says which layers and space (for the message)."""
    smallest, largest = budget_range(layer_ranges)
    widest = math.floor(largest / min_fill) if min_fill > 0 else None
    if budget < smallest or (min_fill > 0 and math.ceil(min_fill * budget) > largest):
        upper = f"{format_count(widest)}" if widest is not None else "any"
        raise PreflightError(
            f"budget {format_count(budget)} cannot be met: {what} take from {smallest:,} to {largest:,} adapter "
            f"parameters; budgets from {format_count(smallest)} to {upper} work (--min-fill {min_fill:g})")


def describe_space_misfit(shapes: Mapping[tuple[int, int], Sequence[str]], source: str,
                          block_sizes: Sequence[int] | None) -> str:
    """One line naming the space file, the layers whose shape none of its block sizes divides, and what would."""
    (d_in, d_out), names = next(iter(shapes.items()))
    g = math.gcd(d_in, d_out)
    divisors = [p for p in range(1, g + 1) if g % p == 0]
    sizes = ", ".join(map(str, block_sizes)) if block_sizes else "its block_sizes range"
    more = f" (and {len(shapes) - 1} more shape(s))" if len(shapes) > 1 else ""
    return (f"search space {source}: no block size in it ({sizes}) divides both dimensions of the {d_in}x{d_out} "
            f"target layer(s) {', '.join(names[:2])}{' ...' if len(names) > 2 else ''}{more}; a block size must "
            f"divide gcd(d_in, d_out)={g}: {', '.join(map(str, divisors[-8:]))}")
