"""Adapter config validation, injection into a transformers model, save/load/merge."""

import json

import pytest
import torch
from reference import assert_close
from torch import nn
from transformers import RobertaConfig, RobertaModel

import circtune
from circtune import FORMAT, AdapterConfig, AdapterConfigError


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=50, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=192, max_position_embeddings=40)
    return RobertaModel(cfg).eval()


def _config():
    layers = {}
    for i in range(2):
        layers[f"encoder.layer.{i}.attention.self.query"] = {"method": "c3a", "block_size": 48}
        layers[f"encoder.layer.{i}.attention.self.value"] = {"method": "c3a", "block_size": 32, "backend": "dense"}
    layers["encoder.layer.0.intermediate.dense"] = {"method": "cdvft", "block_size": 96, "factors": 3,
                                                   "transform": "fft"}
    return {"format": FORMAT, "base_model": "tiny-roberta", "layers": layers, "budget": 1000}


@torch.no_grad()
def _randomize_adapters(model):
    """Adapters start at ΔW = 0; random values make every factor show in outputs and gradients."""
    for p in model.parameters():
        if p.requires_grad:
            p.normal_(0, 0.1)


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def test_injection_trainable_count_and_training():
    model = circtune.apply_adapter(_model(), _config())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # query 96x96 p=48: 192 each; value p=32: 288 each; cdvft 96->192 p=96, m=3: 96 + 2*192 + 192 + 384.
    assert sum(trainable.values()) == 2 * 192 + 2 * 288 + (96 + 2 * 192 + 96 * 192 // 96 + 192 * 192 // 96)
    assert all(".kernel" in n or ".diagonals." in n or ".circulants." in n for n in trainable)
    _randomize_adapters(model)
    model(input_ids=IDS).last_hidden_state.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_config_file_round_trip(tmp_path):
    cfg = AdapterConfig.from_dict(_config())
    cfg.save(tmp_path / "adapter_config.json")
    again = AdapterConfig.load(tmp_path / "adapter_config.json")
    assert again == cfg and again.metadata == {"budget": 1000}
    assert again.layers["encoder.layer.0.intermediate.dense"].factors == 3
    model = circtune.apply_adapter(_model(), str(tmp_path / "adapter_config.json"))
    assert isinstance(model.encoder.layer[1].attention.self.value, circtune.C3ALinear)


def test_config_reports_every_problem_with_its_key(tmp_path):
    bad = _config()
    bad["format"] = "circtune.adapter/0"
    bad["layers"]["encoder.layer.0.attention.self.query"] = {"method": "lora", "block_size": -1, "colour": 1}
    bad["layers"]["encoder.layer.1.attention.self.query"] = {"method": "cdvft", "block_size": 8, "factors": 1,
                                                            "backend": "cuda_magic", "transform": "dct"}
    with pytest.raises(AdapterConfigError) as e:
        AdapterConfig.from_dict(bad)
    msg = str(e.value)
    for fragment in ["format: 'circtune.adapter/0' is not supported; accepted: 'circtune.adapter/1'",
                     "query'].colour: unknown key", "query'].method: 'lora' is not a method; accepted: c3a, cdvft",
                     "block_size: -1 is not a positive integer", "factors: 1 is not valid for cdvft",
                     "backend: 'cuda_magic' is not a backend here; accepted: torch, dense",
                     "transform: 'dct' is not a transform"]:
        assert fragment in msg, fragment
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        AdapterConfig.load(tmp_path / "broken.json")
    with pytest.raises(AdapterConfigError, match="file not found"):
        AdapterConfig.load(tmp_path / "missing.json")


def test_apply_errors_name_each_layer_and_leave_the_model_untouched():
    model = _model()
    cfg = _config()
    cfg["layers"]["encoder.layer.0.attention.self.qeury"] = {"method": "c3a", "block_size": 48}
    cfg["layers"]["encoder.layer.0.attention.self"] = {"method": "c3a", "block_size": 48}
    cfg["layers"]["encoder.layer.1.attention.self.value"]["block_size"] = 5
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(AdapterConfigError) as e:
        circtune.apply_adapter(model, cfg)
    msg = str(e.value)
    assert ("qeury']: RobertaModel has no module of that name; did you mean "
            "'encoder.layer.0.attention.self.query'? (prefixes tried: '')") in msg
    assert "attention.self']: is a RobertaSelfAttention, not an nn.Linear" in msg
    assert "value']: block_size=5 does not divide the layer's shape (d_in=96, d_out=96)" in msg
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


def test_save_load_round_trip_and_errors(tmp_path):
    model = circtune.apply_adapter(_model(), _config())
    _randomize_adapters(model)
    with torch.no_grad():
        expected = model(input_ids=IDS).last_hidden_state
    path = tmp_path / "adapter.safetensors"
    circtune.save_adapter(model, path)

    # Into the same architecture with adapters already applied ...
    other = circtune.apply_adapter(_model(), _config())
    circtune.load_adapter(other, path)
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS).last_hidden_state, expected)
    # ... and into a plain model: the config stored in the file is applied first.
    plain = circtune.load_adapter(_model(), path)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).last_hidden_state, expected)

    cfg = _config()
    cfg["layers"]["encoder.layer.0.attention.self.query"]["block_size"] = 24
    mismatched = circtune.apply_adapter(_model(), cfg)
    with pytest.raises(ValueError, match=r"query.kernel: file has shape \[2, 2, 48\], model expects \[4, 4, 24\]"):
        circtune.load_adapter(mismatched, path)
    (tmp_path / "corrupt.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        circtune.load_adapter(_model(), tmp_path / "corrupt.safetensors")
    with pytest.raises(ValueError, match="no circtune adapter layers to save"):
        circtune.save_adapter(_model(), tmp_path / "nothing.safetensors")


def test_merge_adapter_unloads_to_plain_linears():
    model = circtune.apply_adapter(_model(), _config())
    _randomize_adapters(model)
    with torch.no_grad():
        expected = model(input_ids=IDS).last_hidden_state
        merged = circtune.merge_adapter(model)
        assert type(merged.encoder.layer[0].attention.self.query) is nn.Linear
        assert_close(merged(input_ids=IDS).last_hidden_state, expected, atol=1e-5, rtol=1e-4, what="merged")


def test_config_from_model_rebuilds_the_same_layers():
    model = circtune.apply_adapter(_model(), _config())
    cfg = circtune.config_from_model(model, "tiny-roberta")
    assert set(cfg.layers) == set(_config()["layers"])
    assert json.loads(json.dumps(cfg.to_dict()))["format"] == FORMAT
    circtune.apply_adapter(_model(), cfg.to_dict())
