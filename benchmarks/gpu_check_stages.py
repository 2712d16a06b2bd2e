"""The six stages of ``make gpu-check`` (see gpu_check.py), each a function of the run's context.

Each stage runs its commands under one time limit and says what it found in a few headline lines; its files go
under the staging ``reports/`` folder at once, so that a later stage failing or timing out loses nothing. On a GPU
every stage runs its real command; in the CPU rehearsal (``tiny``) the same commands run on small substitutes,
named here: a 1-layer RoBERTa (hidden 32) for roberta-large, a 1-layer Llama (hidden 64, grouped-query k/v 64 -> 32,
MLP 64) with the decoder space's keys but block sizes 16..32 for llama-3-8b (and no whole-model validation), 32
tokens and 3 repetitions.

Time limits on an H200 (510 s, plus about 30 s of set-up: 9 minutes in all; each is a ceiling, not an estimate):

========  =====  ==========================================================================================
stage     limit  options that make it fit
========  =====  ==========================================================================================
facts       20   nvidia-smi -q, versions, ``circtune devices --json``
pytest      70   ``-m gpu``, every GPU-marked test
bench      135   the full grid (2 token counts x 2 widths x p 32..1024, 9 paths), 30+ repetitions and 0.2 s per
                 cell; it stops itself 20 s before the limit and records the cells left as ``not run``
encoder    140   ``circtune search --model roberta-large --budget 100k`` with the search defaults (200 trials,
                 top 3) and shorter timing per configuration: ``--warmup 5 --min-reps 20 --min-time 0.1``
decoder    125   ``circtune search --model llama-3-8b --space decoder --budget 20M --trials 50 --top 1
                 --no-peft`` and the same timing: see DECODER_BUDGET for why 20M. PEFT's C3A is left out here (it
                 is in the encoder search and the benchmark): its float32 full-spectrum FFTs over 224 layers would
                 make the whole-model validation of an 8B model the longest part of the stage
compare     20   ``circtune compare`` of the H200 folder and the committed CPU one (``--allow-different``: the
                 CPU search ran fp32 at 128 tokens, the GPU one bf16 at 4096)
========  =====  ==========================================================================================

On a GPU, right after the set-up, gpu_warm_triton.py compiles the triton backend's bf16 kernels in the background
(one process per method, width and p: the machine's 16 cores compile in parallel while facts and pytest run); the
first timed stage waits for them at most WARM_WAIT_S, taken from its own limit.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_check import Context

# Between uniform C3A at p=512 (13.6M parameters over llama-3-8b's 224 target layers) and at p=256 (27.3M): with
# --min-fill 0.9 the window 18M..20M holds no uniform assignment, so the search must mix block sizes (and, at
# p <= 256, torch against triton) across the attention and MLP shapes: e.g. MLP p=512 with q/o p=128 and k/v
# p=1024 (19.7M), or MLP p=1024 with q/o and k/v p=128 (16.0M, under the window: refused).
DECODER_BUDGET = "20M"
ENCODER_REFERENCE = "reports/roberta-large-cpu-amd-epyc-2t"
TIMING = ["--warmup", "5", "--min-reps", "20", "--min-time", "0.1"]
TINY_TIMING = ["--tokens", "32", "--warmup", "1", "--min-reps", "3", "--max-reps", "3", "--min-time", "0"]
TINY_ROBERTA = {"model_type": "roberta", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 40,
                "type_vocab_size": 1}
# The default space's only p for 32 x 32 is 32: C3A adds 32 parameters per layer, CDVFT m=2 96; 128 = one of each.
TINY_ENCODER_BUDGET = "128"
TINY_LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64}
# Between uniform p=32 (768 parameters over the tiny Llama's 7 layers) and p=16 (1,536): a mix, as 20M above.
TINY_DECODER_BUDGET = "1200"


@dataclass
class Outcome:
    ok: bool
    headline: list[str] = field(default_factory=list)
    error: str = ""


def _first_line(path: Path, pattern: str) -> str:
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            return line.strip()
    return ""


def facts(ctx: Context, limit: float) -> Outcome:
    folder = ctx.check_dir
    head, errors = [], []
    smi = shutil.which("nvidia-smi")
    if smi:
        rc = ctx.run([smi, "-q"], folder / "nvidia-smi.txt", limit / 3, capture=True)
        if rc != 0:
            errors.append(f"nvidia-smi -q: {ctx.describe(rc)}")
        elif not ctx.dry_run:
            head.append(smi_headline((folder / "nvidia-smi.txt").read_text(errors="replace")))
    elif ctx.mode == "gpu":
        errors.append("nvidia-smi not found")
    else:
        head.append("no nvidia-smi (CPU rehearsal)")
    rc = ctx.run([ctx.python, "-c", VERSIONS], folder / "versions.json", limit / 3, capture=True)
    if ctx.dry_run:
        pass
    elif rc == 0:
        v = json.loads((folder / "versions.json").read_text())
        head.append(" ".join(f"{k} {v[k]}" for k in ("python", "torch", "cuda", "triton", "transformers", "peft")
                             if v.get(k)) + (f"; {v['gpu']}" if v.get("gpu") else ""))
    else:
        errors.append(f"versions: {ctx.describe(rc)}")
    rc = ctx.run([*ctx.circtune, "devices", "--json"], folder / "devices.json", limit / 3, capture=True)
    if rc != 0:
        errors.append(f"circtune devices --json: {ctx.describe(rc)}")
    return Outcome(not errors, head, "; ".join(errors))


def smi_headline(text: str) -> str:
    """GPU, driver, CUDA, power limit and SM clocks (now and max) from ``nvidia-smi -q``."""
    keys = ("Product Name", "Driver Version", "CUDA Version", "Current Power Limit", "Power Limit")
    found = {k: m.group(1).strip() for k in keys if (m := re.search(rf"^\s*{k}\s*:\s*(.+)$", text, re.M))}
    for section, name in (("Clocks", "SM clock"), ("Max Clocks", "SM max clock")):
        m = re.search(rf"^\s*{section}\s*\n(?:[^\n]*\n)*?\s*SM\s*:\s*(.+)$", text, re.M)
        if m:
            found[name] = m.group(1).strip()
    return ", ".join(f"{k} {v}" for k, v in found.items())


VERSIONS = r"""
import json, platform, sys, importlib
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "triton", "transformers", "peft", "optuna", "sqlalchemy", "plotly", "fvcore", "pandas",
             "numpy", "circtune"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:
        out[name] = None
import torch
out["cuda"] = torch.version.cuda
out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = (f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
print(json.dumps(out, indent=2))
"""


def gpu_test_files(root: Path) -> list[str]:
    """The test files that mark a test ``gpu`` (a test is GPU-marked only in a file that says so): collecting them
    alone selects the same tests as the whole folder, in seconds, and a broken unrelated module cannot stop it."""
    files = [str(p.relative_to(root)) for p in sorted((root / "tests").glob("test_*.py"))
             if "mark.gpu" in p.read_text(errors="replace")]
    return files or ["tests"]


def pytest_gpu(ctx: Context, limit: float) -> Outcome:
    xml = ctx.check_dir / "pytest.xml"
    log = ctx.check_dir / "pytest.log"
    # -v: one line per test as it ends, so that a run killed at the limit still says how far it got.
    rc = ctx.run([ctx.python, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
                  "--continue-on-collection-errors", f"--junitxml={xml}", *gpu_test_files(ctx.root)],
                 log, limit)
    counts = ""
    if not xml.is_file() and log.is_file():
        words = Counter(m.group(1) for m in re.finditer(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)",
                                                        log.read_text(errors="replace")))
        counts = ", ".join(f"{n} {w.lower()}" for w, n in words.items()) + " (before it stopped)"
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts = (f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
                  f"{n['errors']} errors, {n['skipped']} skipped")
    if rc == 0:
        return Outcome(True, [counts])
    return Outcome(False, [counts] if counts else [], ctx.describe(rc) + (" (no GPU test selected)" if rc == 5 else ""))


# The longest a timed stage waits for the background Triton compiles (gpu_warm_triton.py) to finish; the wait is
# taken from that stage's own limit, so the total stays what the table above says.
WARM_WAIT_S = 45


def bench(ctx: Context, limit: float) -> Outcome:
    started = time.perf_counter()
    ctx.wait_warm_up(WARM_WAIT_S)
    limit -= time.perf_counter() - started
    out = ctx.check_dir / "bench"
    args = [] if ctx.mode == "gpu" else ["--tokens", "64", "--dims", "64", "--block-sizes", "16", "32",
                                         "--warmup", "1", "--min-reps", "3", "--max-reps", "3", "--min-time", "0"]
    rc = ctx.run([ctx.python, str(ctx.root / "benchmarks" / "bench_gpu_kernels.py"), *args, "--out", str(out),
                  "--time-limit", f"{max(limit - 20, limit * 0.8):.0f}"], ctx.check_dir / "bench.log", limit)
    head = []
    if (out / "bench.json").is_file():
        meta = json.loads((out / "bench.json").read_text())
        if meta.get("ceilings"):
            head.append(f"ceilings: {meta['ceilings']}")
        head += meta.get("headline", [])
    return Outcome(rc == 0, head, "" if rc == 0 else ctx.describe(rc) + (" (a cell failed: see bench.csv status)"
                                                                          if rc == 1 else ""))


def _tiny_model(ctx: Context, name: str, config: dict) -> str:
    folder = ctx.work / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _search_headline(folder: Path) -> list[str]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        return []
    c = json.loads(path.read_text())
    picks = Counter(f"{lc['method']} p={lc['block_size']} {lc.get('transform') or ''}/{lc['backend']}"
                    for lc in c["layers"].values())
    base, measured = c.get("base_step_ms"), c.get("measured_step_ms")
    whole = (f"whole-model step {measured:.3f} ms vs base {base:.3f} ms (x{measured / base:.3f})" if base and measured
             else "not validated on the whole model")
    return [f"pick {c['total_params']:,} of {c['budget']:,} parameters, {c['tokens']} tokens {c['dtype']}: {whole}; "
            f"predicted overhead {c['predicted_overhead_ms']:.3f} ms (optimum {c['optimum_overhead_ms']:.3f})",
            "layers: " + ", ".join(f"{n}x {k}" for k, n in picks.most_common())]


def _search(ctx: Context, limit: float, folder: Path, args: list[str], log: str) -> Outcome:
    ctx.wait_warm_up(WARM_WAIT_S)  # a no-op once the benchmark waited
    rc = ctx.run([*ctx.circtune, "search", *args, "--quiet", "--plotlyjs", "cdn", "--out", str(folder)],
                 ctx.check_dir / log, limit)
    return Outcome(rc == 0, _search_headline(folder), "" if rc == 0 else ctx.describe(rc))


def encoder_search(ctx: Context, limit: float) -> Outcome:
    if ctx.mode == "gpu":
        args = ["--model", "roberta-large", "--budget", "100k", *TIMING]
    else:
        args = ["--model", _tiny_model(ctx, "tiny-roberta", TINY_ROBERTA), "--budget", TINY_ENCODER_BUDGET,
                "--trials", "20",
                "--top", "1", *TINY_TIMING]
    return _search(ctx, limit, ctx.encoder_dir, args, "search-encoder.log")


def decoder_search(ctx: Context, limit: float) -> Outcome:
    if ctx.mode == "gpu":
        args = ["--model", "llama-3-8b", "--space", "decoder", "--budget", DECODER_BUDGET, "--trials", "50",
                "--top", "1", "--no-peft", *TIMING]
    else:
        # The decoder space's keys with block sizes that the tiny shapes have (decoder.toml starts at 128).
        space = ctx.work / "tiny-decoder.toml"
        # Whole-model validation is left to the encoder's rehearsal: on the CPU it costs 4 s per plan at least.
        space.write_text('methods = ["c3a"]\nblock_sizes = { min = 16, max = 32 }\ntransforms = ["rfft"]\n'
                         'backends = ["torch", "triton"]\ndtypes = ["bf16"]\n')
        args = ["--model", _tiny_model(ctx, "tiny-llama", TINY_LLAMA), "--space", str(space), "--budget",
                TINY_DECODER_BUDGET, "--trials", "20", "--no-validate", *TINY_TIMING]
    return _search(ctx, limit, ctx.decoder_dir, args, "search-decoder.log")


def compare(ctx: Context, limit: float) -> Outcome:
    # The CPU rehearsal has no second device: it compares the tiny search with itself (the same code path).
    reference = ctx.root / ENCODER_REFERENCE if ctx.mode == "gpu" else ctx.encoder_dir
    if not (ctx.encoder_dir / "adapter_config.json").is_file() and not ctx.dry_run:
        return Outcome(False, [], f"no finished search in {ctx.encoder_dir.name} to compare")
    rc = ctx.run([*ctx.circtune, "compare", str(ctx.encoder_dir), str(reference), "--allow-different",
                  "--plotlyjs", "cdn", "-o", str(ctx.compare_html)], ctx.check_dir / "compare.log", limit)
    ok = rc == 0 and (ctx.compare_html.is_file() or ctx.dry_run)
    head = [] if ctx.dry_run else [f"{ctx.compare_html.name} ({ctx.compare_html.stat().st_size / 1e3:.0f} kB) against "
            f"{reference.name if ctx.mode == 'gpu' else 'itself (rehearsal)'}"] if ok else []
    return Outcome(ok, head, "" if ok else ctx.describe(rc))


# (name, title, limit on a GPU in s, limit in the CPU rehearsal in s, function), in priority order.
STAGES = (
    ("facts", "facts: nvidia-smi -q, versions, circtune devices", 20, 60, facts),
    ("pytest", "pytest -m gpu", 70, 120, pytest_gpu),
    ("bench", "kernel benchmark (bench_gpu_kernels.py)", 135, 120, bench),
    ("encoder", "circtune search roberta-large, budget 100k", 140, 150, encoder_search),
    ("decoder", f"circtune search llama-3-8b --space decoder, budget {DECODER_BUDGET}", 125, 150, decoder_search),
    ("compare", "circtune compare: this device's encoder search vs the committed CPU one", 20, 60, compare),
)
