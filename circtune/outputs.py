"""Output folders that say what made each file, and commands that never write over another command's files.

Every circtune command that writes into a folder records, in ``manifest.json`` beside the files, which command
wrote each file: the command line, the subcommand, the options that decide the file's content (its *identity*),
the study and the time. Before anything is measured, a command checks the folder: a file that another command or
the same command with other options wrote is refused unless ``--force`` (a re-run with the same identity is a
resume). Folders written before the manifest existed are judged from their files (another model, another command,
another budget), as before.

Report pages (``report.html``, ``circtune compare``'s page) are derived from the run files: a circtune report
page may be rebuilt over another one of the same kind, never over a run file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import write_text_atomic

# The names of the files circtune writes into an output folder, relative to it: the one place that spells them
# (the manifest records, a command's list of the files it writes and a reader's list of the files it needs are
# made of these; paths in one folder come from RunFiles).
CONFIG_FILE = "adapter_config.json"
MEASUREMENTS_FILE = "measurements.csv"
PROFILE_FILE = "profile.json"
TRIALS_FILE = "trials.csv"
VALIDATION_FILE = "validation.csv"
FRONT_FILE = "front.csv"
ALLOCATION_FILE = "allocation.csv"
REPORT_FILE = "report.html"
PEFT_FOLDER = "peft"
PEFT_CONFIG_FILE = f"{PEFT_FOLDER}/{CONFIG_FILE}"
STORE_FILE = "circtune.db"
MANIFEST = "manifest.json"
FORMAT = "circtune.manifest/1"
# Pages any circtune report command may rebuild (derived from the run files).
PAGES = (REPORT_FILE,)
GENERATOR = "circtune"  # <meta name="generator" content="circtune report|compare"> in every page circtune writes


@dataclass(frozen=True)
class RunFiles:
    """The paths of the files in one output folder (``RunFiles(out).trials`` is ``out/trials.csv``)."""

    folder: Path

    def __init__(self, folder: str | os.PathLike) -> None:
        object.__setattr__(self, "folder", Path(folder))

    @property
    def config(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def measurements(self) -> Path:
        return self.folder / MEASUREMENTS_FILE

    @property
    def profile(self) -> Path:
        return self.folder / PROFILE_FILE

    @property
    def trials(self) -> Path:
        return self.folder / TRIALS_FILE

    @property
    def validation(self) -> Path:
        return self.folder / VALIDATION_FILE

    @property
    def front(self) -> Path:
        return self.folder / FRONT_FILE

    @property
    def allocation(self) -> Path:
        return self.folder / ALLOCATION_FILE

    @property
    def report(self) -> Path:
        return self.folder / REPORT_FILE

    @property
    def peft(self) -> Path:
        """The folder of the PEFT config (written when the pick is all C3A and PEFT is installed)."""
        return self.folder / PEFT_FOLDER

    @property
    def peft_config(self) -> Path:
        return self.folder / PEFT_CONFIG_FILE

    @property
    def store(self) -> Path:
        """The measurement store's SQLite file when ``--store`` is not given."""
        return self.folder / STORE_FILE

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST


class OutputError(ValueError):
    """An output path that cannot or must not be written; one line naming the path and what to do."""


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """file name (relative to the folder) -> its record; {} when the folder has no (readable) manifest."""
    path = RunFiles(folder).manifest
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise OutputError(f"output folder {folder}: {MANIFEST} is unreadable ({e}); use another --out, or --force "
                          "to overwrite its files") from None
    files = data.get("files") if isinstance(data, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise manifest updates of processes on this host (several workers may write one folder)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is the user's business
        yield
        return
    with open(folder / f".{MANIFEST}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record(folder: str | os.PathLike, names: Iterable[str], *, subcommand: str, command: str | None,
           identity: Mapping[str, Any], study: str | None = None, **extra: Any) -> dict:
    """Record that ``subcommand`` (typed as ``command``, with ``identity``) has just written ``names`` into
    ``folder`` (``extra``: more fields, e.g. the study's trial count); the manifest is rewritten atomically.
    Returns the record."""
    folder = Path(folder)
    entry = {"subcommand": subcommand, "command": command, "options": _plain(identity), "study": study,
             "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
             **_plain(extra)}
    with _locked(folder):
        try:
            files = read_manifest(folder)
        except OutputError:  # an unreadable manifest was overwritten with --force
            files = {}
        files.update({name: entry for name in names})
        files = {name: rec for name, rec in files.items() if (folder / name).exists()}  # e.g. a removed peft/
        text = json.dumps({"format": FORMAT, "files": dict(sorted(files.items()))}, indent=2, default=str)
        write_text_atomic(RunFiles(folder).manifest, text + "\n")
    return entry


def _plain(identity: Mapping[str, Any] | None) -> dict:
    """The identity as JSON gives it back (tuples as lists), so that a recorded one compares with a new one."""
    return json.loads(json.dumps(dict(identity or {}), default=str))


def same_identity(found: Mapping[str, Any] | None, wanted: Mapping[str, Any] | None) -> bool:
    return _plain(found) == _plain(wanted)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key old (this run: new)`` for each differing option, nested ones by dotted key (``space.block_sizes``)."""
    found, wanted = _flat(_plain(found)), _flat(_plain(wanted))
    keys = [k for k in wanted if k in found and found[k] != wanted[k]]
    keys += [k for k in found if k not in wanted] + [k for k in wanted if k not in found]
    return [f"{k} {found.get(k)!r} (this run: {wanted.get(k)!r})" for k in dict.fromkeys(keys)]


def _short(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_folder(folder: str | os.PathLike, names: Iterable[str], *, subcommand: str,
                 identity: Mapping[str, Any], force: bool) -> None:
    """Refuse (OutputError) to write ``names`` into ``folder`` when the manifest says another command, or this
    command with another identity, wrote any of them; pages in :data:`PAGES` may be rebuilt. Then check that the
    folder can be written at all. Nothing is created when it cannot."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder; pass a folder for the output files")
    if not force and folder.is_dir():
        files = read_manifest(folder)
        present = [n for n in names if n not in PAGES and (folder / n).exists()]
        if not files and present and not RunFiles(folder).profile.is_file():
            # no manifest and no run of an older circtune (judged from profile.json by the caller): not ours
            raise OutputError(f"output folder {folder} holds {_short(present)}, not written by circtune; use another "
                              "--out, or --force to overwrite")
        for name in names:
            if name in PAGES or name not in files:
                continue
            rec = files[name]
            if rec.get("subcommand") != subcommand:
                raise OutputError(f"output folder {folder}: {name} was written by 'circtune {rec.get('subcommand')}' "
                                  f"({rec.get('command') or 'from Python'}), not by this command; use another "
                                  "--out, or --force to overwrite its files")
            diff = _differences(rec.get("options") or {}, identity)
            if diff:
                raise OutputError(f"output folder {folder} holds a {subcommand} run with other options: "
                                  f"{_short(diff)} in {name}; re-run with its options to resume, or use another "
                                  "--out, or --force to overwrite its files")
    check_writable(folder, "--out")


def written_by(folder: str | os.PathLike, name: str) -> dict | None:
    """The manifest's record of ``name`` in ``folder``, if any."""
    try:
        return read_manifest(folder).get(name)
    except OutputError:
        return None


def check_writable(folder: Path, option: str) -> None:
    """A file can be created in ``folder`` (or in the nearest existing folder above it, which is where ``mkdir``
    starts); checked by creating and removing a temporary file, because permission bits say nothing to root and
    nothing about a read-only mount."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{option} {folder}: {existing} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".circtune-probe-", dir=existing)
    except OSError as e:
        raise OutputError(f"{option} {folder}: cannot write in {existing} ({e.strerror or e}); pass a writable "
                          "folder") from None
    os.close(fd)
    os.unlink(tmp)


def page_kind(path: Path) -> str | None:
    """``report`` or ``compare`` when ``path`` is an HTML page circtune wrote, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    marker = f'<meta name="generator" content="{GENERATOR} '
    start = head.find(marker)
    if start < 0:
        return None
    return head[start + len(marker):].split('"', 1)[0] or None


def check_page_target(out: str | os.PathLike, kind: str, *, force: bool, option: str = "-o") -> Path:
    """The HTML file a report command may write: not a folder, not a file that is anything but a circtune page
    of the same ``kind`` (unless ``force``), in a folder that can be written."""
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; pass the HTML file to write, e.g. {path / (kind + '.html')}")
    if path.exists() and not force:
        found = page_kind(path)
        if found != kind:
            rec = written_by(path.parent, path.name)
            what = (f"it is a circtune {found} page" if found
                    else f"it was written by 'circtune {rec.get('subcommand')}'" if rec
                    else f"it is not a circtune {kind} page")
            raise OutputError(f"{option} {path}: the file exists and {what}; pass another {option}, or --force to "
                              "overwrite it")
    check_writable(path.parent, option)
    return path
