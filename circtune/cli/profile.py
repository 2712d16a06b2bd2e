"""``circtune profile``: measure every candidate adapter of a model's target shapes on this device."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

NAME = "profile"
HELP = "measure latency, memory and FLOPs of every candidate adapter configuration on this device"

# Defaults that fit the device: a GPU step is milliseconds, a CPU step of a 1024 x 1024 layer tens of them.
CPU_DEFAULTS = {"tokens": 512, "warmup": 2, "min_reps": 15, "max_reps": 60, "min_time": 0.75}
GPU_DEFAULTS = {"tokens": 4096, "warmup": 10, "min_reps": 30, "max_reps": 300, "min_time": 0.5}


def check_output_folder(out: Path, spec: str, *, force: bool, command: str | None = None, **expected) -> None:
    """Refuse an output folder that holds another run (another model, another command: a profile's folder for a
    search or the other way round, or for ``expected`` keys of adapter_config.json, e.g. another budget) unless
    ``force``: its files would be overwritten. The same command on its own folder is a resume."""
    from .main import UsageError

    if force:
        return
    found = {}
    try:
        if (out / "profile.json").is_file():
            written = json.loads((out / "profile.json").read_text())
            found["model"] = written.get("model", {}).get("spec")
            found["command"] = written.get("subcommand")  # absent from runs written before it was recorded
        if (out / "adapter_config.json").is_file():
            found["command"] = "search"  # only a search writes one
            if expected:
                config = json.loads((out / "adapter_config.json").read_text())
                found.update({k: config.get(k) for k in expected})
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"output folder {out} holds unreadable run files ({e}); use another --out or --force") \
            from None
    wanted = {"model": spec, "command": command, **expected}
    clash = [f"{k} {found[k]!r} (this run: {wanted[k]!r})" for k in found if found[k] is not None
             and wanted[k] is not None and found[k] != wanted[k]]
    if clash:
        raise UsageError(f"output folder {out} holds a run of another {', '.join(clash)}; use another --out, or "
                         "--force to overwrite its files")


def command_line() -> str | None:
    """The command as typed, when run from the ``circtune`` script."""
    return "circtune " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("circtune") else None


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


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
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT C3A baseline")
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


def _check(name: str, value: int | float | None, least: int = 1) -> None:
    from .main import UsageError

    if value is not None and value < least:
        raise UsageError(f"{name} must be {'positive' if least else 'zero or more'}, got {value}")


PROFILE_FILES = ("measurements.csv", "profile.json")


def check_values(args: argparse.Namespace) -> None:
    """The option values that need nothing but themselves, first of all (``args.device`` is normalised and
    ``args.threads`` clamped to the CPUs, with a note)."""
    from ..preflight import check_min_time, clamp_threads, parse_device
    from .main import UsageError

    if getattr(args, "_values_checked", False):  # a search checks them before choosing its batch shape
        return
    args._values_checked = True
    for name in ("tokens", "batch_size", "seq_len", "threads", "min_reps", "max_reps", "warmup"):
        _check("--" + name.replace("_", "-"), getattr(args, name), least=0 if name == "warmup" else 1)
    check_min_time(args.min_time)
    if not args.claim_timeout >= 0:  # also refuses nan
        raise UsageError(f"--claim-timeout must be zero or more, got {args.claim_timeout}")
    if (args.batch_size is None) != (args.seq_len is None):
        raise UsageError("--batch-size and --seq-len go together (tokens = batch size x sequence length)")
    if args.min_reps and args.max_reps and args.min_reps > args.max_reps:
        raise UsageError(f"--min-reps {args.min_reps} is larger than --max-reps {args.max_reps}")
    args.device = parse_device(args.device)
    args.threads, note = clamp_threads(args.threads)
    if note:
        print(f"note: {note}", file=sys.stderr)


def default_out(model_name: str, device_label: str, command: str | None) -> Path:
    """Where a run writes unless --out says otherwise: ``runs/`` (git-ignored), never the committed ``reports/``."""
    return Path("runs") / f"{model_name}-{device_label}{'-profile' if command == 'profile' else ''}"


def check_fit(plans, space, model, *, every_shape: bool) -> None:
    """Refuse a space that gives no candidate to any target shape (``every_shape``: to some target shape)."""
    from ..preflight import PreflightError, describe_space_misfit

    empty = {(p.d_in, p.d_out): [t.name for t in model.targets if t.shape == (p.d_in, p.d_out)]
             for p in plans if not p.candidates}
    if not empty or (not every_shape and len(empty) < len(plans)):
        return
    misfit = {shape: names for shape, names in empty.items()
              if any(e.reason.startswith("no block size") for p in plans if (p.d_in, p.d_out) == shape
                     for e in p.excluded)}
    if misfit:
        raise PreflightError(describe_space_misfit(misfit, space.source, space.block_sizes))
    reasons = sorted({e.reason for p in plans if not p.candidates for e in p.excluded if e.backend})
    raise PreflightError(f"search space {space.source}: no candidate for the {', '.join(f'{a}x{b}' for a, b in empty)} "
                         f"target layer(s): {'; '.join(reasons) or 'every configuration was excluded'}")


def prepare(args: argparse.Namespace, overrides: dict | None = None, lora_budget: int | None = None,
            expected: dict | None = None, more_checks=None, files: tuple[str, ...] = PROFILE_FILES,
            last_check=None):
    """Resolve the model, space, device, settings, output folder and store from the arguments, running every check
    that needs no measurement first. ``more_checks(model, space, plans, info, device, tokens)`` adds the caller's (a
    search's budget) and returns the caller's options for the identity; ``files`` are those the run will write;
    ``last_check(identity, store_url)`` runs once the store is open (a search's study name).
    Returns (model, space, info, settings, out, store, plans, identity)."""
    import torch

    from ..measure.device import describe_device
    from ..measure.profiler import ProfileSettings, plan_shapes
    from ..measure.store import MeasurementStore
    from ..measure.timing import TimingSettings
    from ..models import resolve_model
    from ..outputs import check_folder
    from ..preflight import check_tokens_fit
    from ..space import DTYPES, load_space, resolve_dtype

    check_values(args)
    command = getattr(args, "command", None)
    if args.threads is not None:
        args.threads_before = torch.get_num_threads()  # put back by main() (a caller's process keeps going)
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, _split(args.targets))
    space = load_space(args.space)
    info = describe_device(args.device, threads=args.threads)
    device = torch.device(info.kind if info.index is None else f"{info.kind}:{info.index}")
    defaults = {**(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS), **(overrides or {})}
    tokens = args.tokens or (args.batch_size * args.seq_len if args.batch_size else defaults["tokens"])
    dtypes = tuple(dict.fromkeys(resolve_dtype(d, device) for d in ([args.dtype] if args.dtype else space.dtypes)))
    timing = TimingSettings(warmup=args.warmup if args.warmup is not None else defaults["warmup"],
                            min_reps=args.min_reps or defaults["min_reps"],
                            max_reps=args.max_reps or max(defaults["max_reps"], args.min_reps or 0),
                            min_time_s=args.min_time if args.min_time is not None else defaults["min_time"])
    if timing.min_reps > timing.max_reps:
        from .main import UsageError

        raise UsageError(f"--min-reps {timing.min_reps} is larger than --max-reps {timing.max_reps}")
    settings = ProfileSettings(tokens=tokens, dtypes=dtypes, device=device, timing=timing)
    ranks = list(args.lora_ranks)
    if lora_budget is not None:  # the search's LoRA baseline: the rank that spends the budget on every target
        ranks.append(max(1, lora_budget // sum(t.d_in + t.d_out for t in model.targets)))
    plans = plan_shapes(model, space, device, peft=False if args.no_peft else None, lora_ranks=ranks)
    check_fit(plans, space, model, every_shape=more_checks is not None)
    check_tokens_fit(tokens, list(model.shapes), max(DTYPES[d].itemsize for d in dtypes),
                     (info.properties.get("total_memory_mb") or 0) * 2**20, info.name)
    extra = more_checks(model, space, plans, info, device, tokens) if more_checks else {}
    # A space's identity is its content: the same file copied elsewhere, or a built-in one, is the same space.
    space_identity = {k: v for k, v in asdict(space).items() if k not in ("source", "description")}
    identity = {"model": model.spec, "targets": list(model.target_names), "space": space_identity,
                "device": info.label, "tokens": tokens, "dtypes": list(dtypes), "lora_ranks": sorted(set(ranks)),
                "peft": not args.no_peft, **extra}
    out = Path(args.out) if args.out else default_out(model.name, info.label, command)
    # Runs written before the manifest existed are judged from their files; then the manifest, file by file.
    check_output_folder(out, model.spec, force=args.force, command=command, **(expected or {}))
    check_folder(out, files, subcommand=command or "profile", identity=identity, force=args.force)
    store = MeasurementStore(args.store or out / "circtune.db")
    if last_check is not None:
        try:
            last_check(identity, store.url)
        except BaseException:
            store.close()
            raise
    return model, space, info, settings, out, store, plans, identity


def masked_url(url: str) -> str:
    from ..measure.store import masked_url as mask

    return mask(url)


def profile(args: argparse.Namespace, defaults: dict | None = None, lora_budget: int | None = None,
            expected: dict | None = None, more_checks=None, files: tuple[str, ...] = PROFILE_FILES,
            last_check=None):
    """Profile as ``circtune profile`` does (``defaults`` override the device defaults; see :func:`prepare` for the
    rest) and write ``measurements.csv`` and ``profile.json`` into the output folder, recorded in its manifest.
    Returns (model, info, settings, out, store url, plans, result, frame, identity)."""
    import torch

    from .._io import write_csv_atomic, write_text_atomic
    from ..measure.profiler import run_profile
    from ..measure.store import to_frame
    from ..outputs import record

    model, space, info, settings, out, store, plans, identity = prepare(args, defaults, lora_budget, expected,
                                                                        more_checks, files, last_check)
    n_cand = sum(len(p.candidates) + len(p.baselines) for p in plans) * len(settings.dtypes)
    print(f"profiling {model.name}: {len(model.targets)} target layers, {len(plans)} unique shapes, "
          f"{n_cand} configurations (candidates + baselines) on {info.name}"
          f"{f' ({torch.get_num_threads()} threads)' if info.kind == 'cpu' else ''}; "
          f"{settings.tokens} tokens, {', '.join(settings.dtypes)}; space: {space.source}", file=sys.stderr)
    try:
        result = run_profile(plans, settings, store, info, retry_failed=args.retry_failed, progress=not args.quiet,
                             claim_timeout_s=args.claim_timeout, isolate=args.isolate)
    finally:
        store.close()
    out.mkdir(parents=True, exist_ok=True)
    frame = to_frame(result.measurements, model.name, model.shapes)
    write_csv_atomic(frame, out / "measurements.csv")
    summary = {
        "model": model.to_dict(), "space": asdict(space), "device": info.to_dict(), "store": masked_url(store.url),
        "tokens": settings.tokens, "dtypes": list(settings.dtypes), "timing": asdict(settings.timing),
        "command": command_line(), "subcommand": getattr(args, "command", None),
        "measured": result.measured, "reused": result.reused, "failed": len(result.failed),
        "excluded": {f"{p.d_in}x{p.d_out}": [{"what": e.what, "reason": e.reason} for e in p.excluded]
                     for p in plans},
    }
    write_text_atomic(out / "profile.json", json.dumps(summary, indent=2, default=str) + "\n")
    record(out, PROFILE_FILES, subcommand=getattr(args, "command", None) or "profile", command=command_line(),
           identity=identity)
    return model, info, settings, out, store.url, plans, result, frame, identity


def run(args: argparse.Namespace) -> int:
    from ..measure.summary import summary_table
    from .main import UsageError

    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    started = time.perf_counter()
    model, info, settings, out, store_url, plans, result, frame, _ = profile(args)
    print(summary_table(frame, top=args.top))
    for p in plans:
        for e in p.excluded:
            print(f"excluded for {p.d_in}x{p.d_out}: {e.what}: {e.reason}")
    print(f"{result.measured} measured, {result.reused} already in the store, {len(result.failed)} failed; "
          f"{time.perf_counter() - started:.1f} s. Wrote {out / 'measurements.csv'} and {out / 'profile.json'}; "
          f"store: {masked_url(store_url)}")
    return 0
