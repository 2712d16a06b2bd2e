"""The architectures circtune knows offline: the built-in models, rebuilt from their published config numbers,
and the family (encoder, vision, decoder) of each transformers model type that a config folder may name.

Data, kept apart from :mod:`circtune.models`, which resolves a spec to a model and its target layers: a new built-in
model is an entry here (and its expected target shapes in tests/test_models.py), with no change to the resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class BuiltinModel:
    """A well-known architecture, rebuilt offline from its published config numbers."""

    model_type: str  # transformers model_type, for AutoConfig.for_model
    config: Mapping[str, Any]  # keyword arguments for the config (published numbers)
    family: str  # "encoder", "vision" or "decoder"
    description: str  # what it is and where the numbers come from
    aliases: tuple[str, ...] = ()  # Hugging Face Hub ids that name the same architecture

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]


def _builtin(model_type: str, family: str, description: str, aliases: tuple[str, ...] = (), **config) -> BuiltinModel:
    return BuiltinModel(model_type, MappingProxyType(config), family, description, aliases)


_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
_BERT = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
_VIT = dict(image_size=224, patch_size=16, num_channels=3, qkv_bias=True, layer_norm_eps=1e-12)
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "roberta-base": _builtin(
        "roberta", "encoder", "RoBERTa base, 125M", ("FacebookAI/roberta-base",), **_ROBERTA,
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "roberta-large": _builtin(
        "roberta", "encoder", "RoBERTa large, 355M", ("FacebookAI/roberta-large",), **_ROBERTA,
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-base-uncased": _builtin(
        "bert", "encoder", "BERT base uncased, 110M", ("google-bert/bert-base-uncased",), **_BERT,
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": _builtin(
        "bert", "encoder", "BERT large uncased, 336M", ("google-bert/bert-large-uncased",), **_BERT,
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vit-base": _builtin(
        "vit", "vision", "ViT-B/16 at 224 px, 86M",
        ("google/vit-base-patch16-224", "google/vit-base-patch16-224-in21k"),
        **_VIT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit-large": _builtin(
        "vit", "vision", "ViT-L/16 at 224 px, 304M",
        ("google/vit-large-patch16-224", "google/vit-large-patch16-224-in21k"),
        **_VIT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "llama-2-7b": _builtin(
        "llama", "decoder", "Llama 2 7B", ("meta-llama/Llama-2-7b-hf",), **_LLAMA2,
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008),
    "llama-2-13b": _builtin(
        "llama", "decoder", "Llama 2 13B", ("meta-llama/Llama-2-13b-hf",), **_LLAMA2,
        hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        intermediate_size=13824),
    "llama-3-8b": _builtin(
        "llama", "decoder", "Llama 3 8B (grouped-query attention, 8 KV heads)", ("meta-llama/Meta-Llama-3-8B",),
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
    "mistral-7b": _builtin(
        "mistral", "decoder", "Mistral 7B v0.1 (8 KV heads, sliding window 4096)", ("mistralai/Mistral-7B-v0.1",),
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "qwen2.5-7b": _builtin(
        "qwen2", "decoder", "Qwen2.5 7B (4 KV heads, biased q/k/v)", ("Qwen/Qwen2.5-7B",),
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_theta=1000000.0, sliding_window=131072, max_window_layers=28, use_sliding_window=False,
        bos_token_id=151643, eos_token_id=151643, tie_word_embeddings=False),
}

_FAMILY_BY_MODEL_TYPE = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "deberta-v2",
                     "roberta-prelayernorm", "layoutlm", "ernie", "megatron-bert"), "encoder"),
    **dict.fromkeys(("vit", "deit", "vit_mae", "vit_msn", "dinov2", "ijepa"), "vision"),
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2",
                     "granite", "cohere", "starcoder2", "stablelm", "internlm3"), "decoder"),
}


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def _lookup_builtin(spec: str) -> tuple[str, BuiltinModel] | None:
    if spec in BUILTIN_MODELS:
        return spec, BUILTIN_MODELS[spec]
    key = spec.lower()
    for name, b in BUILTIN_MODELS.items():
        if key == name.lower() or key in (a.lower() for a in b.aliases):
            return name, b
    return None
