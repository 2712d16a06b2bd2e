"""Task models (what people fine-tune) as the normal case: a config in the base model's names applies to
``*ForSequenceClassification`` / ``*ForCausalLM`` / ``*ForTokenClassification`` under one resolved prefix, the task
head trains and travels with the adapter, circtune and PEFT agree (trainable parameters and outputs; forward only:
PEFT's hand-written C3A backward is wrong for p > 2), and every failure leaves the model as it was."""

import warnings

import pytest
import torch
from tiny_models import TASK_MODELS, task_adapter_config, task_model
from torch import nn

import circtune
from circtune import AdapterConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

IDS = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(1))
HEADS = {"roberta-seq-cls": ("classifier",), "llama-causal-lm": (), "bert-token-cls": ("classifier",)}
TASK_TYPES = {"roberta-seq-cls": "SEQ_CLS", "llama-causal-lm": "CAUSAL_LM", "bert-token-cls": "TOKEN_CLS"}


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 5) -> None:
    """Adapters start at ΔW = 0 and heads at their init: random values make both show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _fresh(name: str) -> nn.Module:
    """The same pretrained body, another random head: a loaded head must replace it."""
    model = task_model(name)
    with torch.no_grad():
        for h in HEADS[name]:
            for p in model.get_submodule(h).parameters():
                p.normal_()
    return model


def _snapshot(model: nn.Module) -> tuple:
    return ({n: type(m) for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    types, flags, state = _snapshot(model)
    assert types == before[0] and flags == before[1]
    assert state.keys() == before[2].keys() and all(torch.equal(state[k], before[2][k]) for k in state)
    assert not any(isinstance(m, circtune.CirculantLinear) for m in model.modules())


@pytest.mark.parametrize("name", TASK_MODELS)
def test_base_config_applies_to_the_task_model_under_one_prefix(name):
    config = task_adapter_config(name)
    base = circtune.apply_adapter(task_model(name, base=True), config)
    model = circtune.apply_adapter(task_model(name), config)
    inner = TASK_MODELS[name][2]
    assert model.circtune_prefix == inner + "." and base.circtune_prefix == ""
    assert model.circtune_modules_to_save == HEADS[name]
    head_params = sum(p.numel() for h in HEADS[name] for p in model.get_submodule(h).parameters())
    assert _trainable(base) == _adapter_params(config, name)
    assert _trainable(model) == _adapter_params(config, name) + head_params
    _randomize(model)
    out = model(input_ids=IDS).logits
    out.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.requires_grad:
            assert n.endswith(".kernel") or n.split(".")[0] in HEADS[name], n


def _adapter_params(config: dict, name: str) -> int:
    """d_in * d_out / p per layer, the shapes read from the base model."""
    base = task_model(name, base=True)
    return sum(base.get_submodule(n).in_features * base.get_submodule(n).out_features // lc["block_size"]
               for n, lc in config["layers"].items())


@pytest.mark.parametrize("name", TASK_MODELS)
def test_export_to_peft_task_model_and_back(name, tmp_path):
    peft = pytest.importorskip("peft")
    ours = circtune.apply_adapter(task_model(name), task_adapter_config(name))
    _randomize(ours)
    expected = _logits(ours)
    circtune.export_peft(ours, tmp_path / "peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(_fresh(name), tmp_path / "peft",
                                                is_trainable=True)
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert theirs.peft_config["default"].task_type == TASK_TYPES[name]
    diff = (_logits(theirs.eval()) - expected).abs().max().item()
    assert _trainable(theirs) == _trainable(ours)
    assert diff < 1e-5, diff
    print(f"\n{name}: circtune -> PEFT trainable {_trainable(ours)} == {_trainable(theirs)}, "
          f"max |logit diff| {diff:.2e}")

    theirs.save_pretrained(tmp_path / "peft-again")
    back = circtune.import_peft(_fresh(name), tmp_path / "peft-again")
    assert _trainable(back) == _trainable(ours)
    back_diff = (_logits(back) - expected).abs().max().item()
    assert back_diff < 1e-5, back_diff
    assert {n: m.block_size for n, m in back.named_modules() if isinstance(m, circtune.C3ALinear)} == \
        {n: m.block_size for n, m in ours.named_modules() if isinstance(m, circtune.C3ALinear)}


@pytest.mark.parametrize("name", TASK_MODELS)
def test_written_peft_config_on_the_task_model_equals_circtune(name, tmp_path):
    """The search's peft/adapter_config.json (base names, no model) and to_peft_config(config, task_model) give
    PEFT the per-layer block sizes on the task model; PEFT-trained weights import into circtune."""
    peft = pytest.importorskip("peft")
    config = task_adapter_config(name)
    ours = circtune.apply_adapter(task_model(name), config)
    adapter_only = _adapter_params(config, name)

    circtune.to_peft_config(config).save_pretrained(str(tmp_path / "written"))  # what the search writes
    written = peft.C3AConfig.from_pretrained(str(tmp_path / "written"))
    assert written.task_type is None
    plain = peft.get_peft_model(task_model(name), written)
    assert _trainable(plain) == adapter_only  # every layer has its own p, whatever the prefix
    written = peft.C3AConfig.from_pretrained(str(tmp_path / "written"))
    written.task_type = TASK_TYPES[name]  # the README's route for the search's file: the head trains too
    assert _trainable(peft.get_peft_model(task_model(name), written)) == _trainable(ours)

    pc = circtune.to_peft_config(config, task_model(name))
    assert pc.task_type == TASK_TYPES[name]
    theirs = peft.get_peft_model(task_model(name), pc)
    assert _trainable(theirs) == _trainable(ours)
    _randomize(theirs, seed=7)
    expected = _logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "trained")
    back = circtune.import_peft(_fresh(name), tmp_path / "trained")
    diff = (_logits(back) - expected).abs().max().item()
    assert _trainable(back) == _trainable(theirs) and diff < 1e-5, diff
    print(f"\n{name}: PEFT get_peft_model -> circtune trainable {_trainable(theirs)} == {_trainable(back)} "
          f"(adapter alone {adapter_only}), max |logit diff| {diff:.2e}")


def test_task_types_and_base_model():
    config = task_adapter_config("roberta-seq-cls")
    assert circtune.to_peft_config(config, task_model("roberta-seq-cls", base=True)).task_type == \
        "FEATURE_EXTRACTION"
    assert circtune.to_peft_config(config, task_model("roberta-seq-cls"), task_type="QUESTION_ANS").task_type == \
        "QUESTION_ANS"


def test_classifier_head_travels_with_the_adapter(tmp_path):
    name = "roberta-seq-cls"
    model = circtune.apply_adapter(task_model(name), task_adapter_config(name))
    _randomize(model)
    expected = _logits(model)
    circtune.save_adapter(model, tmp_path / "a.safetensors")
    loaded = circtune.load_adapter(_fresh(name), tmp_path / "a.safetensors")
    assert torch.equal(_logits(loaded), expected)
    assert loaded.circtune_modules_to_save == ("classifier",) and _trainable(loaded) == _trainable(model)
    # Merged: plain nn.Linear again, same logits.
    merged = circtune.merge_adapter(loaded)
    assert not any(isinstance(m, circtune.CirculantLinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-4)

    # A file saved from the base model loads into the task model (its head trains, not in the file).
    base = circtune.apply_adapter(task_model(name).roberta, task_adapter_config(name))  # the same body's weights
    _randomize(base)
    circtune.save_adapter(base, tmp_path / "base.safetensors")
    clf = circtune.load_adapter(task_model(name), tmp_path / "base.safetensors")
    assert clf.circtune_prefix == "roberta." and clf.classifier.out_proj.weight.requires_grad
    torch.testing.assert_close(clf.roberta(input_ids=IDS).last_hidden_state, base(input_ids=IDS).last_hidden_state)

    # modules_to_save=[]: the adapter alone trains and is saved.
    alone = circtune.apply_adapter(task_model(name), task_adapter_config(name), modules_to_save=[])
    assert not alone.classifier.out_proj.weight.requires_grad
    circtune.save_adapter(alone, tmp_path / "alone.safetensors")
    from safetensors.torch import load_file
    assert not [k for k in load_file(tmp_path / "alone.safetensors") if k.startswith("classifier.")]


def test_failures_leave_the_model_as_it_was(tmp_path):
    name = "roberta-seq-cls"
    good = circtune.apply_adapter(task_model(name), task_adapter_config(name))
    _randomize(good)
    circtune.save_adapter(good, tmp_path / "good.safetensors")
    other = circtune.apply_adapter(task_model("llama-causal-lm"), task_adapter_config("llama-causal-lm"))
    circtune.save_adapter(other, tmp_path / "llama.safetensors")
    two_labels = task_model(name)
    two_labels.classifier.out_proj = nn.Linear(64, 2)
    circtune.save_adapter(circtune.apply_adapter(two_labels, task_adapter_config(name)), tmp_path / "2.safetensors")
    wrong_head = circtune.apply_adapter(task_model("bert-token-cls"), task_adapter_config("bert-token-cls"))
    circtune.save_adapter(wrong_head, tmp_path / "bert.safetensors")

    model = task_model(name)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layers\['model.layers.0.self_attn.q_proj'\]: RobertaForSequence"
                                         r"Classification has no module of that name \(nor 5 more of the config's "
                                         r"layers; prefixes tried: ''\)"):
        circtune.load_adapter(model, tmp_path / "llama.safetensors")
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"out_proj.weight: file has shape \[2, 64\], model expects \[3, 64\]"):
        circtune.load_adapter(model, tmp_path / "2.safetensors")  # fails after the layers were built
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="do not fit"):  # another model's body with the same layer names
        circtune.load_adapter(model, tmp_path / "bert.safetensors")
    _assert_unchanged(model, before)
    with pytest.raises(AdapterConfigError, match=r"modules_to_save\['classifer'\]: RobertaForSequenceClassification "
                                                 "has no module of that name"):
        circtune.apply_adapter(model, task_adapter_config(name), modules_to_save=["classifer"])
    _assert_unchanged(model, before)
    with pytest.raises(AdapterConfigError, match="overlaps the adapter layer 'roberta.encoder.layer.0"):
        circtune.apply_adapter(model, task_adapter_config(name), modules_to_save=["roberta.encoder"])
    _assert_unchanged(model, before)

    circtune.load_adapter(model, tmp_path / "good.safetensors")
    assert torch.equal(_logits(model), _logits(good))

    # Into a model that has its adapters already: the values stay as they were too.
    config = task_adapter_config(name)
    config["layers"]["encoder.layer.0.attention.self.query"]["block_size"] = 8
    adapted = circtune.apply_adapter(task_model(name), config)
    flags, state = {n: p.requires_grad for n, p in adapted.named_parameters()}, adapted.state_dict()
    state = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match=r"query.kernel: file has shape \[4, 4, 16\], model expects \[8, 8, 8\]"):
        circtune.load_adapter(adapted, tmp_path / "good.safetensors")
    assert flags == {n: p.requires_grad for n, p in adapted.named_parameters()}
    assert all(torch.equal(v, state[k]) for k, v in adapted.state_dict().items())


def test_prefix_resolution_errors_are_one_line():
    class Two(nn.Module):  # the same base twice: the names fit under two prefixes
        def __init__(self):
            super().__init__()
            self.a, self.b = task_model("roberta-seq-cls", base=True), task_model("roberta-seq-cls", base=True)

    model = Two()
    before = _snapshot(model)
    with pytest.raises(AdapterConfigError) as e:
        circtune.apply_adapter(model, task_adapter_config("roberta-seq-cls"))
    assert str(e.value).count("\n") == 0
    assert "found under several prefixes of Two ('a.', 'b.'); apply it to the submodule you mean (e.g. model.a)" \
        in str(e.value)
    _assert_unchanged(model, before)
    circtune.apply_adapter(model.a, task_adapter_config("roberta-seq-cls"))  # the submodule itself works

    llama = task_model("llama-causal-lm")
    with pytest.raises(AdapterConfigError) as e:
        circtune.apply_adapter(llama, task_adapter_config("roberta-seq-cls"))
    assert str(e.value).count("\n") == 0 and "layers['encoder.layer.0.attention.self.query']: LlamaForCausalLM " \
        "has no module of that name (nor 5 more of the config's layers; prefixes tried: '')" in str(e.value)


def test_exporting_the_base_inside_an_adapted_task_model(tmp_path):
    name = "roberta-seq-cls"
    clf = circtune.apply_adapter(task_model(name), task_adapter_config(name))
    with pytest.raises(ValueError, match=r"is the 'roberta' of a RobertaForSequenceClassification whose adapter "
                                         r"circtune applied; export that model"):
        circtune.export_peft(clf.roberta, tmp_path / "inner")
    assert not (tmp_path / "inner").exists()
    circtune.merge_adapter(clf)  # a plain model again: its base may be adapted and exported alone
    circtune.export_peft(circtune.apply_adapter(clf.roberta, task_adapter_config(name)), tmp_path / "inner")
    # Adapted on its own, a base model exports for itself; import_peft also puts it into a task model.
    base = circtune.apply_adapter(task_model(name).roberta, task_adapter_config(name))
    _randomize(base)
    circtune.export_peft(base, tmp_path / "base")
    llama = task_model("llama-causal-lm")
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"PEFT checkpoint .* do not fit LlamaForCausalLM: layers\['encoder.layer"):
        circtune.import_peft(llama, tmp_path / "base")
    _assert_unchanged(llama, before)
    clf = circtune.import_peft(task_model(name), tmp_path / "base")
    assert clf.circtune_prefix == "roberta."
    torch.testing.assert_close(clf.roberta(input_ids=IDS).last_hidden_state, base(input_ids=IDS).last_hidden_state)


def test_check_accepts_a_task_model(tmp_path):
    from circtune.cli.check import check

    config = circtune.AdapterConfig.from_dict(task_adapter_config("roberta-seq-cls"))
    config.save(tmp_path / "adapter_config.json")
    model = circtune.apply_adapter(task_model("roberta-seq-cls"), config)
    circtune.save_adapter(model, tmp_path / "a.safetensors")
    summary = check(str(tmp_path), "tiny_models:roberta_classifier", str(tmp_path / "a.safetensors"))
    assert [r["name"] for r in summary["layers"]] == list(config.layers)
    assert summary["trainable_params"] == _adapter_params(task_adapter_config("roberta-seq-cls"), "roberta-seq-cls")
    assert summary["weights"]["loaded"]
    config.layers["encoder.layer.1.attention.self.query"] = circtune.LayerConfig("c3a", 8)
    config.save(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match=r"layers\['encoder.layer.1.attention.self.query'\].block_size: the weights "
                                         "were saved with 4, the config says 8"):
        check(str(tmp_path), "tiny_models:roberta_classifier", str(tmp_path / "a.safetensors"))


def test_a_chosen_head_of_a_causal_lm_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    name = "llama-causal-lm"
    ours = circtune.apply_adapter(task_model(name), task_adapter_config(name), modules_to_save=["lm_head"])
    assert ours.lm_head.weight.requires_grad and not ours.model.embed_tokens.weight.requires_grad
    _randomize(ours)
    expected = _logits(ours)
    circtune.export_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(task_model(name), tmp_path / "peft", is_trainable=True)
    assert _trainable(theirs) == _trainable(ours) == _adapter_params(task_adapter_config(name), name) + 64 * 50
    torch.testing.assert_close(_logits(theirs.eval()), expected, atol=1e-5, rtol=1e-4)
    circtune.save_adapter(ours, tmp_path / "a.safetensors")
    assert torch.equal(_logits(circtune.load_adapter(task_model(name), tmp_path / "a.safetensors")), expected)
