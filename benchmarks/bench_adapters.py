"""What a layer ADDS to the training step of its frozen base ``nn.Linear``, measured on this CPU.

For every block size p, one layer per path wraps its own frozen ``nn.Linear(dim, dim)``: circtune's C3ALinear
(backend torch with transform rfft, fft and dft; backend dense), PEFT's own ``C3ALinear`` at the same p; plus PEFT's
LoRA ``Linear`` (r=8, alpha 16, no dropout). A step is forward + backward of ``layer(x)`` with ``x [tokens, dim]``
requiring grad and a fixed upstream gradient (circtune.measure.timing, the profiler's own timing): every repetition
times the layer's own frozen base layer right before the layer, in one window, so what the layer adds is the
difference of two medians taken side by side (clock or load drift hits both alike). The thread count is fixed.

``--runs N`` repeats the whole measurement N times (the layers are rebuilt each run); the table shows, per cell, the
median over runs of the added milliseconds and the range of the runs, the best circtune path, its ratio to LoRA r=8
and PEFT's C3A ÷ best. One CSV row per (run, path, p) is appended to ``--csv``.

``--kgrad-flops`` prints instead the kernel-gradient FLOPs of each backend at T=4096, d=4096, p=128 (change them
with --kgrad-shape): the closed form and FlopCounterMode's count on meta tensors (no memory, no compute).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PATHS = ("rfft", "fft", "dft", "dense")  # circtune's C3A paths: torch backend with a transform, or dense
BASELINES = ("lora-r8", "peft-c3a")
CSV_FIELDS = ("timestamp", "cpu", "threads", "torch_version", "d_in", "d_out", "tokens", "p", "path",
              "step_ms_median", "step_ms_p25", "step_ms_p75", "added_ms", "run", "base_ms_median", "reps", "load_avg")
DEFAULT_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class BenchConfig:
    path: str
    p: int | None  # None for LoRA


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    run: int
    step_median_ms: float
    step_p25_ms: float
    step_p75_ms: float
    base_median_ms: float
    reps: int

    @property
    def added_ms(self) -> float:
        return self.step_median_ms - self.base_median_ms


def build(cfg: BenchConfig, dim: int) -> nn.Module:
    from peft import C3AConfig, LoraConfig
    from peft.tuners.c3a.layer import C3ALinear as PeftC3ALinear
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from circtune.adapters.c3a import C3ALinear

    base = nn.Linear(dim, dim)
    base.requires_grad_(False)
    if cfg.path == "lora-r8":
        layer = PeftLoraLinear(base, "default", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0), r=8, lora_alpha=16)
    elif cfg.path == "peft-c3a":
        layer = PeftC3ALinear(base, "default", C3AConfig(block_size=cfg.p, init_weights="gaussian"), cfg.p)
    elif cfg.path == "dense":
        layer = C3ALinear(base, cfg.p, backend="dense", init="gaussian")
    else:
        layer = C3ALinear(base, cfg.p, transform=cfg.path, backend="torch", init="gaussian")
    base.requires_grad_(False)
    return layer


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return ""


def measure(configs: list[BenchConfig], tokens: int, dim: int, run: int, settings) -> list[BenchResult]:
    from tqdm import tqdm

    from circtune.measure.timing import time_step

    torch.manual_seed(run)
    x = torch.randn(tokens, dim, requires_grad=True)
    grad = torch.randn(tokens, dim)
    results = []
    for cfg in tqdm(configs, desc=f"run {run}", unit="layer", leave=False):
        layer = build(cfg, dim)
        timing, base = time_step(layer, x, grad, None, settings, reference=layer.base_layer)
        results.append(BenchResult(cfg, run, timing.step.median, timing.step.p25, timing.step.p75,
                                   base.step.median, timing.reps))
    return results


def _cell(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}–{max(values):.2f})"


def markdown_table(results: list[BenchResult], block_sizes: list[int]) -> str:
    """Added ms over the frozen base step per p and path: median over runs (range of the runs)."""
    added: dict[tuple[str, int | None], list[float]] = {}
    for r in results:
        added.setdefault((r.config.path, r.config.p), []).append(r.added_ms)
    lora = statistics.median(added[("lora-r8", None)])
    heads = ["p", *PATHS, "peft-c3a", "best", "best ÷ lora-r8", "peft ÷ best"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for p in block_sizes:
        ours = {path: statistics.median(added[(path, p)]) for path in PATHS}
        best = min(ours, key=ours.get)
        peft = statistics.median(added[("peft-c3a", p)])
        cells = [str(p), *(_cell(added[(path, p)]) for path in PATHS), _cell(added[("peft-c3a", p)]), best,
                 f"{ours[best] / lora:.2f}", f"{peft / ours[best]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nLoRA r=8 adds {_cell(added[('lora-r8', None)])} ms.")
    return "\n".join(lines)


def csv_path_name(path: str) -> str:
    """circtune's paths as the CSV has always named them (``circtune-rfft``, ``circtune-dense``)."""
    return f"circtune-{path}" if path in PATHS else path


def write_csv(path: Path, results: list[BenchResult], *, threads: int, dim: int, tokens: int, load: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    if not new_file:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if rows and tuple(rows[0]) != CSV_FIELDS:
            if tuple(rows[0]) != CSV_FIELDS[:len(rows[0])]:
                raise SystemExit(f"{path}: its columns are not this script's ({', '.join(CSV_FIELDS)}); "
                                 "give another --csv")
            # An older file with fewer columns: extend it in place, its rows left blank in the new columns.
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(CSV_FIELDS)
                writer.writerows(row + [""] * (len(CSV_FIELDS) - len(row)) for row in rows[1:])
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(CSV_FIELDS)
        for r in results:
            writer.writerow([stamp, cpu_model(), threads, torch.__version__, dim, dim, tokens,
                             "" if r.config.p is None else r.config.p, csv_path_name(r.config.path),
                             f"{r.step_median_ms:.4f}",
                             f"{r.step_p25_ms:.4f}", f"{r.step_p75_ms:.4f}", f"{r.added_ms:.4f}", r.run,
                             f"{r.base_median_ms:.4f}", r.reps, load])


# --- kernel-gradient FLOPs ------------------------------------------------------------------------------------

def kgrad_flops_analytic(tokens: int, d_in: int, d_out: int, p: int) -> dict[str, tuple[float, float]]:
    """Per backend: (from x and g, given the spectra the step computes anyway) kernel-gradient FLOPs."""
    from circtune.measure.flops import fft_flops

    q_in, q_out = d_in // p, d_out // p
    pairs = q_in * q_out
    out = {}
    for transform in ("rfft", "fft"):
        freqs = p // 2 + 1 if transform == "rfft" else p
        reduce = 8 * tokens * pairs * freqs + 2 * pairs * freqs + pairs * fft_flops(p, real=transform == "rfft")
        out[f"torch-{transform}"] = (reduce + tokens * (q_in + q_out) * fft_flops(p, real=True), reduce)
    two_f = 2 * (p // 2 + 1)
    reduce = 4 * two_f * tokens * pairs + 2 * two_f * p * pairs
    out["torch-dft"] = (reduce + 2 * two_f * p * tokens * (q_in + q_out), reduce)
    from circtune.adapters._circulant import dense_kernel_grad_route
    from circtune.measure.flops import spectral_kernel_grad_flops

    # dense: spectral from x and g (nothing else in its step transforms them), or gᵀx for small p.
    dense = spectral_kernel_grad_flops(tokens, q_in, q_out, p,
                                       "rfft" if dense_kernel_grad_route(p) == "spectral" else "gemm")
    out["dense"] = (dense, dense)
    for route in ("gemm", "rfft", "dft"):  # triton: the route the autotuner (CUDA) or the rule (p >= 8: rfft) takes
        flops = spectral_kernel_grad_flops(tokens, q_in, q_out, p, route)
        out[f"triton-{route}"] = (flops, flops)
    return out


def kgrad_flops_counted(tokens: int, d_in: int, d_out: int, p: int) -> dict[str, tuple[float, float]]:
    """The same, counted by FlopCounterMode (with circtune's FFT/complex formulas) on meta tensors. 'From x and g'
    is the backward of a product whose only input needing a gradient is the kernel, x's spectrum recomputed there
    (as for a layer whose forward did not keep it); 'given the spectra': the backward needing both gradients less
    the one needing the input gradient only (x's spectrum kept from the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from circtune.adapters import _dft
    from circtune.adapters._circulant import block_circulant_product, dense_block_circulant_linear
    from circtune.adapters._dft import dft_kernel_grad, spectrum
    from circtune.measure.flops import FLOP_COUNTER_FORMULAS

    meta = {"device": "meta"}

    def count(fn) -> float:
        with FlopCounterMode(display=False, custom_mapping=dict(FLOP_COUNTER_FORMULAS)) as counter:
            fn()
        return float(counter.get_total_flops())

    x = torch.empty(tokens, d_in, **meta)
    g = torch.empty(tokens, d_out, **meta)
    out = {}
    for transform in ("rfft", "fft"):
        def backward(x_grad: bool, w_grad: bool, transform=transform):
            xx = x.clone().requires_grad_(x_grad)
            w = torch.empty(d_out // p, d_in // p, p, **meta, requires_grad=w_grad)
            y = block_circulant_product(xx, w, transform=transform)
            return lambda: y.backward(g)
        both, dx_only = count(backward(True, True)), count(backward(True, False))
        keep, _dft.KEEP_SPECTRUM_FACTOR = _dft.KEEP_SPECTRUM_FACTOR, 0.0
        try:
            dw_only = count(backward(False, True))
        finally:
            _dft.KEEP_SPECTRUM_FACTOR = keep
        out[f"torch-{transform}"] = (dw_only, both - dx_only)
    from_xg = count(lambda: dft_kernel_grad(x, g, p))
    xs, gs = spectrum(x, p), spectrum(g, p)
    out["torch-dft"] = (from_xg, count(lambda: dft_kernel_grad(None, None, p, x_spec=xs, g_spec=gs)))
    w = torch.empty(d_out // p, d_in // p, p, **meta, requires_grad=True)
    y = dense_block_circulant_linear(x, w)  # x needs no gradient: the backward is the kernel gradient alone
    dense = count(lambda: y.backward(g))
    out["dense"] = (dense, dense)
    ops = getattr(torch.ops, "circtune", None)
    try:
        if ops is not None and hasattr(ops, "block_circulant_kernel_grad_spectral"):
            gemm = count(lambda: ops.block_circulant_kernel_grad(g, x, p, 1.0, []))
            out["triton-gemm"] = (gemm, gemm)
            for route in ("rfft", "dft"):
                spectral = count(lambda route=route: ops.block_circulant_kernel_grad_spectral(g, x, p, 1.0, route))
                out[f"triton-{route}"] = (spectral, spectral)
    except Exception as e:  # the ops are another module's: say why they were left out, do not fail the table
        print(f"triton kernel gradient not counted: {type(e).__name__}: {e}")
    return out


def print_kgrad_flops(tokens: int, dim: int, p: int) -> None:
    try:
        from circtune.measure import flops  # noqa: F401  (registers the triton ops' FLOP formulas if present)
    except Exception:
        pass
    analytic = kgrad_flops_analytic(tokens, dim, dim, p)
    counted = kgrad_flops_counted(tokens, dim, dim, p)
    print(f"kernel-gradient GFLOP per layer per step, T={tokens}, d_in=d_out={dim}, p={p} "
          "('from x, g': transforms of x and g included; 'given spectra': what the step adds when the forward and "
          "input gradient already hold them)")
    print("| backend | from x, g: analytic | counted | given spectra: analytic | counted |")
    print("|---|---|---|---|---|")
    for name, (a_full, a_marg) in analytic.items():
        c_full, c_marg = counted.get(name, (float("nan"), float("nan")))
        note = "" if name in counted else " (op not registered: not counted)"
        print(f"| {name}{note} | {a_full / 1e9:.2f} | {c_full / 1e9:.2f} | {a_marg / 1e9:.2f} | {c_marg / 1e9:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1024, help="d_in = d_out")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=list(DEFAULT_BLOCK_SIZES))
    parser.add_argument("--paths", nargs="+", default=[*PATHS, *BASELINES],
                        help="subset of the paths to measure (quick looks); the table needs all of them")
    parser.add_argument("--runs", type=int, default=2, help="whole measurements, layers rebuilt each time")
    parser.add_argument("--min-reps", type=int, default=20)
    parser.add_argument("--max-reps", type=int, default=100)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per layer at least")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=Path("reports/bench_adapters_cpu.csv"))
    parser.add_argument("--kgrad-flops", action="store_true", help="print the kernel-gradient FLOPs table and exit")
    parser.add_argument("--kgrad-shape", type=int, nargs=3, default=[4096, 4096, 128], metavar=("T", "D", "P"))
    args = parser.parse_args()
    if args.kgrad_flops:
        print_kgrad_flops(*args.kgrad_shape)
        return 0
    unknown = [p for p in args.paths if p not in (*PATHS, *BASELINES)]
    bad_p = [p for p in args.block_sizes if p < 1 or args.dim % p]
    if unknown or bad_p or args.runs < 1:
        parser.error(f"paths {unknown} unknown (accepted: {', '.join((*PATHS, *BASELINES))}); " if unknown else
                     f"block sizes {bad_p} do not divide --dim {args.dim}" if bad_p else "--runs must be >= 1")

    from circtune.measure.timing import TimingSettings

    torch.set_num_threads(args.threads)
    settings = TimingSettings(warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps,
                              min_time_s=args.min_time)
    configs = [BenchConfig("lora-r8", None)] if "lora-r8" in args.paths else []
    configs += [BenchConfig(path, p) for p in args.block_sizes for path in args.paths if path != "lora-r8"]
    load_before = load_average()
    results = []
    for run in range(args.runs):
        results += measure(configs, args.tokens, args.dim, run, settings)
    load = f"{load_before} -> {load_average()}"
    write_csv(args.csv, results, threads=args.threads, dim=args.dim, tokens=args.tokens, load=load)

    print(f"d_in=d_out={args.dim}, {args.tokens} tokens, fp32, {args.threads} threads, {args.runs} run(s), "
          f"torch {torch.__version__}, cpu: {cpu_model()}; load average (1, 5, 15 min) {load}")
    print("added ms over the frozen base layer's fwd+bwd step (paired, median over runs; range of the runs)\n")
    if set(args.paths) >= {*PATHS, *BASELINES}:
        print(markdown_table(results, args.block_sizes))
    else:
        for r in results:
            print(f"run {r.run} p={r.config.p} {r.config.path}: +{r.added_ms:.2f} ms (step {r.step_median_ms:.2f} "
                  f"[{r.step_p25_ms:.2f}, {r.step_p75_ms:.2f}], base {r.base_median_ms:.2f})")
    print(f"\nappended {len(results)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
