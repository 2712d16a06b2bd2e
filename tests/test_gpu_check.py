"""``make wheels`` / ``make gpu-check`` (benchmarks/gpu_wheels.py, gpu_check.py): the wheel folder's checks, the
offline set-up, the stage runner, and the whole CPU rehearsal with its archive and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

STAGE_NAMES = ["facts", "pytest", "bench", "encoder", "decoder", "compare"]
# What each pinned wheel really requires (from their METADATA), to build a faithful fake folder.
REQUIRES = {"optuna": ["alembic>=1.5.0", "colorlog", "numpy", "packaging>=20.0", "sqlalchemy>=1.4.2", "tqdm",
                       "PyYAML"],
            "alembic": ["SQLAlchemy>=2.0", "Mako", "typing-extensions>=4.12", 'tomli; python_version < "3.11"'],
            "mako": ["MarkupSafe>=2.0"], "sqlalchemy": ["typing-extensions>=4.6.0"],
            "plotly": ["narwhals>=1.15.1", "packaging"],
            "fvcore": ["numpy", "yacs>=0.1.6", "pyyaml>=5.1", "tqdm", "termcolor>=1.1", "Pillow", "tabulate",
                       "iopath>=0.1.7"],
            "iopath": ["tqdm", "typing_extensions", "portalocker"], "yacs": ["PyYAML"]}


def fake_wheel(folder: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                   for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def fake_folder(folder: Path) -> list[Requirement]:
    folder.mkdir()
    reqs = gpu_wheels.read_requirements()
    for r in reqs:
        name = r.name.lower()
        tag = "cp312-cp312-manylinux_2_17_x86_64" if name == "sqlalchemy" else "py3-none-any"
        fake_wheel(folder, name, next(iter(r.specifier)).version, REQUIRES.get(name, []), tag)
    return reqs


def test_requirements_are_plain_pins_and_never_torch(tmp_path):
    names = {r.name.lower() for r in gpu_wheels.read_requirements()}
    assert {"optuna", "sqlalchemy", "plotly", "fvcore", "iopath", "alembic"} <= names
    for text, message in [("torch==2.11.0\n", "must come from the GPU machine's image"),
                          ("nvidia-cublas==13.0\n", "must come from the GPU machine's image"),
                          ("optuna>=4\n", "is not a plain pin"),
                          ("yacs==0.1.8\nYACS==0.1.8\n", "listed more than once: yacs")]:
        path = tmp_path / "req.txt"
        path.write_text("# comment\n" + text)
        with pytest.raises(ValueError, match=message):
            gpu_wheels.read_requirements(path)


def test_wheel_folder_check_finds_every_problem(tmp_path):
    folder = tmp_path / "whl"
    reqs = fake_folder(folder)
    assert gpu_wheels.check_folder(folder, reqs) == []

    (folder / "fvcore-0.1.5.post20221221-py3-none-any.whl").unlink()
    fake_wheel(folder, "yacs", "0.1.7", ["PyYAML"])
    fake_wheel(folder, "torch", "2.11.0")
    fake_wheel(folder, "colorlog", "6.12.0", ["nosuchdep>=1"])  # overwrites the good one
    fake_wheel(folder, "iopath", "0.1.10", ["portalocker", "tqdm"], "cp311-cp311-manylinux_2_17_x86_64")
    (folder / "iopath-0.1.10-py3-none-any.whl").unlink()
    problems = "\n".join(gpu_wheels.check_folder(folder, reqs))
    assert "fvcore==0.1.5.post20221221 missing" in problems
    assert "circtune needs fvcore>=0.1.5, which is neither a wheel here nor in the GPU machine's image" in problems
    assert "yacs: 2 wheels" in problems
    assert "torch must come from the GPU machine's image" in problems and "torch: not listed" in problems
    assert "colorlog needs nosuchdep>=1, which is neither a wheel here nor in the GPU machine's image" in problems
    assert "iopath-0.1.10-cp311-cp311-manylinux_2_17_x86_64.whl: not installable on CPython 3.12" in problems


def test_wheel_folder_check_sees_a_version_that_does_not_fit(tmp_path):
    folder = tmp_path / "whl"
    reqs = fake_folder(folder)
    fake_wheel(folder, "fvcore", "0.1.5.post20221221", ["iopath>=0.2"])  # overwrites: needs a newer iopath
    assert gpu_wheels.check_folder(folder, reqs) == ["fvcore needs iopath>=0.2, the wheel here is 0.1.10"]


def test_installable_leaves_out_other_interpreters_and_torch(tmp_path):
    for name in ("a-1.0-py3-none-any.whl", "b-1.0-cp399-cp399-manylinux_2_17_x86_64.whl", "torch-2.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen, notes = gpu_wheels.installable(tmp_path)
    assert [w.name for w in chosen] == ["a-1.0-py3-none-any.whl"]
    assert any(n.startswith("b-1.0-cp399") and "another interpreter" in n for n in notes)
    assert any(n.startswith("torch-2.0") and "never installed" in n for n in notes)


@pytest.mark.slow  # child processes
def test_install_builds_circtune_even_when_a_wheel_is_broken(tmp_path):
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip file")
    site, log = tmp_path / "site", tmp_path / "install.log"
    errors = gpu_wheels.install([broken], site, log)
    assert len(errors) == 1 and errors[0].startswith(f"installing the wheels into {site} failed: ")
    # circtune is installed all the same, its kernels and search spaces inside the package as in any install
    assert (site / "circtune" / "kernels" / "block_circulant_matmul.py").is_file()
    assert (site / "circtune" / "search_spaces" / "decoder.toml").is_file()
    assert (site / "bin" / "circtune").is_file()


@pytest.mark.slow  # child processes
def test_environment_check_names_what_is_missing_in_one_entry(tmp_path):
    site = tmp_path / "site"
    (site / "fvcore").mkdir(parents=True)
    (site / "fvcore" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'yacs'\")\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", gpu_wheels.env_check_script([])], env=env, capture_output=True,
                          text=True, timeout=300)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["missing"] == ["fvcore (ModuleNotFoundError: No module named 'yacs')"]
    assert found["mismatch"] == [] and found["cuda_available"] is False and found["torch"]


SMI = """==============NVSMI LOG==============
Driver Version                            : 580.159.04
CUDA Version                              : 13.0
GPU 00000000:00:05.0
    Product Name                          : NVIDIA H200
    GPU Power Readings
        Current Power Limit               : 700.00 W
        Max Power Limit                   : 700.00 W
    Clocks Event Reasons
        Idle                              : Active
    Clocks
        Graphics                          : 345 MHz
        SM                                : 345 MHz
        Memory                            : 3201 MHz
    Max Clocks
        Graphics                          : 1980 MHz
        SM                                : 1980 MHz
"""


def test_facts_headline_reads_nvidia_smi():
    assert gpu_check.stages.smi_headline(SMI) == (
        "Product Name NVIDIA H200, Driver Version 580.159.04, CUDA Version 13.0, Current Power Limit 700.00 W, "
        "SM clock 345 MHz, SM max clock 1980 MHz")


@pytest.mark.slow  # child processes
def test_runner_kills_the_whole_process_group_at_the_limit(tmp_path):
    ctx = gpu_check.Context(ROOT, tmp_path, "tiny", "cpu", dict(os.environ), tmp_path / "site")
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    ctx.deadline = time.perf_counter() + 60
    started = time.perf_counter()
    rc = ctx.run([sys.executable, "-c", script], tmp_path / "log", timeout=3)
    assert rc == gpu_check.TIMED_OUT and ctx.timed_out and time.perf_counter() - started < 30
    assert "timed out" in ctx.describe(rc)
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with its group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {child} outlived its stage")

    ctx.timed_out = False
    rc = ctx.run([sys.executable, "-c", "import sys; print('working'); print('circtune search: error: budget 5 "
                  "cannot be met'); sys.exit(2)"], tmp_path / "log2", timeout=60)
    assert rc == 2 and not ctx.timed_out
    assert ctx.describe(rc) == "exit status 2: circtune search: error: budget 5 cannot be met"


@pytest.mark.slow  # child processes
def test_triton_warm_up_runs_in_the_background_and_is_accounted_for(tmp_path, monkeypatch):
    import gpu_warm_triton

    monkeypatch.setattr(gpu_warm_triton, "TASKS", [("c3a", 64, 16)])
    ctx = gpu_check.Context(ROOT, tmp_path, "gpu", "test", dict(os.environ), tmp_path / "site")
    ctx.start_warm_up()
    ctx.wait_warm_up(300)
    ctx.wait_warm_up(300)  # once waited, a no-op
    assert len(ctx.notes) == 1 and ctx.notes[0].startswith("triton warm-up: ")
    log = (ctx.check_dir / "warm-triton.log").read_text()
    if torch_cuda():
        assert "1 of 1 compile jobs done" in ctx.notes[0] and "c3a d=64 p=16: compiled" in log
    else:  # the job says why it did nothing, and the note counts it as not done
        assert "0 of 1 compile jobs done, 0 stopped" in ctx.notes[0] and "no CUDA device" in log


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wheels_for_rehearsal(folder: Path) -> str:
    """A real wheel folder for the set-up step: three small pinned wheels fetched as `make wheels` does."""
    folder.mkdir()
    try:
        for r in gpu_wheels.read_requirements():
            if r.name.lower() in ("termcolor", "yacs", "colorlog"):
                gpu_wheels.fetch(r, folder)
        return "downloaded"
    except RuntimeError as e:
        print(f"PyPI unreachable ({e}): the rehearsal's set-up installs circtune alone", file=sys.stderr)
        return "none"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage_and_packs_one_archive(tmp_path):
    wheels = _wheels_for_rehearsal(tmp_path / "whl")
    out = tmp_path / "out"
    proc = _run(["--mode", "tiny", "--out", str(out), "--wheels", str(tmp_path / "whl")], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    first_stage = next(i for i, line in enumerate(lines) if line.startswith("gpu-check: [1/6]"))
    assert "gpu-check: imports: all" in "\n".join(lines[:first_stage])  # said before any stage runs
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-cpu.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # printed last
    assert "6 of 6 stages passed" in summary
    for i, (name, title, *_rest) in enumerate(gpu_check.stages.STAGES, 1):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {i} | {title} |"))
        cells = [c.strip() for c in row.split("|")]
        assert cells[3] == "pass" and float(cells[4]) > 0 and float(cells[5]) > 0, row

    with tarfile.open(out / "gpu-check-cpu.tar.gz") as tar:
        names = tar.getnames()
        assert all(n.startswith("reports/") for n in names)
        assert not [n for n in names if n.endswith((".db", ".db-wal", ".db-shm", ".lock"))]
        tar.extractall(tmp_path / "unpacked", filter="data")
    reports = tmp_path / "unpacked" / "reports"
    check = reports / "gpu-check-cpu"
    for name in ("summary.md", "stages.json", "versions.json", "devices.json", "pytest.log", "pytest.xml",
                 "bench/bench.csv", "bench/bench.md", "bench/bench.json", "setup.log", "search-encoder.log",
                 "search-decoder.log", "compare.log"):
        assert (check / name).is_file(), name
    assert (check / "summary.md").read_text() == summary
    stages = json.loads((check / "stages.json").read_text())
    assert [s["name"] for s in stages] == STAGE_NAMES and {s["status"] for s in stages} == {"pass"}
    for folder in ("tiny-roberta-cpu", "tiny-llama-cpu"):
        config = json.loads((reports / folder / "adapter_config.json").read_text())
        assert config["total_params"] <= config["budget"] and (reports / folder / "measurements.csv").is_file()
    # The decoder budget gives a real choice: no uniform block size fills it, the pick mixes several.
    decoder = json.loads((reports / "tiny-llama-cpu" / "adapter_config.json").read_text())
    assert len({layer["block_size"] for layer in decoder["layers"].values()}) > 1
    assert json.loads((reports / "tiny-roberta-cpu" / "adapter_config.json").read_text())["measured_step_ms"] > 0
    assert (reports / "compare-tiny-roberta-cpu-self.html").stat().st_size > 1000
    bench = (check / "bench" / "bench.csv").read_text()
    for path in ("base", "lora-r8", "lora-r16", "torch-rfft", "torch-fft", "torch-dft", "dense", "peft-c3a"):
        assert f",{path},ok," in bench, path
    assert ",triton,not run: Triton kernels need a CUDA device" in bench
    if wheels == "downloaded":
        assert "termcolor-3.3.0-py3-none-any.whl" in (check / "setup.log").read_text()
        assert "wheels: 3 of 3 from whl/ installed" in summary


@pytest.mark.slow  # child processes
def test_a_failing_or_timed_out_stage_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "whl").mkdir()
    proc = _run(["--mode", "tiny", "--out", str(out), "--wheels", str(tmp_path / "whl"), "--stages", "facts,compare",
                 "--limit", "facts=0.5"], timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads(
        tarfile.open(out / "gpu-check-cpu.tar.gz").extractfile("reports/gpu-check-cpu/stages.json").read())}
    assert stages["facts"]["status"] == "timeout"
    assert stages["compare"]["status"] == "fail" and "no finished search" in stages["compare"]["error"]
    assert {stages[n]["status"] for n in ("pytest", "bench", "encoder", "decoder")} == {"not run"}
    summary = (out / "summary.md").read_text()
    assert "0 of 2 stages passed" in summary and "| timeout |" in summary


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    for args, message in [(["--stages", "facts,nope"], "unknown stage 'nope'"),
                          (["--limit", "bench=-3"], "--limit 'bench=-3'")]:
        proc = _run([*args, "--out", str(tmp_path)], timeout=120)
        assert proc.returncode == 2 and message in proc.stderr
