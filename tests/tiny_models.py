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

    from circtune.measure.modules import build_module

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
    from circtune.measure.modules import build_module

    if candidate.method == "c3a" and candidate.block_size == 16 and candidate.backend == "dense":
        _POISONED.append(candidate.label)
    if _POISONED:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return build_module(candidate, base)


# Tiny transformers task models and the base models inside them, built from configs (no download), each with a
# mixed-p C3A config written, as `circtune search` writes it, in the base model's names.
TASK_MODELS = {
    # name: (task model class, base model class, attribute of the base inside the task model)
    "roberta-seq-cls": ("RobertaForSequenceClassification", "RobertaModel", "roberta"),
    "llama-causal-lm": ("LlamaForCausalLM", "LlamaModel", "model"),
    "bert-token-cls": ("BertForTokenClassification", "BertModel", "bert"),
}


def _task_config(name: str):
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    if name.startswith("roberta"):
        return RobertaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=40, type_vocab_size=1, num_labels=3)
    if name.startswith("llama"):
        return LlamaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96, max_position_embeddings=40)
    return BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=40, num_labels=5)


def task_model(name: str, *, base: bool = False, seed: int = 0):
    """The tiny task model ``name`` of TASK_MODELS (or, with ``base``, its base model), random weights from
    ``seed``, in eval mode (no dropout: outputs compare exactly)."""
    import torch
    import transformers

    task_cls, base_cls, _ = TASK_MODELS[name]
    torch.manual_seed(seed)
    config = _task_config(name)
    config.attn_implementation = "eager"
    return getattr(transformers, base_cls if base else task_cls)(config).eval()


def task_adapter_config(name: str) -> dict:
    """A C3A config with block sizes that differ between layers (mixed p), in the base model's layer names."""
    from circtune import FORMAT

    if name.startswith("llama"):  # q 64->64, v 64->32 (two key-value heads), gate 64->96
        per_layer = {"self_attn.q_proj": 16, "self_attn.v_proj": 8, "mlp.gate_proj": 32}
        layers = {f"layers.{i}.{k}": p if i == 0 else p // 2 for i in range(2) for k, p in per_layer.items()}
    else:  # query/value 64->64, intermediate 64->128
        per_layer = {"attention.self.query": 16, "attention.self.value": 32, "intermediate.dense": 64}
        layers = {f"encoder.layer.{i}.{k}": p if i == 0 else p // 4 for i in range(2) for k, p in per_layer.items()}
    return {"format": FORMAT, "base_model": name,
            "layers": {n: {"method": "c3a", "block_size": p} for n, p in layers.items()}}


def roberta_classifier():
    """``tiny_models:roberta_classifier``: the tiny RobertaForSequenceClassification, as a model spec."""
    return task_model("roberta-seq-cls")
