"""Search spaces: which adapter configurations to consider, read from a declarative TOML file.

A space file (see ``search_spaces/default.toml``, which documents every key) names the methods, the block-size
range, the CDVFT factor counts, the transforms, the backends and the training dtypes. :func:`expand` turns it into
the valid :class:`Candidate` s for one layer shape on one device and records, as :class:`Exclusion` s, why
everything else the file asked for was left out.

The references measured beside the adapters are candidates too (the methods of the ``reference`` role in
:mod:`circtune.adapters.methods`: ``none``, the frozen base layer alone; ``lora`` with its rank in ``factors``;
``peft-c3a``, PEFT's own C3A layer), so that one key and one measurement path cover every row.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .adapters import TRANSFORMS, get_backend
from .adapters.methods import get_method, method_names

# The key the space expands into, re-exported where most callers have always found it.
from .candidate import Candidate as Candidate
from .candidate import finite_number as finite_number

KNOWN_BACKENDS = ("torch", "dense", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_KEYS = ("description", "methods", "block_sizes", "factors", "transforms", "backends", "dtypes")


class SpaceError(ValueError):
    """A search-space file that cannot be used; names the file, the key and what is accepted."""


@dataclass(frozen=True)
class Exclusion:
    """Something the space asked for that is not measured for a shape: None in a field means 'any'."""

    reason: str
    method: str | None = None
    block_size: int | None = None
    factors: int | None = None
    transform: str | None = None
    backend: str | None = None

    @property
    def what(self) -> str:
        fields = [("method", self.method), ("block_size", self.block_size), ("factors", self.factors),
                  ("transform", self.transform), ("backend", self.backend)]
        return ", ".join(f"{k}={v}" for k, v in fields if v is not None) or "everything"


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file. ``block_sizes`` is an explicit tuple, or None to use the [min, max] range."""

    source: str
    methods: tuple[str, ...] = field(default_factory=lambda: method_names("adapter"))
    block_size_min: int = 32
    block_size_max: int = 1024
    block_sizes: tuple[int, ...] | None = None
    factors: tuple[int, ...] = (2, 3, 4)
    transforms: tuple[str, ...] = TRANSFORMS
    backends: tuple[str, ...] = KNOWN_BACKENDS
    dtypes: tuple[str, ...] = ("auto",)
    description: str = ""


def _short(v: Any, limit: int = 60) -> str:
    """repr(v), cut to ``limit`` characters: a hostile file's value goes into one readable line."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error(source: str, key: str, problem: str) -> SpaceError:
    return SpaceError(f"search space {source}: {key}: {problem}")


def _str_list(source: str, key: str, value: Any, accepted: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _error(source, key, f"expected a non-empty list of strings, got {_short(value)}; accepted: "
                     f"{', '.join(accepted)}")
    out = []
    for v in value:
        if v not in accepted:
            raise _error(source, key, f"{_short(v)} is not accepted; accepted: {', '.join(accepted)}")
        if v not in out:
            out.append(v)
    return tuple(out)


def _pos_int(source: str, key: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _error(source, key, f"expected an integer >= {least}, got {_short(value)}")
    return value


def parse_space(data: Mapping[str, Any], source: str = "<dict>") -> SearchSpace:
    """Validate a space mapping (as read from TOML); every value defaults to the built-in default."""
    for key in data:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _error(source, key, f"unknown key{hint}; accepted keys: {', '.join(_KEYS)}")
    kw: dict[str, Any] = {"source": source}
    if "description" in data:
        if not isinstance(data["description"], str):
            raise _error(source, "description", f"expected a string, got {_short(data['description'])}")
        kw["description"] = data["description"]
    if "methods" in data:
        kw["methods"] = _str_list(source, "methods", data["methods"], method_names("adapter"))
    if "transforms" in data:
        kw["transforms"] = _str_list(source, "transforms", data["transforms"], TRANSFORMS)
    if "backends" in data:
        kw["backends"] = _str_list(source, "backends", data["backends"], KNOWN_BACKENDS)
    if "dtypes" in data:
        raw = data["dtypes"]
        raw = [raw] if isinstance(raw, str) else raw
        if isinstance(raw, list):
            raw = [_DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v for v in raw]
        kw["dtypes"] = _str_list(source, "dtypes", raw, ("auto", *DTYPES))
    if "factors" in data:
        raw = data["factors"]
        if not isinstance(raw, list) or not raw:
            raise _error(source, "factors", f"expected a non-empty list of integers >= 2, got {_short(raw)}")
        kw["factors"] = tuple(sorted({_pos_int(source, "factors", v, least=2) for v in raw}))
    if "block_sizes" in data:
        raw = data["block_sizes"]
        if isinstance(raw, list):
            if not raw:
                raise _error(source, "block_sizes", "expected at least one block size")
            kw["block_sizes"] = tuple(sorted({_pos_int(source, "block_sizes", v) for v in raw}))
        elif isinstance(raw, Mapping):
            extra = [k for k in raw if k not in ("min", "max")]
            if extra:
                raise _error(source, f"block_sizes.{extra[0]}", "unknown key; accepted keys: min, max")
            lo = _pos_int(source, "block_sizes.min", raw.get("min", 1))
            hi = _pos_int(source, "block_sizes.max", raw.get("max", 1 << 20))
            if lo > hi:
                raise _error(source, "block_sizes", f"min={lo} is larger than max={hi}")
            kw["block_size_min"], kw["block_size_max"] = lo, hi
        else:
            raise _error(source, "block_sizes", f"expected a table {{ min = .., max = .. }} or a list of integers, "
                         f"got {_short(raw)}")
    return SearchSpace(**kw)


def builtin_spaces() -> dict[str, str]:
    """Names of the space files shipped with circtune (``default``, ``encoder``, ...) -> their description."""
    out = {}
    for entry in sorted(resources.files("circtune.search_spaces").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            space = parse_space(tomllib.loads(entry.read_text()), f"built-in {entry.name}")
            out[entry.name.removesuffix(".toml")] = space.description
    return out


def load_space(spec: str | Path | None = None) -> SearchSpace:
    """A space from a file path, or a built-in name (``default`` when None)."""
    if spec is None or (isinstance(spec, str) and spec in builtin_spaces()):
        name = f"{spec or 'default'}.toml"
        text = resources.files("circtune.search_spaces").joinpath(name).read_text()
        source = f"built-in {name}"
    else:
        path = Path(spec)
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise SpaceError(f"search space {spec}: {what}; pass a .toml file or a built-in name: "
                             f"{', '.join(builtin_spaces())}")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise SpaceError(f"search space {spec}: not a UTF-8 text file ({e.reason} at byte {e.start}); expected "
                             "TOML") from None
        except OSError as e:
            raise SpaceError(f"search space {spec}: cannot read it: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"search space {source}: not valid TOML: {e}") from None
    return parse_space(data, source)


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA device that computes it natively (compute capability 8.0+), fp32 otherwise;
    other names pass through."""
    from .measure.device import bf16_supported

    name = _DTYPE_ALIASES.get(name, name)
    if name == "auto":
        if bf16_supported(device):
            return "bf16"
        return "fp32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; accepted: auto, {', '.join(DTYPES)}")
    return name


def _block_size_universe(space: SearchSpace, d_in: int, d_out: int) -> list[int]:
    """Block sizes worth a word: the explicit list, or within [min, max] the divisors of either dimension and the
    powers of two (so that an exclusion explains why, e.g., p=48 or p=2048 is missing)."""
    if space.block_sizes is not None:
        return list(space.block_sizes)
    lo, hi = space.block_size_min, space.block_size_max
    sizes = {p for d in (d_in, d_out) for p in range(lo, min(hi, d) + 1) if d % p == 0}
    sizes |= {1 << k for k in range(0, 31) if lo <= 1 << k <= hi}
    return sorted(sizes)


def expand(space: SearchSpace, d_in: int, d_out: int,
           device: torch.device | str = "cpu") -> tuple[list[Candidate], list[Exclusion]]:
    """The adapter candidates of ``space`` that are valid for a ``d_in -> d_out`` layer on ``device``, and why
    everything else was excluded. References are not included (see :func:`references`)."""
    device = torch.device(device)
    gcd = math.gcd(d_in, d_out)
    excluded: list[Exclusion] = []
    sizes = []
    for p in _block_size_universe(space, d_in, d_out):
        if gcd % p:
            excluded.append(Exclusion(f"p={p} does not divide both d_in={d_in} and d_out={d_out} "
                                      f"(block sizes must divide gcd={gcd})", block_size=p))
        else:
            sizes.append(p)
    if not sizes:
        excluded.append(Exclusion(f"no block size in the space divides both d_in={d_in} and d_out={d_out}"))
    backends = []
    for name in space.backends:
        try:
            reason = get_backend(name).unavailable_reason(device)
        except ValueError:
            reason = "not available in this installation (no such backend registered)"
        if reason:
            excluded.append(Exclusion(f"backend {name} unavailable on {device}: {reason}", backend=name))
        else:
            backends.append(get_backend(name))
    covered = {}  # (backend, p) -> whether the backend declares p in its range for this shape
    for backend in backends:
        for p in sizes:
            reason = backend.block_size_reason(p, d_in, d_out) if backend.block_size_reason else None
            covered[backend.name, p] = reason is None
            if reason:
                excluded.append(Exclusion(f"backend {backend.name} does not cover p={p}: {reason}", block_size=p,
                                          backend=backend.name))
    candidates = []
    for method in space.methods:
        for p in sizes:
            for m in space.factors if get_method(method).factors else (None,):
                for backend in (b for b in backends if covered[b.name, p]):
                    transforms = space.transforms if backend.uses_transform else (None,)
                    candidates += [Candidate(method, p, m, t, backend.name) for t in transforms]
    for backend in backends:
        if not backend.uses_transform and len(space.transforms) > 1:
            excluded.append(Exclusion(f"backend {backend.name} does not use a transform: measured once, with the "
                                      "transform left empty", transform=", ".join(space.transforms[1:]),
                                      backend=backend.name))
    return candidates, excluded


def lora_rank_for(params: int, d_in: int, d_out: int) -> int:
    """The LoRA rank whose parameter count (``r·(d_in + d_out)``) is closest to ``params`` (at least 1)."""
    return max(1, round(params / _lora_rank_one(d_in, d_out)))


def lora_rank_for_budget(budget: int, shapes: Sequence[tuple[int, int]]) -> int:
    """The search's LoRA baseline: the largest rank whose ``r·Σ(d_in + d_out)`` over every target layer (one
    shape per layer) fits ``budget`` (at least 1)."""
    return max(1, budget // sum(_lora_rank_one(d_in, d_out) for d_in, d_out in shapes))


def _lora_rank_one(d_in: int, d_out: int) -> int:
    """LoRA's parameters per unit of rank on a layer (the registry's count, linear in r)."""
    return get_method("lora").num_params(d_in, d_out, None, 1)


def references(candidates: Sequence[Candidate], d_in: int, d_out: int, *, peft: bool,
               lora_ranks: Sequence[int] = ()) -> list[Candidate]:
    """What every run measures beside the candidates of one shape: the base layer, LoRA at the rank closest to
    each candidate's parameter count (plus ``lora_ranks``), and PEFT's C3A at each C3A block size."""
    bad = [r for r in lora_ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"LoRA rank {_short(bad[0])} is not a positive integer; accepted: ranks >= 1, e.g. "
                         "--lora-ranks 4 8")
    ranks = {lora_rank_for(c.params(d_in, d_out), d_in, d_out) for c in candidates} | set(lora_ranks)
    out = [Candidate("none")] + [Candidate("lora", factors=r) for r in sorted(ranks)]
    if peft:
        out += [Candidate("peft-c3a", block_size=p) for p in sorted({c.block_size for c in candidates
                                                                      if c.method == "c3a"})]
    return out
