"""What the triton backend ADDS to the training step of a frozen ``nn.Linear`` on a CUDA GPU, against torch's paths.

For every (tokens, d, p), one layer per path wraps the same frozen bf16 ``nn.Linear(d, d)``: circtune's C3ALinear
with backend ``triton``, ``torch`` (rfft and fft) and ``dense``, and PEFT's own ``C3ALinear`` (float32 kernel, as
``get_peft_model`` leaves it), beside the bare base layer. A step is forward + backward of ``layer(x)`` with
``x [tokens, d]`` requiring grad and a fixed upstream gradient; gradients are reset before each step and a buffer
twice the L2 size is overwritten so that no step finds the previous one's operands in cache. CUDA events time
forward, backward and the whole step; after a warm-up (which includes the kernels' autotuning), repetitions run
round-robin over the paths so that clock drift hits every path alike. Reported: the 20th/50th/80th percentiles
and ``added = median(path) - median(base)``; the table compares triton's added time with the best torch path.

``--kernels`` also times the three kernels alone (``triton.testing.do_bench``): the fused forward against the
bare base GEMM (the "≈ +0" prediction in kernels/block_circulant_matmul.py) and the kernel gradient against one
``gᵀx`` GEMM (the "≈ one GEMM" prediction in kernels/block_circulant_kernel_grad.py).

    python benchmarks/bench_triton.py --kernels        # GPU only; appends to reports/bench_triton.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from circtune.adapters.c3a import C3ALinear

PATHS = ("base", "triton", "torch-rfft", "torch-fft", "dense", "peft-c3a")
TORCH_PATHS = ("torch-rfft", "torch-fft", "dense")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CSV_FIELDS = ("timestamp", "gpu", "torch_version", "triton_version", "dtype", "d_in", "d_out", "tokens", "p", "path",
              "fwd_ms_median", "bwd_ms_median", "step_ms_p20", "step_ms_median", "step_ms_p80", "added_ms")


@dataclass(frozen=True)
class Result:
    path: str
    fwd: float
    bwd: float
    step_p20: float
    step: float
    step_p80: float
    added: float = float("nan")


def build(path: str, base: nn.Linear, p: int) -> nn.Module:
    if path == "base":
        return base
    if path == "peft-c3a":
        from circtune.measure.modules import build_module
        from circtune.space import Candidate

        return build_module(Candidate("peft-c3a", block_size=p), base)
    backend = {"triton": "triton", "dense": "dense"}.get(path, "torch")
    transform = "fft" if path == "torch-fft" else "rfft"
    layer = C3ALinear(base, p, transform=transform, backend=backend, init="gaussian").to(base.weight.device)
    with torch.no_grad():
        layer.kernel.mul_(0.02)
    return layer


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def time_paths(layers: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, reps: int,
               warmup: int) -> dict[str, Result]:
    flush = torch.empty(2 * _l2_bytes() // 4, dtype=torch.int32, device=x.device)
    events = {name: [] for name in layers}

    def one(name: str, layer: nn.Module, record: bool) -> None:
        x.grad = None
        for param in layer.parameters():
            param.grad = None
        flush.zero_()
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        y = layer(x)
        e[1].record()
        y.backward(grad)
        e[2].record()
        if record:
            events[name].append(e)

    for name, layer in layers.items():
        for _ in range(warmup):
            one(name, layer, False)
    for _ in range(reps):
        for name, layer in layers.items():
            one(name, layer, True)
    torch.cuda.synchronize()
    out = {}
    for name, evs in events.items():
        fwd = statistics.median(e[0].elapsed_time(e[1]) for e in evs)
        bwd = statistics.median(e[1].elapsed_time(e[2]) for e in evs)
        p20, med, p80 = _quantiles([e[0].elapsed_time(e[2]) for e in evs])
        out[name] = Result(name, fwd, bwd, p20, med, p80)
    base = out["base"].step
    return {n: Result(r.path, r.fwd, r.bwd, r.step_p20, r.step, r.step_p80, r.step - base) for n, r in out.items()}


def time_kernels(base: nn.Linear, x: torch.Tensor, grad: torch.Tensor, p: int) -> dict[str, float]:
    """Milliseconds (median of do_bench) of each kernel alone, beside the GEMM it is predicted to cost."""
    import triton
    from circtune.kernels.block_circulant_kernel_grad import block_circulant_kernel_grad
    from circtune.kernels.block_circulant_matmul import block_circulant_matmul, transpose_kernel

    d_out, d_in = base.weight.shape
    w = torch.randn(d_out // p, d_in // p, p, device=x.device) * 0.02
    wt = transpose_kernel(w)
    xd = x.detach()
    bench = {
        "kernel:base-gemm": lambda: torch.nn.functional.linear(xd, base.weight, base.bias),
        "kernel:fwd-fused": lambda: block_circulant_matmul(xd, w, scale=1 / d_in, weight=base.weight, bias=base.bias),
        "kernel:fwd-delta-only": lambda: block_circulant_matmul(xd, w, scale=1 / d_in),
        "kernel:dx-base-gemm": lambda: grad @ base.weight,
        "kernel:dx-fused": lambda: block_circulant_matmul(grad, wt, scale=1 / d_in, weight=base.weight.T),
        "kernel:gTx-gemm": lambda: grad.T @ xd,
        "kernel:kgrad": lambda: block_circulant_kernel_grad(grad, xd, p, scale=1 / d_in),
    }
    return {name: triton.testing.do_bench(fn, warmup=25, rep=100) for name, fn in bench.items()}


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 64 << 20)


def _check(layers: dict[str, nn.Module], x: torch.Tensor) -> None:
    """Never time a wrong kernel: triton's output must match the torch path's to bf16 accuracy."""
    with torch.no_grad():
        ours, ref = layers["triton"](x).float(), layers["torch-rfft"](x).float()
    err = float((ours - ref).abs().max())
    scale = float(ref.abs().max())
    if not err <= 2e-2 * scale:
        raise SystemExit(f"triton output differs from torch-rfft by {err:.3e} (max |y| {scale:.3e}); not timing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096], help="d_in = d_out")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--kernels", action="store_true", help="also time each kernel alone (do_bench)")
    parser.add_argument("--no-peft", action="store_true", help="leave PEFT's C3A out")
    parser.add_argument("--csv", type=Path, default=Path("reports/bench_triton.csv"))
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA GPU (the triton backend does not run on the CPU outside the interpreter "
              "used by the tests); nothing was measured.", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("bench_triton.py needs Triton: pip install 'triton>=3.0'", file=sys.stderr)
        return 2
    import triton

    paths = [p for p in PATHS if not (p == "peft-c3a" and (args.no_peft or importlib.util.find_spec("peft") is None))]
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  dtype {args.dtype}  reps {args.reps}")
    rows = []
    for tokens in args.tokens:
        for d in args.dims:
            torch.manual_seed(0)
            base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
            x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, d, device=device, dtype=dtype)
            print(f"\ntokens={tokens} d={d}: added ms over the base step (forward + backward)")
            print(f"{'p':>5} {'base step':>10} " + " ".join(f"{n:>11}" for n in paths[1:]) + f" {'triton/best':>12}")
            for p in args.block_sizes:
                if d % p:
                    continue
                layers = {name: build(name, base, p) for name in paths}
                _check(layers, x)
                results = time_paths(layers, x, grad, args.reps, args.warmup)
                best = min(results[n].added for n in TORCH_PATHS)
                ratio = results["triton"].added / best if best > 0 else float("nan")
                print(f"{p:>5} {results['base'].step:>10.3f} "
                      + " ".join(f"{results[n].added:>11.3f}" for n in paths[1:]) + f" {ratio:>12.2f}")
                rows += [(tokens, d, p, r.path, f"{r.fwd:.4f}", f"{r.bwd:.4f}", f"{r.step_p20:.4f}", f"{r.step:.4f}",
                          f"{r.step_p80:.4f}", f"{r.added:.4f}") for r in results.values()]
                if args.kernels:
                    ms = time_kernels(base, x, grad, p)
                    print("      kernels alone (ms): " + ", ".join(f"{k.split(':')[1]} {v:.3f}" for k, v in ms.items()))
                    rows += [(tokens, d, p, k, "", "", "", f"{v:.4f}", "", "") for k, v in ms.items()]
                del layers
                torch.cuda.empty_cache()

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(CSV_FIELDS)
        for tokens, d, p, *rest in rows:
            writer.writerow([stamp, gpu, torch.__version__, triton.__version__, args.dtype, d, d, tokens, p, *rest])
    print(f"\nappended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
