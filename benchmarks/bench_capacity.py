"""SYNTHETIC teacher-student benchmark: at one parameter budget, does the capacity-aware allocation train better than
the latency-only pick and uniform C3A?

Everything here is synthetic and offline: a random-init model, planted weight updates, random tokens. It says
whether circtune's capacity score points the budget at the layers that need it when the answer is known; it is no
result on real data.

Setup, per seed (the seed sets the base's init, the planted updates and every batch):

* **Base**: a small RoBERTa encoder built from a transformers config (``MODEL``: 4 layers, hidden 128, 4 heads,
  intermediate 256, vocabulary 512, no dropout). Its 8 target layers are circtune's defaults for an encoder: every
  ``query`` and ``value`` projection (128 x 128).
* **Teacher**: the base with known updates planted in three of the eight targets and nothing in the other five
  (``PLANTS``): the values of layers 1, 3 and 2, with Frobenius norms of 1.0, 0.5 and 0.25 times the layer's own
  weight norm; each ΔW is 80 % (of its squared norm) block-circulant at a fixed block size and 20 % rank 4. Values,
  not queries: at random init the attention is nearly uniform, and a planted query update barely changes the
  output (its gradient energy was ~1e-5 of the total in a trial with one planted query).
* **Students**: the base with circtune's adapter layers (``circtune.apply_adapter``; every adapter starts at
  ΔW = 0), trained with Adam to match the teacher's last hidden states (mean squared error) on random token batches
  of 8 x 32; all students of a seed see the same batches, for the same number of steps, at every learning rate of
  the sweep. The loss reported is the mean squared error to the teacher on 8 held-out random batches after training;
  the untrained student's (the base model's) is the initial loss.

Allocations, all at the same budget of trainable adapter parameters, from one per-layer profile of this model made
by circtune's own profiler (``circtune.profile``) on this CPU with the reduced space ``SPACE``:

1. ``latency-only``: the exact optimum of predicted added step time (``problem.build_problem`` + ``exact_optimum``),
   what circtune picked before capacity existed.
2. ``uniform c3a p=P``: every target C3A at one block size, the smallest P (most parameters) whose total fits.
3. ``capacity-aware``: the target layers' full-weight gradients under the same teacher-matching loss on 8
   calibration batches (``circtune.calibration.layer_gradients``), their capacity scores
   (``circtune.capacity.capacity_from_gradients``), then circtune's default rule: each layer within ½-2x its
   energy-weighted share of the budget, the fastest assignment within ``--capacity-tolerance`` of the best capacity
   (``circtune.allocation.allocate`` + ``capacity_pick``).
4. ``capacity-aware (free)``: the same without the balance windows (``--allocation free``).
5. ``capacity-aware (c3a only)``: the balanced capacity-aware pick among C3A options alone (``--methods c3a``):
   the allocation across layers without the choice of method.
6. ``balanced, no calibration``: circtune's pick without calibration data: uniform energy (every layer within
   ½-2x the mean share) and data-free capacity fractions (``capacity_from_gradients(layers, None)``).

The printed table gives, per allocation, the final loss at its best learning rate (the one with the lowest median
over seeds): median and range over seeds, the parameters used (and how many sit in the planted layers), the loss
left relative to the untrained student, and the captured capacity score. The CSV holds every run.

``reports/capacity_teacher_student.csv`` holds two runs: circtune's default targets (query and value, budget 4096),
then the values alone at the same budget per layer::

    python benchmarks/bench_capacity.py --profile-out runs/bench-capacity
    python benchmarks/bench_capacity.py --profile-out runs/bench-capacity --targets value --budget 2048 --append

Threads: one by default. On a CPU shared with other jobs, two OpenMP threads ran a training step 15x slower than one
(3.1 s against 0.2 s at a load of 12 on 2 cores: the threads wait for each other at every barrier).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: circtune from this checkout
    sys.path.insert(0, str(ROOT))

# Small enough that a few hundred training steps of a dozen students take minutes on one CPU core.
MODEL = {"model_type": "roberta", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64, "type_vocab_size": 1,
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 1, "bos_token_id": 0,
         "eos_token_id": 2}
BATCH, SEQ_LEN = 8, 32
EVAL_BATCHES = 8
CALIBRATION_BATCHES = 8


@dataclass(frozen=True)
class Plant:
    """A known update planted in one target layer of the teacher: ``ΔW = s·(a·B/‖B‖ + b·L/‖L‖)/‖…‖`` with B
    block-circulant at ``block_size``, L of rank ``rank``, a² = ``circulant_share``, b² = 1 − a², ‖ΔW‖ = s =
    ``scale``·‖W‖."""

    layer: str
    block_size: int
    rank: int
    scale: float
    circulant_share: float = 0.8


PLANTS = (
    Plant("encoder.layer.1.attention.self.value", block_size=16, rank=4, scale=1.0),
    Plant("encoder.layer.3.attention.self.value", block_size=32, rank=4, scale=0.5),
    Plant("encoder.layer.2.attention.self.value", block_size=16, rank=4, scale=0.25),
)

# The space profiled for the allocations: both methods, block sizes 8 to the hidden size, CDVFT with 2 factors, the
# two CPU backends (triton would run interpreted on the CPU), fp32.
SPACE = """description = "bench_capacity: c3a and cdvft (m=2), p in 8..128, rfft/torch and dense, fp32"
methods = ["c3a", "cdvft"]
block_sizes = [8, 16, 32, 64, 128]
factors = [2]
transforms = ["rfft"]
backends = ["torch", "dense"]
dtypes = ["fp32"]
"""

CSV_FIELDS = ("timestamp", "targets", "allocation", "seed", "lr", "steps", "budget", "params_used", "planted_params",
              "initial_loss", "final_loss", "relative_loss", "capacity", "predicted_added_ms", "train_s", "layers",
              "cpu", "threads", "torch_version")


# ---------------------------------------------------------------------------------------------------------- models
def build_base(seed: int) -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    config = RobertaConfig(**{k: v for k, v in MODEL.items() if k != "model_type"})
    return RobertaModel(config, add_pooling_layer=False).eval().requires_grad_(False)


def planted_delta(weight: torch.Tensor, plant: Plant, gen: torch.Generator) -> torch.Tensor:
    """The update ``plant`` describes for ``weight`` (``[d_out, d_in]``), drawn from ``gen``."""
    from circtune.adapters import block_circulant_matrix

    d_out, d_in = weight.shape
    p = plant.block_size
    circ = block_circulant_matrix(torch.randn(d_out // p, d_in // p, p, generator=gen, dtype=torch.float64))
    low = (torch.randn(d_out, plant.rank, generator=gen, dtype=torch.float64)
           @ torch.randn(plant.rank, d_in, generator=gen, dtype=torch.float64))
    a, b = plant.circulant_share ** 0.5, (1 - plant.circulant_share) ** 0.5
    delta = a * circ / circ.norm() + b * low / low.norm()
    return (plant.scale * weight.double().norm() * delta / delta.norm()).to(weight.dtype)


def build_teacher(base: nn.Module, seed: int, plants: Sequence[Plant] = PLANTS) -> nn.Module:
    teacher = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for plant in plants:
            weight = teacher.get_submodule(plant.layer).weight
            weight.add_(planted_delta(weight, plant, gen))
    return teacher


def target_layers(model: nn.Module, targets: Sequence[str] | None = None) -> tuple:
    """The target layers of ``model``: circtune's defaults for an encoder, or those matching ``targets``."""
    from circtune.models import find_targets

    return find_targets(model, targets, "encoder")[1]


def token_batches(n: int, seed: int, batch: int = BATCH, seq_len: int = SEQ_LEN) -> list[dict[str, torch.Tensor]]:
    """Random token ids (never the special ids 0-2) with a full attention mask."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, MODEL["vocab_size"], (batch, seq_len), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def matching_loss(teacher: nn.Module) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    """The students' loss as ``loss_fn(model, batch)``: MSE between the model's and the teacher's last hidden
    states (what calibration differentiates too)."""

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            target = hidden(teacher, batch)
        return nn.functional.mse_loss(hidden(model, batch), target)

    return loss_fn


# ---------------------------------------------------------------------------------------------------- allocations
@dataclass(frozen=True)
class Allocation:
    name: str
    layers: dict  # full target name -> circtune.LayerConfig
    params: int
    predicted_ms: float  # predicted added step time over the frozen model: the per-layer measurements summed

    def summary(self) -> str:
        """One token per layer: ``1v=c3a16/dense`` is layer 1's value at C3A p=16 on the dense backend;
        ``cdvft16x2`` is CDVFT p=16 with 2 factors."""
        parts = []
        for name, lc in self.layers.items():
            idx, kind = name.split(".")[2], name.rsplit(".", 1)[-1][0]
            what = f"c3a{lc.block_size}" if lc.method == "c3a" else f"cdvft{lc.block_size}x{lc.factors}"
            parts.append(f"{idx}{kind}={what}/{lc.backend}")
        return " ".join(parts)


def _from_assignment(name: str, problem, assignment) -> Allocation:
    layers = {layer.name: option.candidate.layer_config()
              for layer, option in zip(problem.layers, assignment.layer_options(problem), strict=True)}
    return Allocation(name, layers, assignment.params, assignment.step_ms)


def profile_frame(out: Path, threads: int, progress: bool) -> pd.DataFrame:
    """Per-layer measurements of the model's target shape by circtune's profiler, written under ``out`` (a later
    run with the same folder reuses its store)."""
    import circtune

    out.mkdir(parents=True, exist_ok=True)
    folder = out / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL))
    space = out / "space.toml"
    space.write_text(SPACE)
    result = circtune.profile(str(folder), space=str(space), out=str(out / "profile"), tokens=BATCH * SEQ_LEN,
                              threads=threads, peft=False, min_time=0.3, min_reps=10, force=True,
                              progress=progress)
    return result.measurements


def latency_allocations(layers, frame: pd.DataFrame, budget: int, min_fill: float) -> list[Allocation]:
    """The latency-only optimum and uniform C3A at the smallest block size whose total fits the budget."""
    from circtune.exact import exact_optimum, uniform_c3a
    from circtune.problem import build_problem

    problem = build_problem(layers, frame, budget, min_fill)
    out = [_from_assignment("latency-only", problem, exact_optimum(problem))]
    fitting = [a for a in uniform_c3a(problem) if a.params <= budget]
    if not fitting:
        raise ValueError(f"budget {budget:,}: no uniform C3A assignment of the profiled block sizes fits it")
    best = max(fitting, key=lambda a: a.params)
    return [*out, _from_assignment(best.label, problem, best)]


def calibration_capacity(base: nn.Module, teacher: nn.Module, layers, seed: int):
    """circtune's capacity scores from the target layers' gradients of the teacher-matching loss on calibration
    batches (the base model, where every student starts)."""
    from circtune.calibration import layer_gradients
    from circtune.capacity import capacity_from_gradients

    batches = token_batches(CALIBRATION_BATCHES, 20_000 + seed)
    grads = layer_gradients(base, [t.name for t in layers], batches, loss_fn=matching_loss(teacher))
    return capacity_from_gradients(layers, grads)


def capacity_allocations(layers, frame: pd.DataFrame, budget: int, min_fill: float, capacity,
                         tolerance: float) -> tuple[list[Allocation], list[str]]:
    """circtune's capacity-aware picks (balanced, free, balanced with C3A alone) and the balance rule without
    calibration (uniform energy); a rule that cannot meet the budget is a note."""
    from circtune.allocation import allocate, capacity_pick
    from circtune.capacity import capacity_from_gradients
    from circtune.options import BudgetError
    from circtune.problem import build_problem

    problem = build_problem(layers, frame, budget, min_fill, capacity=capacity)
    c3a_only = build_problem(layers, frame, budget, min_fill, methods=("c3a",), capacity=capacity)
    no_data = capacity_from_gradients(layers, None)  # uniform energy and data-free fractions
    uniform = build_problem(layers, frame, budget, min_fill, capacity=no_data)
    out, notes = [], []
    for name, rule, prob, cap in (("capacity-aware", "balanced", problem, capacity),
                                  ("capacity-aware (free)", "free", problem, capacity),
                                  ("capacity-aware (c3a only)", "balanced", c3a_only, capacity),
                                  ("balanced, no calibration", "balanced", uniform, no_data)):
        try:
            allocated = allocate(prob, cap, rule)  # the balance rule's problem holds fewer options per layer
            pick = capacity_pick(allocated, tolerance, "latency")
        except BudgetError as e:
            notes.append(f"{name}: not run: {e}")
            continue
        out.append(_from_assignment(name, allocated, pick))
    return out, notes


def captured(allocation: Allocation, layers, capacity) -> float | None:
    """The allocation's capacity score: Σ over layers of energy × captured fraction (None without capacity)."""
    if capacity is None:
        return None
    from circtune.space import Candidate

    return sum(capacity.score(layer, Candidate.from_layer(allocation.layers[layer.name])) for layer in layers)


# ------------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Run:
    allocation: Allocation
    seed: int
    lr: float
    steps: int
    budget: int
    initial: float
    final: float
    params: int
    planted: int  # parameters in the planted layers
    capacity: float | None
    train_s: float
    targets: str = "default"  # the --targets patterns, or "default"


def evaluate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], targets: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        losses = [nn.functional.mse_loss(hidden(model, b), t).item() for b, t in zip(batches, targets, strict=True)]
    return sum(losses) / len(losses)


def train_student(base: nn.Module, allocation: Allocation, lr: float, data, targets, eval_data, eval_targets,
                  ) -> tuple[float, int, float]:
    """Train base + the allocation's adapters on (data, targets); returns (held-out loss, trained parameters,
    seconds). A run that diverges (NaN) reports an infinite loss: it never looks good."""
    from circtune import AdapterConfig, apply_adapter

    student = copy.deepcopy(base)
    apply_adapter(student, AdapterConfig("bench-capacity", dict(allocation.layers)), modules_to_save=[])
    params = [p for p in student.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    if count != allocation.params:
        raise RuntimeError(f"{allocation.name}: the student trains {count:,} parameters, the allocation says "
                           f"{allocation.params:,}")
    opt = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for batch, target in zip(data, targets, strict=True):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(hidden(student, batch), target).backward()
        opt.step()
    seconds = time.perf_counter() - start
    final = evaluate(student, eval_data, eval_targets)
    return (final if final == final else float("inf")), count, seconds


@dataclass(frozen=True)
class Settings:
    steps: int
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    budget: int
    min_fill: float = 0.9
    tolerance: float = 0.05
    progress: bool = True
    targets: tuple[str, ...] | None = None  # None: circtune's defaults (query, value)


def run_benchmark(frame: pd.DataFrame, s: Settings) -> tuple[list[Run], list[str]]:
    """Every (allocation, seed, lr) run, and notes (calibration energies, picks that could not run)."""
    from tqdm import tqdm

    layers = target_layers(build_base(0), s.targets)
    if not any(t.name in {p.layer for p in PLANTS} for t in layers):
        raise ValueError(f"targets {', '.join(s.targets or ())}: none of the planted layers is a target")
    fixed = latency_allocations(layers, frame, s.budget, s.min_fill)
    planted_names = {p.layer for p in PLANTS}
    runs, notes = [], []
    for seed in s.seeds:
        base = build_base(seed)
        teacher = build_teacher(base, seed)
        try:
            capacity = calibration_capacity(base, teacher, layers, seed)
        except ImportError as e:  # circtune without calibration/capacity: say so, run the other allocations
            capacity, found = None, []
            notes.append(f"seed {seed}: capacity-aware picks not run: {e}")
        else:
            notes.append(f"seed {seed}: calibration energy " + " ".join(
                f"{n.split('.')[2]}{n.rsplit('.', 1)[-1][0]}={e:.3f}" for n, e in capacity.energy.items()))
            found, more = capacity_allocations(layers, frame, s.budget, s.min_fill, capacity, s.tolerance)
            notes += [f"seed {seed}: {n}" for n in more]
        data = token_batches(s.steps, 30_000 + seed)
        eval_data = token_batches(EVAL_BATCHES, 40_000 + seed)
        with torch.no_grad():
            targets = [hidden(teacher, b) for b in data]
            eval_targets = [hidden(teacher, b) for b in eval_data]
        initial = evaluate(base, eval_data, eval_targets)
        jobs = [(a, lr) for a in [*fixed, *found] for lr in s.lrs]
        for allocation, lr in tqdm(jobs, desc=f"seed {seed}: students", disable=not s.progress):
            final, params, seconds = train_student(base, allocation, lr, data, targets, eval_data, eval_targets)
            planted = sum(params_of(allocation.layers[t.name], t) for t in layers if t.name in planted_names)
            runs.append(Run(allocation, seed, lr, s.steps, s.budget, initial, final, params, planted,
                            captured(allocation, layers, capacity), seconds, ",".join(s.targets or ("default",))))
    return runs, notes


def params_of(lc, layer) -> int:
    from circtune.space import Candidate

    return Candidate.from_layer(lc).params(layer.d_in, layer.d_out)


# -------------------------------------------------------------------------------------------------------- output
def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, {platform.platform()}"


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def best_runs(runs: Sequence[Run]) -> dict[str, tuple[float, list[Run]]]:
    """Per allocation (first-seen order): its best learning rate (the lowest median final loss over seeds) and the
    runs at it."""
    by_name: dict[str, dict[float, list[Run]]] = {}
    for r in runs:
        by_name.setdefault(r.allocation.name, {}).setdefault(r.lr, []).append(r)
    return {name: min(by_lr.items(), key=lambda kv: statistics.median(r.final for r in kv[1]))
            for name, by_lr in by_name.items()}


def table(runs: Sequence[Run]) -> str:
    lines = ["| allocation | final loss: median (range over seeds) | loss left vs untrained | best lr | params | "
             "params in planted layers | capacity score | predicted added ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (lr, best) in best_runs(runs).items():
        finals = [r.final for r in best]
        left = statistics.median(r.final / r.initial for r in best)
        caps = [r.capacity for r in best if r.capacity is not None]
        lines.append(f"| {name} | {statistics.median(finals):.3g} ({_span(finals, '.3g')}) | {left:.1%} | {lr:g} | "
                     f"{_span([r.params for r in best], ',')} | {_span([r.planted for r in best], ',')} | "
                     f"{_span(caps, '.3f') if caps else 'n/a'} | "
                     f"{_span([r.allocation.predicted_ms for r in best], '.2f')} |")
    return "\n".join(lines)


BASELINES = ("latency-only", "uniform c3a")


def verdict(runs: Sequence[Run]) -> str:
    """One line per capacity-rule allocation: whether its median final loss (at its best lr) is below the best of
    the baselines (latency-only, uniform C3A) at theirs."""
    medians = {name: statistics.median(r.final for r in best) for name, (_, best) in best_runs(runs).items()}
    base = {k: v for k, v in medians.items() if k.startswith(BASELINES)}
    lines = [] if "capacity-aware" in medians else \
        ["The capacity-aware pick (balance rule, calibration) did not run (see the notes): no verdict for it."]
    if not base:
        return "\n".join([*lines, "No baseline ran: no verdict."])
    runner = min(base, key=base.get)
    for name, loss in medians.items():
        if name in base:
            continue
        if loss < base[runner]:
            lines.append(f"{name} wins: median final loss {loss:.3g} against {base[runner]:.3g} for the best "
                         f"baseline ({runner}), {1 - loss / base[runner]:.0%} lower.")
        else:
            lines.append(f"{name} does NOT win: {runner} reaches a median final loss of {base[runner]:.3g} "
                         f"against its {loss:.3g} ({loss / base[runner] - 1:.0%} higher).")
    return "\n".join(lines)


def write_csv(path: Path, runs: Sequence[Run], append: bool = False) -> None:
    """One row per run, written atomically (a temporary file renamed); ``append`` keeps the rows already there (a
    file with other columns is refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cpu, threads = machine_line().split(",")[0], torch.get_num_threads()
    kept = []
    if append and path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != CSV_FIELDS:
                raise ValueError(f"--append: {path} has other columns than this script writes; use another --csv")
            kept = list(reader)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(kept)
        for r in runs:
            w.writerow({"timestamp": stamp, "targets": r.targets, "allocation": r.allocation.name, "seed": r.seed,
                        "lr": r.lr,
                        "steps": r.steps, "budget": r.budget, "params_used": r.params, "planted_params": r.planted,
                        "initial_loss": f"{r.initial:.6g}", "final_loss": f"{r.final:.6g}",
                        "relative_loss": f"{r.final / r.initial:.6g}",
                        "capacity": "" if r.capacity is None else f"{r.capacity:.6f}",
                        "predicted_added_ms": f"{r.allocation.predicted_ms:.4f}", "train_s": f"{r.train_s:.2f}",
                        "layers": r.allocation.summary(), "cpu": cpu, "threads": threads,
                        "torch_version": torch.__version__})
    tmp.replace(path)


def _numbers(ap: argparse.ArgumentParser, flag: str, text: str, kind: type) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated {'whole numbers' if kind is int else 'numbers'}")
    if not values:
        ap.error(f"{flag} is empty")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="training steps per student (default 150)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--lrs", default="0.003,0.01,0.03,0.1,0.3",
                    help="Adam learning rates of the sweep (default 0.003,0.01,0.03,0.1,0.3)")
    ap.add_argument("--budget", type=int, default=4096, help="trainable adapter parameters (default 4096: uniform "
                                                             "C3A at p=32 on the 8 targets)")
    ap.add_argument("--min-fill", type=float, default=0.9, help="least share of the budget used (default 0.9)")
    ap.add_argument("--capacity-tolerance", type=float, default=0.05,
                    help="capacity-aware rule: the fastest assignment within this share of the best capacity "
                         "(default 0.05)")
    ap.add_argument("--targets", default=None,
                    help="comma-separated target patterns (default: circtune's for an encoder, query and value)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the docstring)")
    ap.add_argument("--profile-csv", default=None,
                    help="measurements.csv of an earlier profile of this model (skips profiling; default: profile)")
    ap.add_argument("--profile-out", default=None,
                    help="folder for the profile and its store (default: a temporary folder)")
    ap.add_argument("--csv", default=str(ROOT / "reports" / "capacity_teacher_student.csv"),
                    help="CSV written, one row per run (default reports/capacity_teacher_student.csv)")
    ap.add_argument("--append", action="store_true", help="add the rows to --csv instead of replacing it")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    seeds = _numbers(ap, "--seeds", args.seeds, int)
    lrs = _numbers(ap, "--lrs", args.lrs, float)
    if not all(lr > 0 for lr in lrs):
        ap.error(f"--lrs {args.lrs!r}: learning rates must be positive")
    for flag, value in (("--steps", args.steps), ("--budget", args.budget), ("--threads", args.threads)):
        if value < 1:
            ap.error(f"{flag} must be a positive whole number, got {value}")
    if not 0 <= args.min_fill <= 1 or not 0 <= args.capacity_tolerance < 1:
        ap.error("--min-fill must be within [0, 1] and --capacity-tolerance within [0, 1)")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets is not None else None
    if targets == ():
        ap.error("--targets is empty; e.g. --targets value")
    if args.profile_csv is not None and not Path(args.profile_csv).is_file():
        ap.error(f"--profile-csv {args.profile_csv}: no such file")
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:  # before profiling: targets that match nothing
        target_layers(build_base(0), targets)
    except ValueError as e:
        ap.error(f"--targets {args.targets}: {str(e).splitlines()[0]}")
    if args.profile_csv:
        frame = pd.read_csv(args.profile_csv)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            frame = profile_frame(Path(args.profile_out or tmp), args.threads, not args.quiet)
    torch.set_num_threads(args.threads)  # the profile call puts the caller's count back; keep ours
    try:
        runs, notes = run_benchmark(frame, Settings(args.steps, seeds, lrs, args.budget, args.min_fill,
                                                    args.capacity_tolerance, not args.quiet, targets))
        write_csv(Path(args.csv), runs, args.append)
    except ValueError as e:  # a budget the space cannot meet, targets that match nothing, a CSV of other columns
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\nSYNTHETIC teacher-student benchmark (random-init RoBERTa, planted updates, random tokens); not a result "
          "on real data.")
    print(f"targets: {', '.join(targets) if targets else 'circtune defaults (query, value)'}; "
          f"budget {args.budget:,} parameters, {args.steps} steps, lrs {', '.join(f'{lr:g}' for lr in lrs)}, "
          f"seeds {', '.join(map(str, seeds))}; planted: "
          + ", ".join(f"{p.layer.split('.')[2]}{p.layer.rsplit('.', 1)[-1][0]} (p={p.block_size}, "
                      f"x{p.scale:g})" for p in PLANTS))
    for n in notes:
        print(f"note: {n}")
    print()
    print(table(runs))
    print()
    print(verdict(runs))
    print(f"\nmachine: {machine_line()}")
    print(f"command: {command}")
    print(f"wall time: {time.perf_counter() - started:.0f} s; CSV: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
