"""``make gpu-check``: every GPU path of circtune proven in one command on a bare GPU machine (<= 9 minutes on an H200).

Set-up first: the wheels that ``make wheels`` put into ``.whl/`` (carried to the machine) and fit this interpreter
are installed offline into a temporary target folder, circtune is built from the checkout into the same folder,
and every module the stages need is imported there (and every installed requirement's version checked), so that
ONE line names what is missing before any stage runs. The interpreter's own torch (a CUDA build on a GPU
machine) is never replaced. Then the stages of gpu_check_stages.py, in priority order, each under its own time
limit: facts, ``pytest -m gpu``, the kernel benchmark, ``circtune search`` of roberta-large and of llama-3-8b, and
``circtune compare`` against the committed CPU folder. A stage that fails or times out is recorded with its error
and the next one still runs.

Results: one archive ``gpu-check-<label>.tar.gz`` and ``summary.md`` (what ran, pass/fail, time per stage, the
headline numbers; also printed last) in ``$OUT`` (else ``gpu-check-out/``), both rewritten after every stage so
that a run cut short still leaves what it had. Unpacked at the repository root the archive puts everything under
``reports/``: ``reports/gpu-check-<label>/`` (facts, pytest log and JUnit XML, bench.csv/.md/.json, every stage's
log, summary.md), ``reports/roberta-large-<label>/``, ``reports/llama-3-8b-<label>/`` and
``reports/compare-roberta-large-<label>-cpu.html`` (SQLite stores left out). ``<label>`` is the GPU's short name
(``h200``).

Without CUDA (``--mode auto`` finds none, or ``--mode tiny``) the same set-up and stages run as a CPU rehearsal on
small substitutes (see gpu_check_stages.py); tests/test_gpu_check.py runs it in CI.

    python3 benchmarks/gpu_check.py                                    # on the GPU machine: make gpu-check
    python3 benchmarks/gpu_check.py --stages facts,bench --limit bench=300
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_stages as stages  # noqa: E402
import gpu_wheels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMED_OUT = -1000  # a return code no process gives: the command ran past its limit and was killed
LEFT_OUT = (".db", ".db-wal", ".db-shm", ".pyc", ".lock")


@dataclass
class Result:
    name: str
    title: str
    status: str  # pass, fail, timeout, not run
    seconds: float
    limit: float
    headline: list[str]
    error: str = ""


class Context:
    """What every stage needs: where things go, the staged environment, and a command runner with a deadline."""

    def __init__(self, root: Path, work: Path, mode: str, label: str, env: dict[str, str], site: Path,
                 dry_run: bool = False):
        self.root, self.work, self.mode, self.label, self.env = root, work, mode, label, env
        self.dry_run = dry_run
        self.python = sys.executable
        script = site / "bin" / "circtune"
        self.circtune = [str(script)] if script.is_file() else [self.python, "-m", "circtune.cli.main"]
        self.reports = work / "stage" / "reports"
        self.check_dir = self.reports / f"gpu-check-{label}"
        encoder, decoder = ("roberta-large", "llama-3-8b") if mode == "gpu" else ("tiny-roberta", "tiny-llama")
        self.encoder_dir = self.reports / f"{encoder}-{label}"
        self.decoder_dir = self.reports / f"{decoder}-{label}"
        self.compare_html = self.reports / f"compare-{encoder}-{label}-{'cpu' if mode == 'gpu' else 'self'}.html"
        self.check_dir.mkdir(parents=True, exist_ok=True)
        self.deadline = float("inf")
        self.last_log: Path | None = None
        self.timed_out = False
        self.notes: list[str] = []
        self._warmers: list[subprocess.Popen] = []
        self._warm_started = 0.0

    def start_warm_up(self) -> None:
        """Compile the triton backend's bf16 kernels in the background (gpu_warm_triton.py, one process per task)."""
        import gpu_warm_triton

        self._warm_started = time.perf_counter()
        with (self.check_dir / "warm-triton.log").open("a") as log:
            for method, d, p in gpu_warm_triton.TASKS:
                cmd = [self.python, str(self.root / "benchmarks" / "gpu_warm_triton.py"), "--method", method,
                       "--dim", str(d), "--block-size", str(p)]
                self._warmers.append(subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True))

    def wait_warm_up(self, cap: float) -> None:
        """Before a timed stage: let the warm-up finish (at most ``cap`` seconds more), then stop what is left."""
        if not self._warmers:
            return
        t0 = time.perf_counter()
        done = stopped = 0
        for proc in self._warmers:
            try:
                proc.wait(timeout=max(0.0, t0 + cap - time.perf_counter()))
                done += proc.returncode == 0
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                stopped += 1
        self.notes.append(f"triton warm-up: {done} of {len(self._warmers)} compile jobs done, {stopped} stopped at "
                          f"the cap, {time.perf_counter() - self._warm_started:.0f} s after they started (waited "
                          f"{time.perf_counter() - t0:.0f} s; see warm-triton.log)")
        self._warmers = []

    def run(self, cmd: list[str], log: Path, timeout: float, *, capture: bool = False) -> int:
        """Run ``cmd`` from the repository root in the staged environment, output to ``log`` (with ``capture``,
        stdout alone, stderr to stderr.log), killed with its whole process group past ``timeout`` or the stage's
        deadline. Returns the exit status, or TIMED_OUT."""
        timeout = min(timeout, self.deadline - time.perf_counter())
        self.last_log = log
        if self.dry_run:
            shown = [c if "\n" not in c else "<script>" for c in cmd]
            print(f"    $ {' '.join(shown)}", flush=True)
            return 0
        if timeout <= 0:
            self.timed_out = True
            return TIMED_OUT
        with log.open("a") as out, (self.check_dir / "stderr.log").open("a") as err:
            if not capture:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
            else:
                err.write(f"$ {' '.join(cmd)}\n")
                err.flush()
            proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=out,
                                    stderr=err if capture else subprocess.STDOUT, start_new_session=True)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.timed_out = True
                _kill_group(proc)
                out.write(f"\n[gpu_check: killed after {timeout:.0f} s]\n")
                return TIMED_OUT

    def describe(self, rc: int) -> str:
        if rc == TIMED_OUT:
            return "timed out (killed at the stage's limit)"
        tail = ""
        if self.last_log is not None and self.last_log.is_file():
            lines = [line.strip() for line in self.last_log.read_text(errors="replace").splitlines()
                     if line.strip() and not line.startswith("$ ")]
            errors = [line for line in lines if re.search(r"error|Error|FAILED|Traceback", line)]
            tail = (errors or lines or [""])[-1][:240]
        return f"exit status {rc}" + (f": {tail}" if tail else "")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def gpu_label() -> str | None:
    """The first GPU's short name from nvidia-smi ('NVIDIA H200' -> 'h200'), or None without a GPU."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        name = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30).stdout.strip().splitlines()[0]
    except (subprocess.SubprocessError, OSError, IndexError):
        return None
    words = name.lower().replace("nvidia", " ").split()
    word = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")
    return re.sub(r"[^a-z0-9]+", "-", word.split("-")[0]).strip("-") or "gpu"


def setup(work: Path, wheels: Path, log: Path) -> tuple[dict[str, str], Path, dict, list[str]]:
    """Install the wheels and circtune into ``work/site``; returns the staged environment, the site folder, the
    environment check's findings and the set-up's notes (one line each)."""
    site, notes = work / "site", []
    if wheels.is_dir():
        chosen, skipped = gpu_wheels.installable(wheels)
        notes.append(f"wheels: {len(chosen)} of {len(chosen) + len(skipped)} from {wheels.name}/ installed")
        notes += skipped
    else:
        chosen = []
        notes.append(f"wheels: no folder {wheels} (run `make wheels` on a machine with a registry and carry it); "
                     "circtune alone is installed")
    notes += gpu_wheels.install(chosen, site, log)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(site / "bin"), os.environ.get("PATH", "")]),
           # The checkout's circtune/ must not shadow the installed copy (which maps circtune.kernels to kernels/).
           "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    dists = [gpu_wheels.parse_wheel_filename(w.name)[0] for w in chosen]
    proc = subprocess.run([sys.executable, "-c", gpu_wheels.env_check_script(dists)], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        found = {"missing": [f"the environment check itself: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"],
                 "mismatch": [], "cuda_available": False}
    return env, site, found, notes


def pack(ctx: Context, out: Path) -> Path:
    """The archive of everything staged so far (SQLite stores left out), written to a temporary name and renamed."""
    archive = out / f"gpu-check-{ctx.label}.tar.gz"
    tmp = archive.with_name(archive.name + ".part")
    stage = ctx.reports.parent
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(stage.rglob("*")):
            if path.is_file() and not path.name.endswith(LEFT_OUT):
                tar.add(path, arcname=str(path.relative_to(stage)), recursive=False)
    os.replace(tmp, archive)
    return archive


def summary(ctx: Context, results: list[Result], setup_notes: list[str], started: float, archive: Path | None,
            device: str) -> str:
    passed = sum(r.status == "pass" for r in results)
    ran = [r for r in results if r.status != "not run"]
    title = "GPU check" if ctx.mode == "gpu" else "GPU check, CPU rehearsal (tiny mode)"
    lines = [f"# {title}: {ctx.label}, {device}", "",
             f"{passed} of {len(ran)} stages passed in {time.perf_counter() - started:.0f} s "
             f"(python {sys.version.split()[0]}, {sys.executable}).", ""]
    if ctx.mode != "gpu":
        setup_notes = [*setup_notes, "tiny mode: each stage's command on small substitutes (a 1-layer RoBERTa of "
                       "width 32, a 1-layer Llama of width 64, 64 x 64 benchmark layers at 64 tokens, 3 repetitions)"
                       ": see benchmarks/gpu_check_stages.py"]
    lines += [f"* {n}" for n in setup_notes]
    lines += ["", "| # | stage | status | time s | limit s | result |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        text = "; ".join(filter(None, [r.error, *r.headline[:1]])).replace("|", "/")
        lines.append(f"| {i} | {r.title} | {r.status} | {r.seconds:.1f} | {r.limit:.0f} | {text[:300]} |")
    lines += ["", "## Headline", ""]
    for r in results:
        lines += [f"* {r.name}: {h}" for h in r.headline]
    if archive is not None:
        lines += ["", f"Archive: `{archive.name}`; unpack it at the repository root (`tar xzf {archive.name}`): "
                  f"everything lands under `reports/` ({ctx.check_dir.name}/ holds the logs, bench.csv and this "
                  "summary)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    names = [s[0] for s in stages.STAGES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", "'"))
    parser.add_argument("--mode", choices=("auto", "gpu", "tiny"), default="auto",
                        help="gpu: the real stages; tiny: the CPU rehearsal; auto: gpu when torch sees CUDA")
    parser.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {', '.join(names)}")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override a stage's time limit, e.g. --limit bench=300")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the wheel folder (default: .whl)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else
                        ROOT / "gpu-check-out", help="where the archive and summary.md go (default: $OUT, else "
                        "gpu-check-out/)")
    parser.add_argument("--label", help="name in the output folders (default: the GPU's short name, or 'cpu')")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--dry-run", action="store_true",
                        help="set up, then print each stage's commands (of --mode) instead of running them")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in chosen if s not in names]
    if bad:
        parser.error(f"--stages: unknown stage {bad[0]!r}; accepted: {', '.join(names)}")
    limits = {}
    for item in args.limit:
        name, _, value = item.partition("=")
        try:
            limits[name] = float(value)
        except ValueError:
            parser.error(f"--limit {item!r}: expected STAGE=SECONDS")
        if name not in names or not limits[name] > 0:
            parser.error(f"--limit {item!r}: expected one of {', '.join(names)} = a positive number of seconds")

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="circtune-gpu-check-"))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        print(f"gpu-check: setting up in {work} (wheels from {args.wheels})", flush=True)
        setup_log = work / "setup.log"
        env, site, found, notes = setup(work, args.wheels, setup_log)
        problems = found.get("missing", []) + found.get("mismatch", [])
        imports = "imports: " + (f"MISSING {'; '.join(problems)}" if problems else
                                 f"all {len(gpu_wheels.MODULES)} modules import, every installed requirement met")
        notes.append(imports)
        label_gpu = gpu_label()
        mode = args.mode
        if mode == "auto":
            mode = "gpu" if found.get("cuda_available") else "tiny"
            if label_gpu and mode == "tiny":
                notes.append(f"nvidia-smi shows a GPU but {sys.executable}'s torch {found.get('torch')} (CUDA "
                             f"{found.get('torch_cuda')}) cannot use it: running the CPU rehearsal instead")
        label = args.label or (label_gpu or "gpu" if mode == "gpu" else "cpu")
        notes.insert(0, f"mode {mode}; torch {found.get('torch')} (CUDA {found.get('torch_cuda')}); setup "
                        f"{time.perf_counter() - started:.1f} s")
        print("gpu-check: " + imports, flush=True)  # the one line that says what is missing, if anything
        ctx = Context(ROOT, work, mode, label, env, site, dry_run=args.dry_run)
        ctx.notes = notes
        if mode == "gpu" and not args.dry_run and {"bench", "encoder", "decoder"} & set(chosen):
            ctx.start_warm_up()
        shutil.copy(setup_log, ctx.check_dir / "setup.log")
        device = "CPU" if mode == "tiny" else f"GPU {label_gpu or label}"
        results: list[Result] = []
        archive = None
        for i, (name, title, gpu_s, tiny_s, fn) in enumerate(stages.STAGES, 1):
            limit = limits.get(name, gpu_s if mode == "gpu" else tiny_s)
            if name not in chosen:
                results.append(Result(name, title, "not run", 0.0, limit, [], "not selected (--stages)"))
                continue
            print(f"gpu-check: [{i}/{len(stages.STAGES)}] {title} (limit {limit:.0f} s)", flush=True)
            t0 = time.perf_counter()
            ctx.deadline, ctx.timed_out = t0 + limit, False
            try:
                outcome = fn(ctx, limit)
            except Exception as e:  # a bug here must not cost the stages after it
                outcome = stages.Outcome(False, [], f"gpu_check: {type(e).__name__}: {e}")
            status = "pass" if outcome.ok else "timeout" if ctx.timed_out else "fail"
            results.append(Result(name, title, status, time.perf_counter() - t0, limit, outcome.headline,
                                  outcome.error))
            print(f"gpu-check: [{i}/{len(stages.STAGES)}] {name}: {status} in {results[-1].seconds:.1f} s"
                  + (f": {outcome.error}" if outcome.error else ""), flush=True)
            (ctx.check_dir / "stages.json").write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
            text = summary(ctx, results, notes, started, archive, device)
            (ctx.check_dir / "summary.md").write_text(text)
            archive = pack(ctx, args.out)
            (args.out / "summary.md").write_text(summary(ctx, results, notes, started, archive, device))
        text = summary(ctx, results, notes, started, archive, device)
        (ctx.check_dir / "summary.md").write_text(text)
        archive = pack(ctx, args.out)
        (args.out / "summary.md").write_text(text)
        print("\n" + text, flush=True)
        return 0 if all(r.status in ("pass", "not run") for r in results) else 1
    finally:
        if "ctx" in locals():
            ctx.wait_warm_up(0)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
