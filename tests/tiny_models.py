"""Small models for profiler and CLI tests, reachable as ``tiny_models:<name>`` (tests/ is on sys.path)."""

from torch import nn


class TwoShapes(nn.Module):
    """Three target layers of two shapes: 48 -> 96 (twice) and 64 -> 64, plus a non-target head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(48, 96)}) for _ in range(2)])
        self.square = nn.Linear(64, 64)
        self.head = nn.Linear(96, 2)


def two_shapes() -> nn.Module:
    return TwoShapes()


def crashing_build(candidate, base):
    """A module-level (picklable) builder for --isolate tests: kills its process on one candidate."""
    import os

    from circtune.measure.baselines import build_module

    if candidate.method == "c3a" and candidate.block_size == 16 and candidate.backend == "dense":
        os._exit(3)  # as a segfault or a poisoned CUDA context would end the process
    return build_module(candidate, base)
