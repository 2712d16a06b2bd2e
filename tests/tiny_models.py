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


def tiny_roberta(folder, *, hidden: int = 64, layers: int = 1):
    """A folder holding the config.json of a small RoBERTa (built offline from it): targets query and value,
    ``hidden x hidden`` each, in every layer. Returns the folder."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "roberta", "vocab_size": 50, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 16), "intermediate_size": 2 * hidden, "max_position_embeddings": 40,
        "type_vocab_size": 1}))
    return folder


_POISONED: list[str] = []


def poisoning_build(candidate, base):
    """A module-level (picklable) builder for --isolate tests: on one candidate it leaves its process broken without
    ending it, as a sticky CUDA error (an illegal address) leaves a context: that candidate and every later one built
    in the same process raise. Use it only in child processes (the flag stays set in the process)."""
    from circtune.measure.baselines import build_module

    if candidate.method == "c3a" and candidate.block_size == 16 and candidate.backend == "dense":
        _POISONED.append(candidate.label)
    if _POISONED:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return build_module(candidate, base)
