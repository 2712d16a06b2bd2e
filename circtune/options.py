"""What ``circtune.profile`` and ``circtune.search`` are asked to do: typed, frozen options, checked in one place.

The fields are the command's flags (``--min-fill`` is ``min_fill``); the flags that switch something off are
positive here (``--no-peft`` is ``peft=False``, ``--no-validate`` is ``validate=False``, ``--quiet`` is
``progress=False``). Building the options runs every check that needs nothing but the values themselves, cheapest
first, and normalises them (the budget ``"100k"`` becomes ``100000``, ``"cuda:0 "`` becomes ``"cuda:0"``,
``"c3a,cdvft"`` a tuple); a refused value raises :class:`~circtune.errors.OptionError` naming it and what is
accepted. The checks that need the model, the space or the device run when the call starts, before measuring.

This module also holds the defaults that depend on the device (one table per device kind).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import OptionError
from .preflight import PreflightError, check_min_time, check_trials, clamp_threads, parse_device

# Per-layer profiling: a GPU step is milliseconds, a CPU step of a 1024 x 1024 layer tens of them.
PROFILE_DEFAULTS = {
    "cpu": {"tokens": 512, "warmup": 2, "min_reps": 15, "max_reps": 60, "min_time": 0.75},
    "cuda": {"tokens": 4096, "warmup": 10, "min_reps": 30, "max_reps": 300, "min_time": 0.5},
}
# A search profiles at the whole-model steps' token count: on the CPU a small one keeps the default run short.
SEARCH_SHAPE = {"cpu": {"batch": 1, "seq_len": 128}, "cuda": {"batch": 8, "seq_len": 512}}
# Whole-model timing of the validation: a CPU step of roberta-large at 128 tokens is about 2 s.
WHOLE_MODEL = {
    "cpu": {"warmup": 1, "min_reps": 5, "max_reps": 20, "min_time": 4.0},
    "cuda": {"warmup": 5, "min_reps": 20, "max_reps": 200, "min_time": 2.0},
}

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
OBJECTIVES = ("latency", "memory", "balanced")
# circtune.allocation's rules (kept equal there by a test): the balance windows per layer, or none.
ALLOCATIONS = ("balanced", "free")
SAMPLERS = ("tpe", "nsga2")
PLOTLYJS = ("inline", "cdn")
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}
# The built-in adapter methods of the method registry (circtune.adapters.methods) and the backends circtune.space
# knows; both modules import torch, which checking options does not need. A test keeps them equal.
METHOD_CHOICES = ("c3a", "cdvft")
BACKEND_CHOICES = ("torch", "dense", "triton")


class BudgetError(OptionError):
    """A budget that is not a number of parameters."""

    def __init__(self, message: str):
        super().__init__("budget", message)


def parse_budget(text: str | int) -> int:
    """``100k`` -> 100000, ``1.5M`` -> 1500000, ``250000`` -> 250000 (k, M, G/B suffixes, any case)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgb]?)\s*", str(text).lower())
        if not match:
            raise BudgetError(f"budget {text!r} is not a number of parameters; accepted: 100k, 1.5M, 250000")
        value = float(match.group(1)) * _SUFFIX[match.group(2)]
        if not math.isfinite(value) or value > 1e15:
            raise BudgetError(f"budget {text!r} is too large; accepted: up to 1e15 parameters (100k, 1.5M, 2G)")
        if value != int(value):
            raise BudgetError(f"budget {text!r} is not a whole number of parameters")
        value = int(value)
    if value < 1:
        raise BudgetError(f"budget must be at least 1 parameter, got {text!r}")
    return value


def flag(name: str) -> str:
    """The command-line spelling of an option: ``min_fill`` -> ``--min-fill``."""
    return "--" + name.replace("_", "-")


def _whole(name: str, value: Any, least: int | None = 1, *, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"{flag(name)} must be a whole number, got {value!r}")
    if least is not None and value < least:
        raise OptionError(name, f"{flag(name)} must be {'positive' if least else 'zero or more'}, got {value}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, f"{flag(name)} must be a number, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, accepted: Sequence[str], *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if value not in accepted:
        raise OptionError(name, f"{flag(name)}: {value!r} is not accepted; accepted: {', '.join(accepted)}")
    return value


def adapter_methods() -> tuple[str, ...]:
    """The adapter methods options accept: the registry's when it is loaded (so a method a caller registered counts;
    it cannot have been registered otherwise), else the built-in ones, without importing torch to find out."""
    registry = sys.modules.get("circtune.adapters.methods")
    return registry.method_names("adapter") if registry is not None else METHOD_CHOICES


def _names(name: str, value: Any, accepted: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """A comma-separated string or a sequence of strings (each may hold commas) -> a tuple; None stays None."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not all(isinstance(v, str) for v in items):
        raise OptionError(name, f"{flag(name)} takes names (a comma-separated string or a list), got {value!r}")
    names = tuple(v.strip() for item in items for v in item.split(",") if v.strip())
    if not names:
        if accepted is None:  # target module names
            raise OptionError(name, "no target modules given; pass at least one name, e.g. --targets query,value")
        raise OptionError(name, f"{flag(name)} is empty; accepted: {', '.join(accepted)}")
    for v in names:
        if accepted is not None and v not in accepted:
            raise OptionError(name, f"{flag(name)}: {v!r} is not accepted; accepted: {', '.join(accepted)}")
    return names


def _path(name: str, value: Any, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise OptionError(name, f"{flag(name)} must be a path, got {value!r}")
    return os.fspath(value)


def _preflight(name: str, check, *values) -> Any:
    try:
        return check(*values)
    except PreflightError as e:
        raise OptionError(name, str(e)) from None


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    """The options of ``circtune profile`` (see ``circtune profile --help`` for each)."""

    model: str = "roberta-large"
    targets: tuple[str, ...] | None = None
    tokens: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    dtype: str | None = None
    space: str = "default"
    device: str | None = None
    threads: int | None = None
    store: str | None = None
    out: str | None = None
    warmup: int | None = None
    min_reps: int | None = None
    max_reps: int | None = None
    min_time: float | None = None
    lora_ranks: tuple[int, ...] = ()
    peft: bool = True
    retry_failed: bool = False
    claim_timeout: float = 900.0
    progress: bool = True
    isolate: bool = False
    force: bool = False
    # What the checks said without refusing (``--threads`` above the CPUs): printed when the call starts.
    notes: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        self._set(**self._checked())

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict[str, Any]:
        """The checked and normalised values of the profile's options, cheapest check first."""
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model).strip():
            raise OptionError("model", f"--model must be a built-in name, a folder or module:callable, got "
                                       f"{self.model!r}")
        v: dict[str, Any] = {"model": os.fspath(self.model), "targets": _names("targets", self.targets)}
        for name in ("tokens", "batch_size", "seq_len", "threads", "min_reps", "max_reps", "warmup"):
            v[name] = _whole(name, getattr(self, name), least=0 if name == "warmup" else 1)
        if self.min_time is not None:
            v["min_time"] = _preflight("min_time", check_min_time, _number("min_time", self.min_time)) \
                or float(self.min_time)
        claim = _number("claim_timeout", self.claim_timeout)
        if not claim >= 0:  # also refuses nan
            raise OptionError("claim_timeout", f"--claim-timeout must be zero or more, got {self.claim_timeout}")
        v["claim_timeout"] = claim
        if self.tokens is not None and self.batch_size is not None:
            raise OptionError("tokens", "--tokens and --batch-size exclude each other (tokens = batch size x "
                                        "sequence length)")
        if (self.batch_size is None) != (self.seq_len is None):
            raise OptionError("batch_size", "--batch-size and --seq-len go together (tokens = batch size x "
                                            "sequence length)")
        if self.min_reps and self.max_reps and self.min_reps > self.max_reps:
            raise OptionError("min_reps", f"--min-reps {self.min_reps} is larger than --max-reps {self.max_reps}")
        v["dtype"] = _choice("dtype", self.dtype, DTYPE_CHOICES, optional=True)
        v["space"] = _path("space", self.space, optional=False)
        v["store"] = _path("store", self.store)
        v["out"] = _path("out", self.out)
        ranks = self.lora_ranks if isinstance(self.lora_ranks, (list, tuple)) else (self.lora_ranks,)
        v["lora_ranks"] = tuple(_whole("lora_ranks", r, least=None, optional=False) for r in ranks)
        for name in ("peft", "retry_failed", "progress", "isolate", "force"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"{flag(name)} is True or False, got {getattr(self, name)!r}")
        v["device"] = _preflight("device", parse_device, self.device)
        v["threads"], note = clamp_threads(v["threads"])
        v["notes"] = tuple(dict.fromkeys((*self.notes, note))) if note else tuple(self.notes)
        return v

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "notes"}


@dataclass(frozen=True, kw_only=True)
class SearchOptions(ProfileOptions):
    """The options of ``circtune search``: the profile's and the search's own. ``budget`` takes ``100_000`` or
    ``"100k"``; ``validate_min_time`` is the whole-model timing floor in seconds (default: 4 on the CPU, 2 on a
    GPU). ``calibration``: a text file (one text per line) whose gradients on the ``model`` folder's weights weigh
    the layers and configurations (None: uniform); ``allocation``: ``balanced`` (each layer within ½–2× its
    importance-weighted share of the budget) or ``free``; ``capacity_tolerance`` in [0, 1): the pick is the best
    assignment under ``objective`` among those within this fraction of the best capacity at the budget
    (:mod:`circtune.allocation`)."""

    budget: int | str = "100k"
    min_fill: float = 0.9
    objective: str = "latency"
    methods: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    trials: int = 200
    sampler: str = "tpe"
    seed: int = 0
    study_name: str | None = None
    top: int = 3
    validate: bool = True
    validate_min_time: float | None = None
    plotlyjs: str = "inline"
    calibration: str | None = None
    allocation: str = "balanced"
    capacity_tolerance: float = 0.05

    def _checked(self) -> dict[str, Any]:
        if isinstance(self.budget, float) and self.budget.is_integer():
            budget: Any = int(self.budget)
        else:
            budget = self.budget
        v: dict[str, Any] = {"budget": parse_budget(budget)}
        v["trials"] = _whole("trials", self.trials, least=None, optional=False)
        _preflight("trials", check_trials, v["trials"])
        v["top"] = _whole("top", self.top, least=None, optional=False)
        if v["top"] < 1:
            raise OptionError("top", f"--top must be at least 1, got {self.top}")
        fill = _number("min_fill", self.min_fill)
        if not 0 <= fill <= 1:
            raise OptionError("min_fill", f"--min-fill must be within [0, 1], got {self.min_fill}")
        v["min_fill"] = fill
        v["methods"] = _names("methods", self.methods, adapter_methods())
        v["backends"] = _names("backends", self.backends, BACKEND_CHOICES)
        v["objective"] = _choice("objective", self.objective, OBJECTIVES)
        v["sampler"] = _choice("sampler", self.sampler, SAMPLERS)
        v["plotlyjs"] = _choice("plotlyjs", self.plotlyjs, PLOTLYJS)
        v["seed"] = _whole("seed", self.seed, least=None, optional=False)
        if self.study_name is not None and (not isinstance(self.study_name, str) or not self.study_name.strip()):
            raise OptionError("study_name", f"--study-name must be a non-empty name, got {self.study_name!r}")
        if not isinstance(self.validate, bool):
            raise OptionError("validate", f"validate is True or False, got {self.validate!r}")
        if self.validate_min_time is not None:
            seconds = _number("validate_min_time", self.validate_min_time)
            if not math.isfinite(seconds) or seconds < 0:
                raise OptionError("validate_min_time", f"--validate-min-time must be a number of seconds, zero "
                                                       f"or more, got {self.validate_min_time}")
            v["validate_min_time"] = seconds
        v["allocation"] = _choice("allocation", self.allocation, ALLOCATIONS)
        tolerance = _number("capacity_tolerance", self.capacity_tolerance)
        if not 0 <= tolerance < 1:  # also refuses nan
            raise OptionError("capacity_tolerance", f"--capacity-tolerance must be within [0, 1) (a fraction of the "
                                                    f"best capacity), got {self.capacity_tolerance}")
        v["capacity_tolerance"] = tolerance
        v["calibration"] = _path("calibration", self.calibration)
        if v["calibration"] is not None:
            model = self.model if isinstance(self.model, (str, os.PathLike)) else None
            if model is None or not os.path.isdir(model):
                raise OptionError("calibration", f"--calibration needs --model to be a local model folder (weights "
                                                 f"and tokenizer), got --model {self.model!r}")
            if not os.path.isfile(v["calibration"]):
                raise OptionError("calibration", f"--calibration {v['calibration']}: no such file; accepted: a "
                                                 "text file with one calibration text per line")
        return {**v, **super()._checked()}


def option_names(kind: type[ProfileOptions]) -> set[str]:
    return {f.name for f in fields(kind) if f.name != "notes"}


def make_options(kind: type[ProfileOptions], options: dict[str, Any]) -> ProfileOptions:
    """``kind(**options)``, with an unknown option refused in one line naming it and the accepted ones."""
    unknown = sorted(set(options) - option_names(kind))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], option_names(kind), n=1)
        raise OptionError(unknown[0], f"unknown option {unknown[0]!r}"
                                      f"{f'; did you mean {close[0]!r}' if close else ''}; accepted: "
                                      f"{', '.join(sorted(option_names(kind)))}")
    return kind(**options)

