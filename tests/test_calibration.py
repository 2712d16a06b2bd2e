"""Calibration: texts files, model folders, and layer gradients against an independent hook-based reference."""

import copy
import json

import pytest
import torch
from calibration_folder import make_calibration_folder
from reference import assert_close

from circtune.calibration import (
    CalibrationError,
    calibration_gradients,
    default_loss,
    layer_gradients,
    load_model_folder,
    read_texts,
)
from circtune.errors import OptionError

# Tiny tensors: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _refused(call, *needles):
    with pytest.raises(CalibrationError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, OptionError)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ---- texts files


def test_read_texts_one_per_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffthe cat\r\n\r\n   \n  a dog sat  \nlast".encode())
    assert read_texts(f) == ["the cat", "a dog sat", "last"]


def test_read_texts_refusals(tmp_path):
    missing = tmp_path / "nope.txt"
    _refused(lambda: read_texts(missing), str(missing), "does not exist", "one calibration text per line")
    _refused(lambda: read_texts(tmp_path), str(tmp_path), "is a folder")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _refused(lambda: read_texts(empty), str(empty), "holds no text")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    _refused(lambda: read_texts(blank), str(blank), "holds no text")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"abc\x00def")
    _refused(lambda: read_texts(binary), str(binary), "binary", "offset 3")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\ncaf\u00e9\n".encode("latin-1"))
    _refused(lambda: read_texts(latin), str(latin), "not UTF-8", "0xe9", "offset 14", "line 2")


# ---- model folders


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return make_calibration_folder(tmp_path_factory.mktemp("calib"))


def _copy_folder(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_folder_refusals(tmp_path, calib):
    folder, texts = calib
    _refused(lambda: load_model_folder(tmp_path / "absent"), "absent", "not a folder")
    no_config = _copy_folder(folder, tmp_path / "noconfig", skip=("config.json",))
    _refused(lambda: load_model_folder(no_config), str(no_config), "no config.json")
    no_tok = _copy_folder(folder, tmp_path / "notok", skip=("tokenizer.json", "tokenizer_config.json"))
    _refused(lambda: load_model_folder(no_tok), str(no_tok), "no tokenizer files")
    no_weights = _copy_folder(folder, tmp_path / "noweights", skip=("model.safetensors",))
    _refused(lambda: load_model_folder(no_weights), str(no_weights), "no model.safetensors", "--calibration")
    pickled = _copy_folder(folder, tmp_path / "pickled", skip=("model.safetensors",))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    _refused(lambda: load_model_folder(pickled), str(pickled), "pytorch_model.bin", "pickle", "model.safetensors")


def test_folder_with_mismatched_weights_is_refused(tmp_path, calib):
    from safetensors.torch import load_file, save_file

    folder, _ = calib
    broken = _copy_folder(folder, tmp_path / "broken", skip=("model.safetensors",))
    state = load_file(folder / "model.safetensors")
    name = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[name.replace("query", "quarry")] = state.pop(name)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    message = _refused(lambda: load_model_folder(broken), str(broken), "does not match RobertaForMaskedLM")
    assert "quarry" in message and "missing" in message


def test_load_model_folder_loads_the_saved_weights(calib):
    from safetensors.torch import load_file

    folder, _ = calib
    model, tokenizer = load_model_folder(folder, device="cpu")
    assert type(model).__name__ == "RobertaForMaskedLM"
    state = load_file(folder / "model.safetensors")
    for name, value in model.state_dict().items():
        if name in state:
            assert torch.equal(value, state[name]), name
    assert tokenizer("the cat")["input_ids"][0] == 0  # <s>
    assert tokenizer.mask_token_id == 4


# ---- layer gradients against hooks


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _tiny_roberta_mlm():
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=34, type_vocab_size=1)
    return RobertaForMaskedLM(config).eval()


def _batches(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, t in ((3, 9), (2, 6)):
        ids = torch.randint(3, vocab, (n, t), generator=gen)
        mask = torch.ones(n, t, dtype=torch.long)
        mask[0, t - 2:] = 0  # padding at the end of one row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hook_reference(model, names, batches, loss_fn):
    """Σ over batches and tokens of g xᵀ from hooks (inputs x and output gradients g saved), float64."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    acc = {n: 0.0 for n in names}
    for batch in batches:
        saved = {}

        def keep(name):
            def hook(module, args, output):
                x = args[0]
                saved[name] = [x.detach().double().reshape(-1, x.shape[-1]), None]
                output.register_hook(lambda g: saved[name].__setitem__(1, g.detach().double().reshape(-1, g.shape[-1])))
            return hook

        handles = [modules[n].register_forward_hook(keep(n)) for n in names]
        loss_fn(model, batch).backward()
        for h in handles:
            h.remove()
        for n in names:
            x, g = saved[n]
            acc[n] = acc[n] + g.T @ x
    return acc


@pytest.mark.parametrize("builder,names", [
    (_tiny_llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"]),
    (_tiny_roberta_mlm, ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.1.output.dense"]),
])
def test_layer_gradients_equal_hook_sums(builder, names):
    model = builder()
    batches = _batches(model.config.vocab_size)
    reference = _hook_reference(model, names, batches, default_loss(model))
    # a mixed requires_grad pattern and train mode must come back unchanged
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 0)
    before = [p.requires_grad for p in params]
    kept = torch.ones_like(params[1])
    params[1].grad = kept  # a caller's gradient (e.g. mid-training) comes back untouched
    model.train()
    with torch.no_grad():  # the caller's grad mode does not matter
        grads = layer_gradients(model, names, batches)
    assert [p.requires_grad for p in params] == before
    assert model.training and params[1].grad is kept and all(p.grad is None for p in params[2:])
    for n in names:
        assert grads[n].dtype == torch.float64 and grads[n].device.type == "cpu"
        assert float(grads[n].abs().max()) > 0
        assert_close(grads[n], reference[n], atol=1e-9, rtol=1e-4, what=n)


def test_layer_gradients_custom_loss_and_base_names(calib):
    """A caller's loss (the synthetic benchmark's use), and targets named on the bare model (as circtune's model
    resolution names them) found under the head model's base prefix."""
    folder, _ = calib
    model, _ = load_model_folder(folder)
    names = ["encoder.layer.0.attention.self.value", "encoder.layer.1.attention.self.query"]
    batches = _batches(model.config.vocab_size)
    batches = [{**b, "input_ids": b["input_ids"][:, :8], "attention_mask": b["attention_mask"][:, :8]}
               for b in batches]

    def loss_fn(m, batch):
        return m(**batch).logits.square().mean()

    grads = layer_gradients(model, names, batches, loss_fn)
    reference = _hook_reference(model, ["roberta." + n for n in names], batches, loss_fn)
    for n in names:
        assert_close(grads[n], reference["roberta." + n], atol=1e-10, rtol=1e-4, what=n)


def test_layer_gradients_refusals_restore_flags():
    model = _tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="no calibration batches"):
        layer_gradients(model, ["model.layers.0.self_attn.q_proj"], [])
    with pytest.raises(ValueError, match="is not in the model"):
        layer_gradients(model, ["model.layers.9.self_attn.q_proj"], _batches(40))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        layer_gradients(model, ["model.layers.0.self_attn"], _batches(40))

    def failing(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        layer_gradients(model, ["model.layers.0.self_attn.q_proj"], _batches(40), failing)
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("kind", ["sequence-classification", "bare-encoder"])
def test_default_loss_for_other_heads(kind):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3)
    model = (BertForSequenceClassification if kind == "sequence-classification" else BertModel)(config).eval()
    prefix = "bert." if kind == "sequence-classification" else ""
    name = "encoder.layer.0.attention.self.value"
    batches = _batches(40)
    grads = layer_gradients(model, [name], batches)
    reference = _hook_reference(model, [prefix + name], batches, default_loss(model))
    assert float(grads[name].abs().max()) > 0
    assert_close(grads[name], reference[prefix + name], atol=1e-10, rtol=1e-4, what=kind)


# ---- end to end from files


def test_calibration_gradients_end_to_end(calib):
    from circtune.models import resolve_model

    folder, texts = calib
    names = [t.name for t in resolve_model(str(folder)).targets]
    assert len(names) == 4
    grads, notes = calibration_gradients(folder, texts, names, batch_size=4, max_length=None, device="cpu",
                                         dtype=None, progress=False)
    assert set(grads) == set(names)
    for n in names:
        assert grads[n].shape == (64, 64) and torch.isfinite(grads[n]).all()
    assert notes[0] == "4 of 12 texts truncated to 16 tokens (the model's positions)"
    assert "RobertaForMaskedLM" in notes[1] and "masked" in notes[1]
    energy = {n: float(g.square().sum()) for n, g in grads.items()}
    # the folder scales up the second layer's attention output: its value layer gets far more gradient energy
    assert energy["encoder.layer.1.attention.self.value"] > 4 * energy["encoder.layer.0.attention.self.value"]
    again, _ = calibration_gradients(folder, texts, names, batch_size=4, max_length=8, device="cpu", dtype=None,
                                     progress=False)
    assert not torch.equal(again[names[0]], grads[names[0]])  # other tokens: another gradient
    _, notes8 = calibration_gradients(folder, texts, names[:1], batch_size=5, max_length=8, device="cpu",
                                      dtype=None, progress=False)
    assert notes8[0].endswith("truncated to 8 tokens (the requested max length)")


def test_calibration_checks_the_texts_before_the_folder(tmp_path, calib):
    folder, texts = calib
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _refused(lambda: calibration_gradients(tmp_path / "no-folder", empty, ["x"], batch_size=2, max_length=None,
                                           device="cpu", dtype=None, progress=False), str(empty), "holds no text")
    _refused(lambda: calibration_gradients(tmp_path / "no-folder", texts, ["x"], batch_size=2, max_length=None,
                                           device="cpu", dtype=None, progress=False), "no-folder", "not a folder")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["RobertaForMaskedLM"]
