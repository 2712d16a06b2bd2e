"""``circtune check``: an adapter config (and its weights) checked against its model; the errors are in
tests/test_hostile.py."""

import json

import pytest
from tiny_models import two_shapes

import circtune
from circtune import AdapterConfig, LayerConfig
from circtune.cli.check import check
from circtune.cli.main import main

TINY = ["--model", "tiny_models:two_shapes"]


def _config(**metadata):
    return AdapterConfig("two_shapes", {"blocks.0.up": LayerConfig("c3a", 16),
                                        "blocks.1.up": LayerConfig("c3a", 48, transform="fft", backend="dense"),
                                        "square": LayerConfig("cdvft", 32, 3, alpha=2.0)}, metadata)


@pytest.fixture
def saved(tmp_path):
    """A search-like folder: adapter_config.json written by AdapterConfig.save, weights by save_adapter."""
    folder = tmp_path / "run"
    config = _config(model_spec="tiny_models:two_shapes")
    config.save(folder / "adapter_config.json")
    model = circtune.apply_adapter(two_shapes(), config)
    circtune.save_adapter(model, folder / "adapter.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return folder, trainable


def _listing(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_check_a_config_and_its_weights(saved, capsys):
    folder, trainable = saved
    before = _listing(folder)
    assert main(["check", str(folder / "adapter_config.json"), *TINY, "--weights",
                 str(folder / "adapter.safetensors")]) == 0
    out = capsys.readouterr().out
    assert (f"{folder / 'adapter_config.json'}: valid for tiny_models:two_shapes: 3 layers (2 c3a, 1 cdvft), "
            f"{trainable:,} trainable parameters") in out
    assert "blocks.1.up  48x96         c3a     48  -  fft        dense    96" in out
    assert "square       64x64         cdvft   32  3  rfft       torch    448" in out
    assert f"weights {folder / 'adapter.safetensors'}: loaded, 7 tensors, {trainable:,} values, all finite" in out
    assert _listing(folder) == before  # check writes nothing


def test_check_a_folder_as_json(saved, capsys):
    folder, trainable = saved
    assert main(["check", str(folder), *TINY, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"] == str(folder / "adapter_config.json") and summary["model"] == "tiny_models:two_shapes"
    assert summary["trainable_params"] == trainable == sum(r["params"] for r in summary["layers"])
    assert summary["methods"] == {"c3a": 2, "cdvft": 1} and summary["weights"] is None
    square = next(r for r in summary["layers"] if r["name"] == "square")
    assert square == {"name": "square", "d_in": 64, "d_out": 64, "method": "cdvft", "block_size": 32, "factors": 3,
                      "transform": "rfft", "backend": "torch", "alpha": 2.0, "params": 448}


def test_weights_load_under_another_transform_and_backend(saved):
    """Transform and backend change how ΔW is computed, not what the weights mean: such weights fit."""
    folder, trainable = saved
    other = _config()
    other.layers["blocks.0.up"] = LayerConfig("c3a", 16, transform="fft", backend="dense")
    other.save(folder / "other.json")
    summary = check(str(folder / "other.json"), "tiny_models:two_shapes", folder / "adapter.safetensors")
    assert summary["weights"]["loaded"] and summary["weights"]["params"] == trainable


def test_the_model_comes_from_the_config_when_it_names_a_builtin_or_a_folder(tmp_path):
    AdapterConfig("roberta-base", {"encoder.layer.0.attention.self.query": LayerConfig("c3a", 64)}).save(
        tmp_path / "builtin.json")
    summary = check(str(tmp_path / "builtin.json"))
    assert summary["model"] == "roberta-base" and summary["trainable_params"] == 768 * 768 // 64
    model_dir = tmp_path / "tiny-roberta"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "roberta", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 40, "type_vocab_size": 1}))
    AdapterConfig("tiny-roberta", {"encoder.layer.0.attention.self.value": LayerConfig("cdvft", 16)},
                  {"model_spec": str(model_dir), "total_params": 5}).save(tmp_path / "folder.json")
    summary = check(str(tmp_path / "folder.json"))
    assert summary["model"] == str(model_dir) and summary["trainable_params"] == 32 + 32 + 32 * 32 // 16
    assert summary["note"] == "the config records total_params 5, the layers have 128"
