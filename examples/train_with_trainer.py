"""Train with a circtune adapter config through ``transformers.Trainer``, on the CPU in about a minute.

1. The adapter config: ``--config PATH`` (an ``adapter_config.json`` from ``circtune search``), else a quick
   ``circtune.search`` of a small RoBERTa built from a config (no download) under a 2k-parameter budget.
2. A ``RobertaForSequenceClassification`` built from the same config, the adapters applied to it with
   ``circtune.apply_adapter``: the listed layers become circulant adapters, the classification head trains with
   them, everything else is frozen, so the ``Trainer``'s optimizer sees only those parameters.
3. ``Trainer`` runs ``--steps`` steps on a synthetic task (is the first token in the lower half of the
   vocabulary?) from a plain ``torch.utils.data.Dataset`` of random token ids (no ``datasets`` needed), then the
   adapter and the head are saved with safetensors (``circtune.save_adapter``) and reloaded into a fresh model.

    python examples/train_with_trainer.py [--steps 200] [--config runs/.../adapter_config.json] [--out DIR]

``Trainer`` needs ``accelerate`` (installed with ``circtune[peft]``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments

import circtune

CONFIG = {"model_type": "roberta", "vocab_size": 200, "hidden_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 40, "type_vocab_size": 1}
LABELS = 2


class RandomTokens(Dataset):
    """``size`` sequences of random token ids, labelled 1 when the first token is in the lower half of the
    vocabulary: a task the adapters can learn, made from a seed (the same seed, the same data)."""

    def __init__(self, size: int, seq_len: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, CONFIG["vocab_size"], (size, seq_len), generator=generator)
        self.labels = (self.ids[:, 0] < CONFIG["vocab_size"] // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def classifier() -> torch.nn.Module:
    """A RobertaForSequenceClassification with random weights (a real script loads pretrained ones)."""
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**CONFIG, num_labels=LABELS))


def search_config(out: Path) -> Path:
    """What ``circtune search --model DIR --budget 2k`` does, as a quick profile (few tokens and repetitions)."""
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    result = circtune.search(str(model_dir), "2k", tokens=64, space="encoder", warmup=1, min_reps=3, max_reps=5,
                             min_time=0, trials=50, out=out / "search")
    print(f"picked {result.config.metadata['total_params']} parameters; report: {result.report_path}")
    return out / "search" / "adapter_config.json"


def accuracy(model: torch.nn.Module, data: RandomTokens) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=data.ids).logits.argmax(-1)
    return (predicted == data.labels).float().mean().item()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the example; returns what it printed as numbers (the tests read them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--config", type=Path, help="an adapter_config.json (default: run a quick circtune search)")
    parser.add_argument("--out", type=Path, help="folder for the search, the Trainer and the adapter (default: temp)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="circtune-trainer-"))
    config_path = args.config or search_config(out)

    model = circtune.apply_adapter(classifier(), config_path)  # <- the one line
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"adapter config {config_path}: {trainable:,} trainable parameters (adapters and "
          f"{', '.join(model.circtune_modules_to_save)})")
    held_out = RandomTokens(256, seed=2)
    before = accuracy(model, held_out)

    training = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(args.steps * args.batch_size, seed=1))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = accuracy(model, held_out)
    print(f"logged training losses {', '.join(f'{v:.3f}' for v in losses)}; held-out accuracy {before:.3f} -> "
          f"{after:.3f}")

    adapter = out / "adapter.safetensors"
    circtune.save_adapter(model, adapter)  # the adapter and the trained head, nothing of the frozen base
    fresh = classifier()
    fresh.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                           if k.replace(".base_layer.", ".") in fresh.state_dict()})  # the same frozen base weights
    reloaded = circtune.load_adapter(fresh, adapter).eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=held_out.ids).logits - model(input_ids=held_out.ids).logits).abs().max().item()
    print(f"saved {adapter} ({adapter.stat().st_size:,} bytes); reloaded into a fresh model: max |logit difference| "
          f"{diff:.2e}")
    return {"model": model, "losses": losses, "accuracy_before": before, "accuracy_after": after,
            "adapter": adapter, "reload_diff": diff, "trainable": trainable}


if __name__ == "__main__":
    main()
