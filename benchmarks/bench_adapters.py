"""What a layer ADDS to the training step of its frozen base ``nn.Linear``, measured on this CPU.

For every block size p, one layer per path wraps its own frozen ``nn.Linear(dim, dim)``: circtune's C3ALinear
(backend torch with transform rfft and fft, backend dense), PEFT's own ``C3ALinear`` at the same p; plus PEFT's
LoRA ``Linear`` (r=8, alpha 16, no dropout) and the bare base layer. A step is forward + backward of
``layer(x)`` with ``x [tokens, dim]`` requiring grad and a fixed upstream gradient; every gradient is reset to
None before each step. The thread count is fixed; after a warm-up, the repetitions are taken round-robin over all
layers (so that clock or load drift hits every path alike). Reported: median and p25/p75 of the whole step and
the added time ``median(layer) - median(base)``. One table goes to stdout, one row per path to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import C3AConfig, LoraConfig
from peft.tuners.c3a.layer import C3ALinear as PeftC3ALinear
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from circtune.adapters.c3a import C3ALinear

OURS = ("circtune-rfft", "circtune-fft", "circtune-dense")
CSV_FIELDS = ("timestamp", "cpu", "threads", "torch_version", "d_in", "d_out", "tokens", "p", "path",
              "step_ms_median", "step_ms_p25", "step_ms_p75", "added_ms")


@dataclass(frozen=True)
class BenchConfig:
    path: str
    p: int | None  # None for the base layer and LoRA


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    median_ms: float
    p25_ms: float
    p75_ms: float
    added_ms: float


def build(cfg: BenchConfig, dim: int) -> nn.Module:
    base = nn.Linear(dim, dim)
    base.requires_grad_(False)
    if cfg.path == "base":
        return base
    if cfg.path == "lora-r8":
        layer = PeftLoraLinear(base, "default", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0), r=8, lora_alpha=16)
    elif cfg.path == "peft-c3a":
        layer = PeftC3ALinear(base, "default", C3AConfig(block_size=cfg.p, init_weights="gaussian"), cfg.p)
    else:
        transform = "fft" if cfg.path == "circtune-fft" else "rfft"
        backend = "dense" if cfg.path == "circtune-dense" else "torch"
        layer = C3ALinear(base, cfg.p, transform=transform, backend=backend, init="gaussian")
    base.requires_grad_(False)
    return layer


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x.grad = None
    for param in layer.parameters():
        param.grad = None
    start = time.perf_counter()
    layer(x).backward(grad)
    return (time.perf_counter() - start) * 1e3


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(configs: list[BenchConfig], tokens: int, dim: int, reps: int, warmup: int) -> list[BenchResult]:
    torch.manual_seed(0)
    layers = [build(cfg, dim) for cfg in configs]
    x = torch.randn(tokens, dim, requires_grad=True)
    grad = torch.randn(tokens, dim)
    for layer in layers:
        for _ in range(warmup):
            step(layer, x, grad)
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(reps):
        for k, layer in enumerate(layers):
            times[k].append(step(layer, x, grad))
    base_median = statistics.median(times[configs.index(BenchConfig("base", None))])
    results = []
    for cfg, t in zip(configs, times):
        q = statistics.quantiles(t, n=4)
        med = statistics.median(t)
        results.append(BenchResult(cfg, med, q[0], q[2], med - base_median))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1024, help="d_in = d_out")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=Path("reports/bench_adapters_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    configs = [BenchConfig("base", None), BenchConfig("lora-r8", None)]
    configs += [BenchConfig(path, p) for p in args.block_sizes for path in (*OURS, "peft-c3a")]
    results = run(configs, args.tokens, args.dim, args.reps, args.warmup)
    by_key = {(r.config.path, r.config.p): r for r in results}
    lora, base = by_key[("lora-r8", None)], by_key[("base", None)]

    print(f"d_in=d_out={args.dim} tokens={args.tokens} threads={args.threads} reps={args.reps} "
          f"torch {torch.__version__} cpu: {cpu_model()}")
    print(f"base step median {base.median_ms:.2f} ms (p25 {base.p25_ms:.2f}, p75 {base.p75_ms:.2f}); "
          "columns: added ms over the base step")
    heads = (*OURS, "peft-c3a", "lora-r8", "best/lora", "peft/best")
    print(f"{'p':>5} " + " ".join(f"{h:>14}" for h in heads))
    for p in args.block_sizes:
        added = [by_key[(path, p)].added_ms for path in (*OURS, "peft-c3a")]
        best = min(added[:len(OURS)])
        ratios = (best / lora.added_ms, added[-1] / best)
        cells = [f"{a:14.2f}" for a in (*added, lora.added_ms)] + [f"{r:14.2f}" for r in ratios]
        print(f"{p:>5} " + " ".join(cells))

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.csv.exists()
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with args.csv.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(CSV_FIELDS)
        for r in results:
            writer.writerow([stamp, cpu_model(), args.threads, torch.__version__, args.dim, args.dim, args.tokens,
                             r.config.p if r.config.p is not None else "", r.config.path, f"{r.median_ms:.4f}",
                             f"{r.p25_ms:.4f}", f"{r.p75_ms:.4f}", f"{r.added_ms:.4f}"])
    print(f"appended {len(results)} rows to {args.csv}")


if __name__ == "__main__":
    main()
