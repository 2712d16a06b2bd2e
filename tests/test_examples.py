"""examples/train_with_trainer.py: a circtune adapter config trained through transformers.Trainer, tiny settings."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # transformers.Trainer needs it

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_example_trains_only_the_adapter_and_head_and_the_saved_adapter_reloads(tmp_path):
    example = _load("train_with_trainer")
    config = {"format": "circtune.adapter/1", "base_model": "tiny-roberta", "layers": {
        "encoder.layer.0.attention.self.query": {"method": "c3a", "block_size": 16},
        "encoder.layer.1.attention.self.value": {"method": "cdvft", "block_size": 32, "factors": 2,
                                                 "transform": "dft"},
        "encoder.layer.1.attention.self.query": {"method": "c3a", "block_size": 8, "backend": "dense"}}}
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(config))
    result = example.main(["--steps", "4", "--batch-size", "8", "--config", str(path), "--out", str(tmp_path)])

    model = result["model"]
    assert len(result["losses"]) == 4 and all(math.isfinite(v) for v in result["losses"])
    head = sum(p.numel() for p in model.classifier.parameters())
    adapters = 128 * 128 // 16 + 128 * 128 // 8 + (128 + 128 + 128 * 128 // 32)  # c3a, c3a, cdvft: D1, D2, C1
    assert result["trainable"] == adapters + head
    torch.manual_seed(0)  # main() builds its model after the same seed: the frozen weights must be untouched
    untouched = example.classifier().state_dict()
    trained = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    frozen = [k for k in untouched if not k.startswith("classifier.")]
    assert all(torch.equal(trained[k], untouched[k]) for k in frozen)
    assert not torch.equal(trained["classifier.out_proj.weight"], untouched["classifier.out_proj.weight"])
    kernel = model.roberta.encoder.layer[0].attention.self.query.kernel
    assert kernel.abs().sum() > 0  # zero-initialised C3A kernel moved by the Trainer's steps
    assert result["adapter"].is_file() and result["reload_diff"] < 1e-5
