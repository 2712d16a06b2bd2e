"""Train with a circtune adapter config: the one line a training script needs, on the CPU in about a minute.

1. Build a small RoBERTa from a config (no download) and let ``circtune.search`` (what ``circtune search`` runs)
   pick an adapter per query/value layer under a 2k-parameter budget on this machine (a quick profile: small
   token count, few repetitions).
   Skip this with ``--config PATH`` to use an ``adapter_config.json`` you already have.
2. ``circtune.apply_adapter(model, config)`` on the task model, ``RobertaForSequenceClassification``: the config
   names the base model's layers (``encoder.layer.0...``), found here under ``roberta.``; the listed nn.Linear
   become circulant adapters, the new classification head trains with them (PEFT's default for the task),
   everything else is frozen.
3. Train a few hundred steps on a synthetic task (is the first token in the lower half of the vocabulary?) and
   print the loss as it falls; save the adapter and the head (safetensors), reload them into a fresh model, merge.

    python examples/train_with_config.py [--steps 300] [--config runs/.../adapter_config.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

import circtune

CONFIG = {"model_type": "roberta", "vocab_size": 200, "hidden_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 40, "type_vocab_size": 1}
LABELS = 2


def make_adapter_config(model_dir: Path, out: Path) -> Path:
    """Run the real search on the small model (what `circtune search --model DIR --budget 2k` does)."""
    result = circtune.search(str(model_dir), "2k", tokens=64, space="encoder", warmup=1, min_reps=3, max_reps=5,
                             min_time=0, trials=50, out=out)
    print(f"picked {result.config.metadata['total_params']} parameters; report: {result.report_path}")
    return out / "adapter_config.json"


def batch(generator: torch.Generator, size: int = 32, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, CONFIG["vocab_size"], (size, seq_len), generator=generator)
    return ids, (ids[:, 0] < CONFIG["vocab_size"] // 2).long()


def classifier() -> nn.Module:
    """A RobertaForSequenceClassification with random weights (a real script loads pretrained ones)."""
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**CONFIG, num_labels=LABELS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", type=Path, help="an adapter_config.json (default: run circtune search)")
    parser.add_argument("--out", type=Path, help="folder for the search and the saved adapter (default: temp)")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="circtune-example-"))
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    config_path = args.config or make_adapter_config(model_dir, out / "search")

    model = circtune.apply_adapter(classifier(), config_path)  # <- the one line
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for p in model.classifier.parameters())
    print(f"adapter config {config_path}: layer names found under {model.circtune_prefix!r}; "
          f"{sum(p.numel() for p in trainable) - head:,} adapter parameters, {head:,} in the head "
          f"({', '.join(model.circtune_modules_to_save)})")
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, args.steps + 1):
        ids, labels = batch(generator)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")

    ids, labels = batch(torch.Generator().manual_seed(2), size=256)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    accuracy = (reference.argmax(-1) == labels).float().mean().item()
    print(f"held-out accuracy {accuracy:.3f}")

    circtune.save_adapter(model, out / "adapter.safetensors")  # the adapter and the trained head
    fresh = _copy_base(model, classifier())
    merged = circtune.merge_adapter(circtune.load_adapter(fresh, out / "adapter.safetensors")).eval()
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - reference).abs().max().item()
    print(f"saved {out / 'adapter.safetensors'}; reloaded into a fresh model and merged: max |logit difference| "
          f"{diff:.2e}")


def _copy_base(trained: nn.Module, fresh: nn.Module) -> nn.Module:
    """The fresh model with the trained model's frozen base weights (the adapter file holds the adapters and the
    head only; a real script loads the same pretrained weights again)."""
    base = {k.replace(".base_layer.", "."): v for k, v in trained.state_dict().items()}
    fresh.load_state_dict({k: v for k, v in base.items() if k in fresh.state_dict()})
    return fresh


if __name__ == "__main__":
    main()
