"""The wheels circtune needs on a GPU machine that reaches no package registry: fetch them here, install them there.

Here (``make wheels``): every pinned line of ``benchmarks/gpu-wheels.txt`` is fetched once, without resolving
(``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on manylinux x86_64; a project with no wheel on
PyPI is built with ``pip wheel --no-deps`` and must come out pure Python) into ``.whl/``. The folder is then
checked: one wheel per line at the pinned version, never torch, triton or an nvidia-* wheel, at most 40 MiB, and
every requirement of every wheel (markers evaluated for CPython 3.12 on Linux x86_64) and of circtune itself is
met by a wheel of the folder or by a package of the GPU machine's image (:data:`IMAGE_PACKAGES`).

There (``benchmarks/gpu_check.py``): the wheels that fit the running interpreter are installed offline into a
target folder (``pip install --no-index --no-deps --target``), circtune is built from the checkout into the same
folder (so ``circtune.kernels`` maps to ``kernels/`` as in any install), and :data:`ENV_CHECK` imports every module
the stages need and checks every installed requirement's version, so that one line names what is missing before
any stage runs. The interpreter's own torch is never replaced: no torch wheel is ever in the folder.

    python benchmarks/gpu_wheels.py download        # what `make wheels` runs
    python benchmarks/gpu_wheels.py check           # check .whl/ again
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "benchmarks" / "gpu-wheels.txt"
FOLDER = ROOT / ".whl"
MAX_BYTES = 40 << 20
FORBIDDEN = ("torch", "triton", "nvidia-")  # the image's CUDA builds must stay what they are
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# The GPU machine's interpreter, for evaluating requirement markers.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# The Python packages of the GPU machine's image ('cuda', as read on 2026-11-17): what needs no wheel.
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
pygments pyparsing pyproject-hooks
""".split())


def read_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    """The pinned lines of ``path`` (comments and blank lines aside); each must be ``name==version``."""
    reqs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pins = [s for s in req.specifier if s.operator == "=="]
        if len(pins) != 1 or len(req.specifier) != 1 or req.marker or req.extras:
            raise ValueError(f"{path}:{n}: {line!r} is not a plain pin; accepted: name==version")
        if canonicalize_name(req.name).startswith(FORBIDDEN):
            raise ValueError(f"{path}:{n}: {req.name} must come from the GPU machine's image, never as a wheel")
        reqs.append(req)
    names = [canonicalize_name(r.name) for r in reqs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path}: listed more than once: {', '.join(twice)}")
    return reqs


def _pin(req: Requirement) -> str:
    return next(iter(req.specifier)).version


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()
             and "is ignored: it is neither a file nor a directory" not in line]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"pip exited with {proc.returncode}"])[-1].strip()


def fetch(req: Requirement, dest: Path) -> str:
    """Put ``req``'s wheel into ``dest``: the CPython 3.12 manylinux wheel from the index, else one built here
    from the sdist (which must be pure Python). Returns how it was obtained."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    proc = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp", *platforms, "-d", str(dest), str(req))
    if proc.returncode == 0:
        return "downloaded"
    if "No matching distribution" not in proc.stderr + proc.stdout:
        raise RuntimeError(f"pip download {req}: {_last_error(proc)}")
    proc = _pip("wheel", "-q", "--no-deps", "--no-binary", canonicalize_name(req.name), "-w", str(dest), str(req))
    if proc.returncode != 0:
        raise RuntimeError(f"no wheel of {req} on the index, and building its sdist failed: {_last_error(proc)}")
    return "built from its sdist"


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(z.read(name).decode())


def _needed(requirements: list[str]) -> list[Requirement]:
    """The requirements that apply on the GPU machine's interpreter (extras and other platforms' aside)."""
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or Marker(str(req.marker)).evaluate(TARGET_ENV):
            out.append(req)
    return out


def circtune_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["peft"], "pytest", "triton"]


def check_folder(folder: Path, reqs: list[Requirement]) -> list[str]:
    """Every problem of the wheel folder, one line each (empty: ready to travel)."""
    problems = []
    wheels = sorted(folder.glob("*.whl"))
    found: dict[str, list[tuple[str, Path]]] = {}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name.startswith(FORBIDDEN):
            problems.append(f"{wheel.name}: {name} must come from the GPU machine's image, never as a wheel")
        if not any(t.interpreter in ("py3", "cp312") and t.platform in ("any", *PLATFORMS) for t in tags):
            problems.append(f"{wheel.name}: not installable on CPython 3.12, manylinux x86_64")
        found.setdefault(name, []).append((str(version), wheel))
    for name, versions in found.items():
        if len(versions) > 1:
            problems.append(f"{name}: {len(versions)} wheels ({', '.join(w.name for _, w in versions)}); keep one")
    wanted = {canonicalize_name(r.name): _pin(r) for r in reqs}
    for name, version in wanted.items():
        have = [v for v, _ in found.get(name, [])]
        if version not in have:
            problems.append(f"{name}=={version} missing" + (f" (found {', '.join(have)})" if have else ""))
    problems += [f"{name}: not listed in {REQUIREMENTS.name}" for name in found if name not in wanted]
    provided = set(found) | IMAGE_PACKAGES
    needs = [("circtune", r) for r in _needed(circtune_requirements())]
    for wheel in wheels:
        meta = _metadata(wheel)
        needs += [(meta["Name"], r) for r in _needed(meta.get_all("Requires-Dist") or [])]
    for who, req in needs:
        if canonicalize_name(req.name) not in provided:
            problems.append(f"{who} needs {req}, which is neither a wheel here nor in the GPU machine's image")
        elif canonicalize_name(req.name) in found:
            version = found[canonicalize_name(req.name)][0][0]
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{who} needs {req}, the wheel here is {version}")
    size = sum(w.stat().st_size for w in wheels)
    if size > MAX_BYTES:
        problems.append(f"{size / 2**20:.1f} MiB of wheels, over the {MAX_BYTES >> 20} MiB limit")
    return problems


def download(dest: Path = FOLDER, requirements: Path = REQUIREMENTS) -> int:
    reqs = read_requirements(requirements)
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".whl-new-"))
    try:
        for req in reqs:
            print(f"  {req}: {fetch(req, tmp)}", flush=True)
        problems = check_folder(tmp, reqs)
        if problems:
            print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
            return 1
        if dest.exists():
            shutil.rmtree(dest)
        tmp.chmod(0o755)
        tmp.rename(dest)  # the old folder is replaced only by a complete, checked one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{dest}: {len(reqs)} wheels, {size / 2**20:.1f} MiB; every requirement met by a wheel here or by the "
          "GPU machine's image")
    return 0


def installable(folder: Path) -> tuple[list[Path], list[str]]:
    """The wheels of ``folder`` this interpreter can install, and one note per wheel left out and why."""
    tags = set(sys_tags())
    chosen, notes = [], []
    for wheel in sorted(folder.glob("*.whl")):
        name, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        if name.startswith(FORBIDDEN):
            notes.append(f"{wheel.name}: never installed (the interpreter's own {name} stays)")
        elif wheel_tags.isdisjoint(tags):
            notes.append(f"{wheel.name}: built for another interpreter; this one's own {name} is used if present")
        else:
            chosen.append(wheel)
    return chosen, notes


def install(wheels: list[Path], site: Path, log: Path) -> list[str]:
    """Install ``wheels`` and circtune (built from the checkout) into ``site``, offline. Returns one line per step
    that failed (pip's last error line); a failed wheel step does not stop circtune's."""
    site.mkdir(parents=True, exist_ok=True)
    # circtune is built from a clean copy of its sources: setuptools reuses a stale build/lib of the checkout.
    src = site.parent / "circtune-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "circtune", "kernels", "search_spaces"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    common = ["install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
              "--disable-pip-version-check", "--target", str(site)]
    steps = ([("the wheels", [*common, *map(str, wheels)])] if wheels else []) + [
        ("circtune", [*common, "--no-build-isolation", str(src)])]
    errors = []
    with log.open("a") as f:
        for what, args in steps:
            f.write("$ pip " + " ".join(args) + "\n")
            f.flush()
            proc = _pip(*args)
            f.write(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                errors.append(f"installing {what} into {site} failed: {_last_error(proc)}")
    return errors


# Run by the staged interpreter: imports every module the stages need and checks every installed requirement.
# Prints one JSON object: {"missing": [...], "versions": {...}, "cuda": ..., "site": ...}.
ENV_CHECK = r"""
import importlib, importlib.metadata as md, json, sys
from packaging.requirements import Requirement
MODULES = %(modules)r
out = {"missing": [], "versions": {}, "mismatch": []}
for mod in MODULES:
    try:
        m = importlib.import_module(mod)
        out["versions"][mod] = str(getattr(m, "__version__", ""))
    except Exception as e:
        out["missing"].append(f"{mod} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
out["circtune_file"] = getattr(sys.modules.get("circtune"), "__file__", None)
for dist in %(dists)r:
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        continue
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            out["mismatch"].append(f"{dist} needs {req}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            out["mismatch"].append(f"{dist} needs {req}: {have} is installed")
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
except Exception:
    out["cuda_available"] = False
print(json.dumps(out))
"""
MODULES = ("torch", "triton", "numpy", "pandas", "transformers", "peft", "safetensors", "sqlalchemy", "alembic",
           "mako", "colorlog", "optuna", "plotly", "narwhals", "fvcore", "iopath", "yacs", "termcolor", "tqdm", "yaml",
           "tabulate", "portalocker", "PIL", "pynvml", "pytest", "circtune", "circtune.cli.main",
           "circtune.kernels.block_circulant_linear")


def env_check_script(dists: list[str]) -> str:
    return ENV_CHECK % {"modules": MODULES, "dists": ["circtune", *dists]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("download", "check"), help="fetch the wheels, or check the folder")
    parser.add_argument("--dest", type=Path, default=FOLDER, help="the wheel folder (default: .whl)")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS,
                        help="pinned list (default: benchmarks/gpu-wheels.txt)")
    args = parser.parse_args(argv)
    try:
        if args.action == "download":
            return download(args.dest, args.requirements)
        problems = check_folder(args.dest, read_requirements(args.requirements))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"gpu_wheels: error: {e}", file=sys.stderr)
        return 2
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"{args.dest}: ready ({len(list(args.dest.glob('*.whl')))} wheels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
