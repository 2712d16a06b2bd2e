"""What each C3A path and baseline costs in one layer's training step, on the device at hand (stage 3 of gpu_check).

For every (tokens T, d) and block size p, every path wraps the same frozen ``nn.Linear(d, d)`` in the training
dtype (bf16 by default): the base layer alone (cuBLAS), circtune's C3A with backend torch (transform rfft, fft
and dft), dense and triton (p <= 256, the backend's declared range), PEFT's own ``C3ALinear`` (float32 kernel, as
``get_peft_model`` leaves it) and LoRA r = 8 and 16 (float32 factors, as PEFT's). The adapter weights are random
(never zeros: the C3A kernels are set so that ΔW x is as large as W0 x, LoRA's B is not left at zero), and every
C3A path's output, input gradient and kernel gradient are checked against a float64 dense reference before it is
timed: a wrong result is recorded as ``wrong result: ...`` and never timed (PEFT's input gradient is wrong by
design, so only its output is checked).

Timing is circtune's own (:func:`circtune.measure.timing.time_step`, as the profiler uses it): forward, backward and
the whole step (AdamW update of the trainable parameters included), CUDA events around each phase, an L2 flush
before each repetition, warm-up first (it includes Triton's autotuning), then repetitions until ``--min-reps`` and
``--min-time`` are both reached (at most ``--max-reps``); every repetition of a path is paired with one of the
base layer on the same input, so ``added = median(path) - median(base beside it)``. Reported: quartiles of each
phase, the base step, ratios against the base (step / base step) and against LoRA r = 8 and r = 16 (added /
added), all from this one run; with ``--predictions`` (the committed ``bench_gpu_kernels_predictions.csv``) the
prediction of each cell and measured / predicted. On a GPU the two ceilings (a device copy and an 8192³ bf16
GEMM) are measured first.

Rows go to ``OUT/bench.csv`` as each cell ends; ``bench.md`` (the tables) and ``bench.json`` (device, ceilings,
settings, headline) are rewritten after each (T, d). ``--time-limit`` stops before the next cell once spent and
records the cells left as ``not run``. On the CPU the same script runs (small shapes; the triton rows then say why
they were not run): that is the rehearsal of gpu_check.

    python benchmarks/bench_gpu_kernels.py --out bench-out                     # the full grid (GPU)
    python benchmarks/bench_gpu_kernels.py --tokens 64 --dims 64 --block-sizes 16 32 --min-reps 3 --out /tmp/b
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from circtune.adapters import block_circulant_matrix, get_backend
from circtune.measure.modules import build_module, peft_available
from circtune.measure.timing import StepTiming, TimingSettings, time_step
from circtune.space import DTYPES, Candidate

HERE = Path(__file__).resolve().parent
PREDICTIONS = HERE / "bench_gpu_kernels_predictions.csv"
FIXED_PATHS = ("base", "lora-r8", "lora-r16")
BLOCK_PATHS = ("triton", "torch-rfft", "torch-fft", "torch-dft", "dense", "peft-c3a")
C3A_PATHS = ("triton", "torch-rfft", "torch-fft", "torch-dft", "dense")
FIELDS = ("timestamp", "device", "torch", "triton", "dtype", "tokens", "d", "p", "path", "status", "params",
          "fwd_ms", "fwd_p25", "fwd_p75", "bwd_ms", "bwd_p25", "bwd_p75", "step_ms", "step_p25", "step_p75", "reps",
          "base_step_ms", "added_ms", "x_base", "x_lora8", "x_lora16", "pred_step_ms", "meas_over_pred", "max_rel_err")


def candidate(path: str, p: int | None) -> Candidate:
    if path == "base":
        return Candidate("none")
    if path.startswith("lora-r"):
        return Candidate("lora", factors=int(path[6:]))
    if path == "peft-c3a":
        return Candidate("peft-c3a", block_size=p)
    if path.startswith("torch-"):
        return Candidate("c3a", p, None, path[6:], "torch")
    return Candidate("c3a", p, None, None, path)


def skip_reason(path: str, p: int | None, d: int, device: torch.device) -> str | None:
    """Why a (path, p) cell is not measured here, or None."""
    if p is not None and d % p:
        return f"p={p} does not divide d={d}"
    if path == "peft-c3a" and not peft_available():
        return "PEFT is not installed"
    if path in C3A_PATHS:
        try:
            backend = get_backend("triton" if path == "triton" else "dense" if path == "dense" else "torch")
        except ValueError as e:
            return str(e)
        reason = backend.unavailable_reason(device) or (backend.block_size_reason and
                                                        backend.block_size_reason(p, d, d))
        if reason:
            return reason
    return None


def randomize(layer: nn.Module, kernel: torch.Tensor | None) -> None:
    """Never time zeros: the C3A kernels get ``kernel``, LoRA's B (zero at init) small random values."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if not param.requires_grad:
                continue
            if kernel is not None and param.shape == kernel.shape:
                param.copy_(kernel)
            elif "lora_B" in name:
                param.normal_(0, 0.02)


def reference(base: nn.Linear, kernel: torch.Tensor, x: torch.Tensor, grad: torch.Tensor):
    """float64 dense ``y``, ``dx`` and the kernel gradient, on the device (the independent oracle)."""
    w = kernel.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ (base.weight.double() + block_circulant_matrix(w) / base.in_features).T + base.bias.double()
    y.backward(grad.double())
    return y.detach(), x64.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a.detach().double() - b).norm() / b.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else float("inf")


def check(path: str, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, ref, tol: float) -> tuple[str, float]:
    """(status, worst relative error) of the layer's output and gradients against ``ref``."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(grad)
    kernel = next(p for p in layer.parameters() if p.requires_grad)
    errs = {"output": _rel(y, ref[0])}
    if path != "peft-c3a":  # PEFT's hand-written input gradient is wrong for p > 2 (see the docstring)
        errs["input grad"] = _rel(x.grad, ref[1])
        errs["kernel grad"] = _rel(kernel.grad, ref[2])
    x.grad = None
    worst = max(errs, key=errs.get)
    if not errs[worst] <= tol:
        return f"wrong result: {worst} relative error {errs[worst]:.2e} > {tol:.0e}", errs[worst]
    return "ok", errs[worst]


@dataclass
class Row:
    tokens: int
    d: int
    p: int | None
    path: str
    status: str = "ok"
    params: int = 0
    timing: StepTiming | None = None
    base_step: float | None = None
    max_rel_err: float | None = None

    @property
    def added(self) -> float | None:
        return None if self.timing is None or self.base_step is None else self.timing.step.median - self.base_step


def measure_cell(path: str, p: int | None, base: nn.Linear, x: torch.Tensor, grad: torch.Tensor, kernel, ref,
                 settings: TimingSettings, tol: float) -> Row:
    d, tokens = base.in_features, x.shape[0]
    row = Row(tokens, d, p, path, params=candidate(path, p).params(d, d))
    try:
        layer = build_module(candidate(path, p), base)
        randomize(layer, kernel)
        if ref is not None:
            row.status, row.max_rel_err = check(path, layer, x, grad, ref, tol)
            if row.status != "ok":
                return row
        trainable = [q for q in layer.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        timing, beside = time_step(layer, x, grad, optimizer, settings, None if path == "base" else base)
        row.timing = timing
        row.base_step = (beside or timing).step.median
    except Exception as e:  # out of memory, a kernel that fails to compile, ...: recorded, the grid goes on
        row.status = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    finally:
        layer = optimizer = None
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def ceilings(device: torch.device) -> dict[str, float]:
    """The device's two measured ceilings: a device-to-device copy (bytes read + written) and an 8192³ bf16 GEMM
    on random data (medians of 10 after 3 warm-ups, CUDA events)."""
    def timed(fn) -> float:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return sorted(samples)[len(samples) // 2]

    def copy_seconds() -> float:
        src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB, several times the L2
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src))

    def gemm_seconds(n: int) -> float:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        return timed(lambda: a @ b)

    n = 8192
    copy_s, gemm_s = copy_seconds(), gemm_seconds(n)
    torch.cuda.empty_cache()
    return {"copy_TBps": 2 * (1 << 30) * 2 / copy_s / 1e12, "gemm_bf16_TFLOPs": 2 * n**3 / gemm_s / 1e12}


def load_predictions(path: Path | None) -> dict[tuple, float]:
    if path is None or not path.is_file():
        return {}
    with path.open() as f:
        return {(int(r["tokens"]), int(r["d"]), int(r["p"]) if r["p"] else None, r["path"]): float(r["step_ms"])
                for r in csv.DictReader(f)}


def _f(v: float | None, digits: int = 4) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def csv_row(row: Row, lora: dict[str, Row], meta: dict, predicted: dict) -> dict:
    t = row.timing
    pred = predicted.get((row.tokens, row.d, row.p, row.path))
    out = {k: "" for k in FIELDS}
    out.update(timestamp=meta["timestamp"], device=meta["device"], torch=meta["torch"], triton=meta["triton"],
               dtype=meta["dtype"], tokens=row.tokens, d=row.d, p=row.p or "", path=row.path, status=row.status,
               params=row.params, base_step_ms=_f(row.base_step), max_rel_err=_f(row.max_rel_err, 6),
               pred_step_ms=_f(pred))
    if t is not None:
        for phase in ("fwd", "bwd", "step"):
            s = getattr(t, phase)
            out.update({f"{phase}_ms": _f(s.median), f"{phase}_p25": _f(s.p25), f"{phase}_p75": _f(s.p75)})
        out.update(reps=t.reps, added_ms=_f(row.added), x_base=_f(_ratio(t.step.median, row.base_step), 3),
                   x_lora8=_f(_ratio(row.added, lora.get("lora-r8") and lora["lora-r8"].added), 3),
                   x_lora16=_f(_ratio(row.added, lora.get("lora-r16") and lora["lora-r16"].added), 3),
                   meas_over_pred=_f(_ratio(t.step.median, pred), 3))
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Kernel benchmark: {meta['device']}, {meta['dtype']}",
             "",
             f"torch {meta['torch']}, triton {meta['triton']}; timing {meta['settings']}; ceilings "
             f"{meta.get('ceilings') or 'not measured (no GPU)'}.",
             "Each cell: median whole step in ms (forward + backward + AdamW), `+added` over the base layer timed "
             "beside it, `xB` = step / base step, `xL16` = added / LoRA r=16's added, `p/` = measured / predicted.",
             ""]
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((int(r["tokens"]), int(r["d"])), []).append(r)
    for (tokens, d), rs in groups.items():
        lines += [f"## tokens {tokens}, d {d}", "", "| p | path | fwd ms | bwd ms | step ms (p25-p75) | +added | xB | "
                  "xL8 | xL16 | predicted | p/ | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            step = f"{r['step_ms']} ({r['step_p25']}-{r['step_p75']})" if r["step_ms"] else ""
            lines.append(f"| {r['p']} | {r['path']} | {r['fwd_ms']} | {r['bwd_ms']} | {step} | {r['added_ms']} | "
                         f"{r['x_base']} | {r['x_lora8']} | {r['x_lora16']} | {r['pred_step_ms']} | "
                         f"{r['meas_over_pred']} | {r['status'][:80]} |")
        lines.append("")
    return "\n".join(lines)


def _signed(text: str) -> str:
    return text if text.startswith("-") else "+" + text


def headline(rows: list[dict]) -> list[str]:
    """One line per (tokens, d): at p = 64 (else the smallest p measured), each path's added ms and ratios."""
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tokens"], r["d"]), []).append(r)
    for (tokens, d), rs in groups.items():
        ps = sorted({int(r["p"]) for r in rs if r["p"] and r["step_ms"]})
        base = next((r for r in rs if r["path"] == "base" and r["step_ms"]), None)
        if not ps or base is None:
            continue
        p = 64 if 64 in ps else ps[0]
        cells = [f"{r['path']} {_signed(r['added_ms'])} ms (x{r['x_base']} base, x{r['x_lora16'] or '?'} LoRA16)"
                 for r in rs if str(r["p"]) == str(p) and r["step_ms"]]
        lora = [f"{r['path']} {_signed(r['added_ms'])} ms" for r in rs if r["path"].startswith("lora") and r["step_ms"]]
        out.append(f"T={tokens} d={d}: base step {base['step_ms']} ms; p={p}: " + "; ".join(cells)
                   + ("; " + "; ".join(lora) if lora else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096], help="d_in = d_out")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-reps", type=int, default=30)
    parser.add_argument("--max-reps", type=int, default=200)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of repetitions per cell at least")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; then the cells left are not run")
    parser.add_argument("--no-check", action="store_true", help="time without the float64 correctness check")
    parser.add_argument("--predictions", type=Path, default=PREDICTIONS, help="predicted step ms per cell (CSV)")
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.csv, bench.md and bench.json")
    args = parser.parse_args(argv)
    for name in ("warmup", "min_reps", "max_reps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else '>= 1'}")

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    # Half-precision operands round to 2^-8 (bf16) or 2^-11 (fp16), summed over d terms: 2e-2 leaves room for that
    # while a wrong index or a missing term (errors of order 1) never passes. fp32: TF32 is off by default.
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    settings = TimingSettings(warmup=args.warmup, min_reps=args.min_reps, max_reps=max(args.max_reps, args.min_reps),
                              min_time_s=args.min_time)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    meta = {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version, "dtype": args.dtype,
            "settings": {k: v for k, v in asdict(settings).items() if k != "flush_l2"},
            "grid": {"tokens": args.tokens, "dims": args.dims, "block_sizes": args.block_sizes}}
    if device.type == "cuda":
        meta["ceilings"] = {k: round(v, 2) for k, v in ceilings(device).items()}
        print(f"ceilings: {meta['ceilings']}", flush=True)
    predicted = load_predictions(args.predictions)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, written = args.out / "bench.csv", []
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for tokens in args.tokens:
            for d in args.dims:
                torch.manual_seed(0)
                base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
                x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
                grad = torch.randn(tokens, d, device=device, dtype=dtype)
                cells = [(path, None) for path in FIXED_PATHS]
                cells += [(path, p) for p in args.block_sizes for path in BLOCK_PATHS]
                lora: dict[str, Row] = {}
                kernel = ref = None
                for path, p in cells:
                    if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                        row = Row(tokens, d, p, path, status="not run: time limit")
                    elif reason := skip_reason(path, p, d, device):
                        row = Row(tokens, d, p, path, status=f"not run: {reason}")
                    else:
                        if p is not None and (kernel is None or kernel.shape[2] != p):
                            # One kernel per p, shared by its paths; |ΔW x| is made comparable to |W0 x| so that a
                            # wrong delta cannot hide under W0's rounding.
                            kernel = ref = None
                            kernel = torch.randn(d // p, d // p, p, device=device) * (0.5 * d**0.5)
                            ref = None if args.no_check else reference(base, kernel, x, grad)
                        row = measure_cell(path, p, base, x, grad, kernel if p else None, ref if p else None,
                                           settings, tol)
                    if path.startswith("lora"):
                        lora[path] = row
                    out = csv_row(row, lora, meta, predicted)
                    writer.writerow(out)
                    f.flush()
                    written.append(out)
                    print(f"T={tokens} d={d} p={p or '-'} {path}: {out['step_ms'] or '-'} ms "
                          f"(+{out['added_ms'] or '-'}) {row.status}", flush=True)
                del base, x, grad, kernel, ref
                meta["headline"] = headline(written)
                meta["seconds"] = round(time.perf_counter() - started, 1)
                (args.out / "bench.md").write_text(markdown(written, meta) + "\n")
                (args.out / "bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("\n".join(meta.get("headline", [])))
    failed = [r for r in written if r["status"].startswith(("error", "wrong"))]
    print(f"{len(written)} cells, {sum(bool(r['step_ms']) for r in written)} timed, {len(failed)} failed; "
          f"{time.perf_counter() - started:.0f} s; wrote {csv_path}, bench.md, bench.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
