"""``circtune demo``: train circulant adapters on a small RoBERTa built offline, save and reload them."""

from __future__ import annotations

import argparse
import os
import time

NAME = "demo"
HELP = "fine-tune C3A and CDVFT adapters on a small random RoBERTa (offline), then save, reload and merge them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="circtune-demo", help="folder for adapter_config.json and the weights "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="training steps (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=64, help="C3A block size p for query/value (default: 64)")
    p.add_argument("--backend", default="torch", help="adapter backend (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def _small_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=130, num_labels=2)
    return RobertaForSequenceClassification(config)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import circtune
    from circtune.errors import UsageError
    from circtune.outputs import CONFIG_FILE

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    torch.manual_seed(args.seed)
    model = _small_roberta()
    layers = {}
    for i in range(model.config.num_hidden_layers):
        prefix = f"roberta.encoder.layer.{i}"
        layers[f"{prefix}.attention.self.query"] = {"method": "c3a", "block_size": args.block_size,
                                                    "backend": args.backend}
        layers[f"{prefix}.attention.self.value"] = {"method": "c3a", "block_size": args.block_size,
                                                    "backend": args.backend}
        layers[f"{prefix}.output.dense"] = {"method": "cdvft", "block_size": 256, "factors": 2,
                                            "backend": args.backend}
    config = circtune.AdapterConfig.from_dict({"format": circtune.FORMAT, "base_model": "roberta-small-random",
                                               "layers": layers})
    circtune.apply_adapter(model, config)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = model.classifier  # the new task's head trains too, as in any fine-tuning
    head.requires_grad_(True)
    print(f"model: RoBERTa (4 layers, hidden 256), {len(layers)} adapter layers, "
          f"{n_adapter:,} adapter parameters + {sum(p.numel() for p in head.parameters()):,} in the head")

    # A learnable toy task: the label is whether token 1 appears in the first half of the sequence.
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, 1000, (64, 32), generator=g)
    labels = torch.randint(0, 2, (64,), generator=g)
    ids[labels == 1, torch.randint(0, 16, (int(labels.sum()),), generator=g)] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        batch = torch.randint(0, 64, (16,), generator=g)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step == 0:
            first = loss.item()
    print(f"loss {first:.3f} -> {loss.item():.3f} in {args.steps} steps ({time.perf_counter() - t0:.1f} s)")

    os.makedirs(args.out, exist_ok=True)
    config_path = os.path.join(args.out, CONFIG_FILE)
    weights_path = os.path.join(args.out, "adapter.safetensors")
    circtune.config_from_model(model, "roberta-small-random").save(config_path)
    circtune.save_adapter(model, weights_path)

    model.eval()
    with torch.no_grad():
        expected = model.roberta(input_ids=ids[:4]).last_hidden_state
        torch.manual_seed(args.seed)
        fresh = circtune.load_adapter(_small_roberta(), weights_path).eval()
        reloaded = fresh.roberta(input_ids=ids[:4]).last_hidden_state
        merged = circtune.merge_adapter(fresh).roberta(input_ids=ids[:4]).last_hidden_state
    print(f"saved {config_path} and {weights_path}")
    print(f"reloaded into a fresh model: max |difference| {float((reloaded - expected).abs().max()):.2e}; "
          f"merged: {float((merged - expected).abs().max()):.2e}")
    print(f"use it in a training script:  model = circtune.apply_adapter(model, {config_path!r})")
    return 0
