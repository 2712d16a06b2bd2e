"""The profile as a library step: resolve what to measure from :class:`~circtune.options.ProfileOptions`, run every
check that needs no measurement, measure, and write ``measurements.csv`` and ``profile.json`` into the output
folder (recorded in its manifest). ``circtune.profile`` and ``circtune.search`` (and so both commands) run it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import OptionError, UsageError
from .options import PROFILE_DEFAULTS, ProfileOptions
from .outputs import MEASUREMENTS_FILE, PROFILE_FILE, RunFiles

PROFILE_FILES = (MEASUREMENTS_FILE, PROFILE_FILE)


def check_output_folder(out: Path, spec: str, *, force: bool, command: str | None = None, **expected) -> None:
    """Refuse an output folder that holds another run (another model, another command: a profile's folder for a
    search or the other way round, or for ``expected`` keys of adapter_config.json, e.g. another budget) unless
    ``force``: its files would be overwritten. The same command on its own folder is a resume."""
    if force:
        return
    found, files = {}, RunFiles(out)
    try:
        if files.profile.is_file():
            written = json.loads(files.profile.read_text())
            found["model"] = written.get("model", {}).get("spec")
            found["command"] = written.get("subcommand")  # absent from runs written before it was recorded
        if files.config.is_file():
            found["command"] = "search"  # only a search writes one
            if expected:
                config = json.loads(files.config.read_text())
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
    """The command as typed, when run from the ``circtune`` script (None for a library call)."""
    return "circtune " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("circtune") else None


def default_out(model_name: str, device_label: str, command: str | None) -> Path:
    """Where a run writes unless --out says otherwise: ``runs/`` (git-ignored), never the committed ``reports/``."""
    return Path("runs") / f"{model_name}-{device_label}{'-profile' if command == 'profile' else ''}"


def check_fit(plans, space, model, *, every_shape: bool) -> None:
    """Refuse a space that gives no candidate to any target shape (``every_shape``: to some target shape)."""
    from .preflight import PreflightError, describe_space_misfit

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


# (model, space, plans, device info, device, tokens) -> the caller's options for the output folder's identity
MoreChecks = Callable[..., dict]


@dataclass(frozen=True)
class Prepared:
    """What a profile measures and where it writes, once every check that needs no measurement passed."""

    model: Any  # ModelInfo
    space: Any  # SearchSpace
    info: Any  # DeviceInfo
    settings: Any  # ProfileSettings
    out: Path
    store: Any  # MeasurementStore, open
    plans: list
    identity: dict


@dataclass(frozen=True)
class Profiled:
    """A finished profile: the measurements as a frame and what made them."""

    model: Any  # ModelInfo
    info: Any  # DeviceInfo
    settings: Any  # ProfileSettings
    out: Path
    store_url: str
    plans: list
    result: Any  # measure.profiler.ProfileResult
    frame: pd.DataFrame
    identity: dict


def prepare(opts: ProfileOptions, command: str, *, tokens: int | None = None, lora_budget: int | None = None,
            expected: dict | None = None, more_checks: MoreChecks | None = None,
            files: tuple[str, ...] = PROFILE_FILES, last_check: Callable[[dict, str], None] | None = None,
            folder_checked: Callable[[], None] | None = None) -> Prepared:
    """Resolve the model, space, device, settings, output folder and store from the options, running every check
    that needs no measurement first. ``tokens`` replaces the device's default token count; ``more_checks`` adds
    the caller's checks (a search's budget) and returns the caller's options for the identity; ``files`` are those
    the run will write; ``folder_checked()`` runs once the output folder passed its checks, before the store is
    opened (a search's calibration gradients: seconds of work that a wrong folder should not wait for);
    ``last_check(identity, store_url)`` runs once the store is open (a search's study name).
    Sets torch's thread count when ``opts.threads`` says so (the caller puts it back)."""
    from .measure.device import describe_device
    from .measure.profiler import ProfileSettings, plan_shapes
    from .measure.store import MeasurementStore
    from .measure.timing import TimingSettings
    from .models import resolve_model
    from .outputs import check_folder
    from .preflight import check_tokens_fit
    from .space import DTYPES, load_space, lora_rank_for_budget, resolve_dtype

    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    model = resolve_model(opts.model, list(opts.targets) if opts.targets else None)
    space = load_space(opts.space)
    info = describe_device(opts.device, threads=opts.threads)
    device = torch.device(info.kind if info.index is None else f"{info.kind}:{info.index}")
    defaults = {**PROFILE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"],
                **({"tokens": tokens} if tokens else {})}
    tokens = opts.tokens or (opts.batch_size * opts.seq_len if opts.batch_size else defaults["tokens"])
    dtypes = tuple(dict.fromkeys(resolve_dtype(d, device) for d in ([opts.dtype] if opts.dtype else space.dtypes)))
    timing = TimingSettings(warmup=opts.warmup if opts.warmup is not None else defaults["warmup"],
                            min_reps=opts.min_reps or defaults["min_reps"],
                            max_reps=opts.max_reps or max(defaults["max_reps"], opts.min_reps or 0),
                            min_time_s=opts.min_time if opts.min_time is not None else defaults["min_time"])
    if timing.min_reps > timing.max_reps:
        raise OptionError("min_reps", f"--min-reps {timing.min_reps} is larger than --max-reps {timing.max_reps}")
    settings = ProfileSettings(tokens=tokens, dtypes=dtypes, device=device, timing=timing)
    ranks = list(opts.lora_ranks)
    if lora_budget is not None:  # the search's LoRA baseline: the rank that spends the budget on every target
        ranks.append(lora_rank_for_budget(lora_budget, [t.shape for t in model.targets]))
    plans = plan_shapes(model, space, device, peft=None if opts.peft else False, lora_ranks=ranks)
    check_fit(plans, space, model, every_shape=more_checks is not None)
    check_tokens_fit(tokens, list(model.shapes), max(DTYPES[d].itemsize for d in dtypes),
                     (info.properties.get("total_memory_mb") or 0) * 2**20, info.name)
    extra = more_checks(model, space, plans, info, device, tokens) if more_checks else {}
    # A space's identity is its content: the same file copied elsewhere, or a built-in one, is the same space.
    space_identity = {k: v for k, v in asdict(space).items() if k not in ("source", "description")}
    identity = {"model": model.spec, "targets": list(model.target_names), "space": space_identity,
                "device": info.label, "tokens": tokens, "dtypes": list(dtypes), "lora_ranks": sorted(set(ranks)),
                "peft": opts.peft, **extra}
    out = Path(opts.out) if opts.out else default_out(model.name, info.label, command)
    # Runs written before the manifest existed are judged from their files; then the manifest, file by file.
    check_output_folder(out, model.spec, force=opts.force, command=command, **(expected or {}))
    check_folder(out, files, subcommand=command, identity=identity, force=opts.force)
    if folder_checked is not None:
        folder_checked()
    store = MeasurementStore(opts.store or RunFiles(out).store)
    if last_check is not None:
        try:
            last_check(identity, store.url)
        except BaseException:
            store.close()
            raise
    return Prepared(model, space, info, settings, out, store, plans, identity)


def profile_to_folder(opts: ProfileOptions, command: str, **prepare_kw) -> Profiled:
    """Profile (see :func:`prepare` for ``prepare_kw``) and write ``measurements.csv`` and ``profile.json`` into
    the output folder, recorded in its manifest."""
    from ._io import write_csv_atomic, write_text_atomic
    from .measure.profiler import run_profile
    from .measure.store import masked_url, to_frame
    from .outputs import record

    p = prepare(opts, command, **prepare_kw)
    model, info, settings, space, store, plans = p.model, p.info, p.settings, p.space, p.store, p.plans
    n_cand = sum(len(s.candidates) + len(s.references) for s in plans) * len(settings.dtypes)
    print(f"profiling {model.name}: {len(model.targets)} target layers, {len(plans)} unique shapes, "
          f"{n_cand} configurations (candidates + references) on {info.name}"
          f"{f' ({torch.get_num_threads()} threads)' if info.kind == 'cpu' else ''}; "
          f"{settings.tokens} tokens, {', '.join(settings.dtypes)}; space: {space.source}", file=sys.stderr)
    try:
        result = run_profile(plans, settings, store, info, retry_failed=opts.retry_failed, progress=opts.progress,
                             claim_timeout_s=opts.claim_timeout, isolate=opts.isolate)
    finally:
        store.close()
    p.out.mkdir(parents=True, exist_ok=True)
    frame = to_frame(result.measurements, model.name, model.shapes)
    files = RunFiles(p.out)
    write_csv_atomic(frame, files.measurements)
    summary = {
        "model": model.to_dict(), "space": asdict(space), "device": info.to_dict(), "store": masked_url(store.url),
        "tokens": settings.tokens, "dtypes": list(settings.dtypes), "timing": asdict(settings.timing),
        "command": command_line(), "subcommand": command,
        "measured": result.measured, "reused": result.reused, "failed": len(result.failed),
        "excluded": {f"{s.d_in}x{s.d_out}": [{"what": e.what, "reason": e.reason} for e in s.excluded]
                     for s in plans},
    }
    write_text_atomic(files.profile, json.dumps(summary, indent=2, default=str) + "\n")
    record(p.out, PROFILE_FILES, subcommand=command, command=command_line(), identity=p.identity)
    return Profiled(model, info, settings, p.out, store.url, plans, result, frame, p.identity)


def with_dtype(opts: ProfileOptions, dtype: str) -> ProfileOptions:
    """The same options profiling only ``dtype`` (a search measures the dtype it will train in)."""
    return replace(opts, dtype=dtype)
