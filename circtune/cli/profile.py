"""``circtune profile``: measure every candidate adapter of a model's target shapes on this device."""

from __future__ import annotations

import argparse
import time

NAME = "profile"
HELP = "measure latency, memory and FLOPs of every candidate adapter configuration on this device"


def add_model_arguments(p: argparse.ArgumentParser, tokens_default: str = "512 on the CPU, 4096 on a GPU") -> None:
    """Arguments that say what to profile and how; shared with ``circtune search`` (whose default token count
    is not the profile's)."""
    p.add_argument("--model", default="roberta-large",
                   help="built-in name (see `circtune models`), a folder with config.json, or module:callable "
                        "(default: %(default)s)")
    p.add_argument("--targets", action="append", metavar="NAMES",
                   help="target module names, comma-separated or repeated (default: per model family)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tokens", type=int, help=f"tokens per step: rows of x (default: {tokens_default})")
    size.add_argument("--batch-size", type=int, help="with --seq-len: tokens = batch size x sequence length")
    p.add_argument("--seq-len", type=int, help="sequence length (with --batch-size)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="training dtype (default: the space's dtypes; 'auto' = bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--space", default="default",
                   help="search-space TOML file or built-in name: default, encoder, vision, decoder "
                        "(default: %(default)s)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's default, the physical cores)")
    p.add_argument("--store", "--storage", dest="store", metavar="URL",
                   help="measurement store (and Optuna storage): a SQLAlchemy URL or a SQLite file path "
                        "(default: OUT/circtune.db)")
    p.add_argument("--out", help="output folder (default: runs/<model>-<device>; for circtune profile, "
                                 "runs/<model>-<device>-profile)")
    timing = p.add_argument_group("timing (defaults fit the device)")
    timing.add_argument("--warmup", type=int, help="untimed steps first (CPU 2, GPU 10)")
    timing.add_argument("--min-reps", type=int, help="at least this many timed steps (CPU 15, GPU 30)")
    timing.add_argument("--max-reps", type=int, help="at most this many timed steps (CPU 60, GPU 300)")
    timing.add_argument("--min-time", type=float, help="keep timing until this many seconds passed (CPU 0.75, GPU 0.5)")
    p.add_argument("--lora-ranks", type=int, nargs="+", default=[], metavar="R",
                   help="LoRA ranks to measure besides the ones matching each candidate's parameter count")
    p.add_argument("--no-peft", action="store_true",
                   help="skip PEFT's C3A (its per-layer reference and the whole-model baseline)")
    p.add_argument("--retry-failed", action="store_true", help="measure failed rows of the store again")
    p.add_argument("--claim-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="with several workers on one store: take over a job another worker claimed this long ago "
                        "without storing it (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--isolate", action="store_true",
                   help="measure each configuration in a child process, so a crash (e.g. a broken CUDA context) "
                        "is recorded as a failure and the run goes on")
    p.add_argument("--force", action="store_true",
                   help="write into an output folder that holds files of another command, or of this command with "
                        "other options (another model, budget, space...)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--top", type=int, help="rows per shape in the printed table (default: all)")


# Flags whose option is the positive form (--no-peft is peft=False) or takes another name.
_RENAMED = {"no_peft": ("peft", lambda v: not v), "no_validate": ("validate", lambda v: not v),
            "quiet": ("progress", lambda v: not v)}


def options_from_args(args: argparse.Namespace, kind):
    """The library's options (``kind``: ProfileOptions or SearchOptions) from the parsed flags; building them runs
    the checks that need nothing but the values."""
    from ..options import option_names

    names = option_names(kind)
    values = {}
    for key, value in vars(args).items():
        name, convert = _RENAMED.get(key, (key, None))
        if name in names:
            values[name] = convert(value) if convert else value
    if values.get("lora_ranks") is not None:
        values["lora_ranks"] = tuple(values["lora_ranks"])
    return kind(**values)


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..errors import UsageError
    from ..measure.summary import summary_table
    from ..options import ProfileOptions
    from ..outputs import RunFiles

    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    started = time.perf_counter()
    result = api.profile(options=options_from_args(args, ProfileOptions))
    files = RunFiles(result.folder)
    print(summary_table(result.measurements, top=args.top))
    for e in result.exclusions:
        print(f"excluded for {e.shape[0]}x{e.shape[1]}: {e.what}: {e.reason}")
    print(f"{result.measured} measured, {result.reused} already in the store, {result.failed} failed; "
          f"{time.perf_counter() - started:.1f} s. Wrote {files.measurements} and {files.profile}; store: "
          f"{result.store}")
    return 0
