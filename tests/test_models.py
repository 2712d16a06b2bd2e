import argparse
import json
import sys

import pytest
import torch

from circtune.cli import models as models_cli
from circtune.models import (
    BUILTIN_MODELS,
    ModelInfo,
    TargetLayer,
    build_model,
    builtin_names,
    find_targets,
    model_config,
    resolve_model,
)

# Published architecture numbers -> the target layers they imply (family defaults):
# encoders and ViT query/value; decoders q/k/v/o + gate/up/down.
# (name, family, hidden, layers, vocab or None, number of targets, {(d_in, d_out): count})
EXPECTED = [
    ("roberta-base", "encoder", 768, 12, 50265, 24, {(768, 768): 24}),
    ("roberta-large", "encoder", 1024, 24, 50265, 48, {(1024, 1024): 48}),
    ("bert-base-uncased", "encoder", 768, 12, 30522, 24, {(768, 768): 24}),
    ("bert-large-uncased", "encoder", 1024, 24, 30522, 48, {(1024, 1024): 48}),
    ("vit-base", "vision", 768, 12, None, 24, {(768, 768): 24}),
    ("vit-large", "vision", 1024, 24, None, 48, {(1024, 1024): 48}),
    ("llama-2-7b", "decoder", 4096, 32, 32000, 224, {(4096, 4096): 128, (4096, 11008): 64, (11008, 4096): 32}),
    ("llama-2-13b", "decoder", 5120, 40, 32000, 280, {(5120, 5120): 160, (5120, 13824): 80, (13824, 5120): 40}),
    ("llama-3-8b", "decoder", 4096, 32, 128256, 224,
     {(4096, 4096): 64, (4096, 1024): 64, (4096, 14336): 64, (14336, 4096): 32}),
    ("mistral-7b", "decoder", 4096, 32, 32000, 224,
     {(4096, 4096): 64, (4096, 1024): 64, (4096, 14336): 64, (14336, 4096): 32}),
    ("qwen2.5-7b", "decoder", 3584, 28, 152064, 196,
     {(3584, 3584): 56, (3584, 512): 56, (3584, 18944): 56, (18944, 3584): 28}),
]

REQUIRED = {"roberta-base", "roberta-large", "bert-base-uncased", "vit-base", "vit-large", "llama-2-7b", "llama-3-8b",
            "mistral-7b"}

FACTORIES = '''
from torch import nn


class Block(nn.Module):
    def __init__(self, d=32, kv=16, ff=64):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, kv)
        self.v_proj, self.o_proj = nn.Linear(d, kv), nn.Linear(d, d)
        self.up_proj, self.down_proj = nn.Linear(d, ff), nn.Linear(ff, d)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)


def tiny_decoder():
    return nn.ModuleDict({"embed": nn.Embedding(10, 32), "layers": nn.ModuleList([Block(), Block()])})


def tiny_encoder():
    return nn.ModuleList([Attention() for _ in range(3)])


def plain_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


class Factory:
    @staticmethod
    def build():
        return plain_mlp()


def not_a_module():
    return [nn.Linear(4, 4)]


def broken():
    raise RuntimeError("boom")


NOT_CALLABLE = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "circtune_test_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "circtune_test_factories"
    sys.modules.pop("circtune_test_factories", None)


def _rope_theta(config) -> float:
    # transformers 5 keeps it in rope_parameters, 4.x as an attribute
    return getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]


def test_builtins_cover_the_required_names_and_the_expectations():
    assert REQUIRED <= set(builtin_names())
    assert [e[0] for e in EXPECTED] == builtin_names()  # a new built-in needs its published numbers here


@pytest.mark.parametrize("name, family, hidden, layers, vocab, n_targets, shapes", EXPECTED,
                         ids=[e[0] for e in EXPECTED])
def test_builtin_resolves_on_meta_with_published_shapes(name, family, hidden, layers, vocab, n_targets, shapes):
    config = model_config(name)
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    model = build_model(name)
    assert type(model).__name__.endswith("Model")  # the base model, no task head
    assert all(p.is_meta for p in model.parameters())
    if vocab is not None:
        assert tuple(model.get_input_embeddings().weight.shape) == (vocab, hidden)

    info = resolve_model(name)
    assert (info.spec, info.name, info.family) == (name, name, family)
    assert len(info.targets) == n_targets
    assert info.shapes == shapes
    assert list(info.shapes) == list(shapes)  # first-seen order
    # every target is an actual nn.Linear of that shape, in module order
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert [t.name for t in info.targets] == [n for n in linears if n in {t.name for t in info.targets}]
    for t in info.targets:
        assert (linears[t.name].in_features, linears[t.name].out_features) == t.shape


def test_llama_3_8b_projections():
    info = resolve_model("llama-3-8b")
    by_suffix = {}
    for t in info.targets:
        by_suffix.setdefault(t.name.rsplit(".", 1)[-1], set()).add(t.shape)
    assert by_suffix == {"q_proj": {(4096, 4096)}, "o_proj": {(4096, 4096)}, "k_proj": {(4096, 1024)},
                         "v_proj": {(4096, 1024)}, "gate_proj": {(4096, 14336)}, "up_proj": {(4096, 14336)},
                         "down_proj": {(14336, 4096)}}
    assert info.target_names == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert [t.name for t in info.targets[:7]] == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
        "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    config = model_config("llama-3-8b")
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert _rope_theta(config) == 500000


def test_llama_2_7b_has_full_kv_heads():
    shapes = {t.name.rsplit(".", 1)[-1]: t.shape for t in resolve_model("llama-2-7b").targets}
    assert shapes["k_proj"] == shapes["v_proj"] == (4096, 4096)
    assert shapes["gate_proj"] == (4096, 11008) and shapes["down_proj"] == (11008, 4096)


def test_roberta_base_numbers_and_names():
    config = model_config("roberta-base")
    assert (config.vocab_size, config.max_position_embeddings, config.type_vocab_size) == (50265, 514, 1)
    info = resolve_model("roberta-base")
    assert info.targets[:2] == (TargetLayer("encoder.layer.0.attention.self.query", 768, 768),
                                TargetLayer("encoder.layer.0.attention.self.value", 768, 768))


def test_aliases_and_case_resolve_to_the_builtin():
    assert resolve_model("FacebookAI/roberta-large").name == "roberta-large"
    assert resolve_model("Llama-3-8B").name == "llama-3-8b"


def test_to_dict_is_json():
    info = resolve_model("llama-3-8b", ["k_proj"])
    d = json.loads(json.dumps(info.to_dict()))
    assert d["target_names"] == ["k_proj"] and len(d["targets"]) == 32
    assert d["targets"][0] == {"name": "layers.0.self_attn.k_proj", "d_in": 4096, "d_out": 1024}
    assert d["shapes"] == [{"d_in": 4096, "d_out": 1024, "count": 32}]


# --- targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets, n, first", [
    (["query", "key", "value"], 36, "encoder.layer.0.attention.self.query"),
    (["attention.self.key"], 12, "encoder.layer.0.attention.self.key"),
    (["encoder.layer.3.attention.self.query"], 1, "encoder.layer.3.attention.self.query"),
    (["value", "query", "value"], 24, "encoder.layer.0.attention.self.query"),
    (["dense"], 37, "encoder.layer.0.attention.output.dense"),  # 3 per layer + the pooler
])
def test_targets_override(targets, n, first):
    info = resolve_model("roberta-base", targets)
    assert info.target_names == tuple(dict.fromkeys(targets))
    assert len(info.targets) == n and info.targets[0].name == first


def test_target_matching_agrees_with_peft():
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    model = build_model("roberta-base")
    for targets in (["query", "value"], ["self.key"], ["dense"], ["output.dense"]):
        _, layers = find_targets(model, targets, "encoder")
        config = peft.LoraConfig(target_modules=targets)
        expected = [n for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and check_target_module_exists(config, n)]
        assert [t.name for t in layers] == expected


def test_target_typo_suggests_and_lists_linear_names():
    with pytest.raises(ValueError) as e:
        resolve_model("roberta-base", ["qurey"])
    msg = str(e.value)
    assert "'qurey'" in msg and "did you mean 'query'" in msg
    assert "dense, key, query, value" in msg


def test_target_on_non_linear_module_says_so():
    with pytest.raises(ValueError, match=r"'attention' matches only modules that are not nn.Linear \(RobertaAttention"):
        resolve_model("roberta-base", ["attention"])


def test_no_targets_is_an_error():
    with pytest.raises(ValueError, match="no target modules given"):
        resolve_model("roberta-base", [])
    with pytest.raises(ValueError, match="no target modules given"):
        resolve_model("roberta-base", [" ", ""])


# --- local config folders --------------------------------------------------------------------------


def test_config_folder_roberta(tmp_path):
    from transformers import RobertaConfig

    folder = tmp_path / "tiny-roberta"
    RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=66).save_pretrained(folder)
    info = resolve_model(str(folder))
    assert (info.name, info.family, info.target_names) == ("tiny-roberta", "encoder", ("query", "value"))
    assert len(info.targets) == 6 and info.shapes == {(64, 64): 6}
    assert type(model_config(str(folder))).__name__ == "RobertaConfig"


def test_config_folder_handwritten_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100, "architectures": ["LlamaForCausalLM"]}))
    info = resolve_model(str(tmp_path), ["k_proj", "down_proj"])
    assert info.family == "decoder" and info.name == tmp_path.name
    assert info.shapes == {(64, 32): 2, (96, 64): 2}
    assert all(p.is_meta for p in build_model(str(tmp_path)).parameters())


def test_config_folder_of_unlisted_family_infers_targets(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64}))
    info = resolve_model(str(tmp_path))
    assert info.family == "custom" and info.target_names == ("q_proj", "k_proj", "v_proj")
    assert len(info.targets) == 6


@pytest.mark.parametrize("content, message", [
    (None, "holds no config.json"),
    ("{not json", "cannot read"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"hidden_size": 8}', "has no 'model_type'"),
    ('{"model_type": ["llama"]}', "has no 'model_type' string"),
    ('{"model_type": "no-such-arch"}', "model_type 'no-such-arch' is not known to transformers"),
    ('{"model_type": "lama"}', "'lama' is not known to transformers .*did you mean 'llama'"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}', "invalid config in .*config.json"),
])
def test_config_folder_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


# --- module:callable -------------------------------------------------------------------------------


def test_callable_decoder_style(factories):
    spec = f"{factories}:tiny_decoder"
    info = resolve_model(spec)
    assert (info.spec, info.name, info.family) == (spec, "tiny_decoder", "custom")
    assert info.target_names == ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # no gate_proj
    assert info.shapes == {(32, 32): 4, (32, 16): 4, (32, 64): 2, (64, 32): 2}
    assert info.targets[0].name == "layers.0.q_proj"
    assert model_config(spec) is None
    assert all(p.is_meta for p in build_model(spec).parameters())  # built under the device context


def test_callable_encoder_style_and_override(factories):
    info = resolve_model(f"{factories}:tiny_encoder")
    assert info.target_names == ("query", "value") and len(info.targets) == 6
    assert len(resolve_model(f"{factories}:tiny_encoder", ["key"]).targets) == 3


def test_callable_on_cpu_with_dtype(factories):
    model = build_model(f"{factories}:tiny_decoder", device="cpu", dtype=torch.float64)
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in model.parameters())


def test_builtin_dtype():
    model = build_model("roberta-base", dtype=torch.bfloat16)
    assert model.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


def test_callable_without_known_names_needs_targets(factories):
    with pytest.raises(ValueError, match="no default target modules.*pass --targets") as e:
        resolve_model(f"{factories}:plain_mlp")
    assert "nn.Linear names found: 0, 2" in str(e.value)
    assert len(resolve_model(f"{factories}:Factory.build", ["0", "2"]).targets) == 2


@pytest.mark.parametrize("attr, message", [
    ("missing", "has no attribute 'missing'"),
    ("NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
    ("not_a_module", "returned a list, not a torch.nn.Module"),
    ("broken", "calling it failed: RuntimeError: boom"),
])
def test_callable_errors(factories, attr, message):
    spec = f"{factories}:{attr}"
    with pytest.raises(ValueError, match=message) as e:
        resolve_model(spec)
    assert repr(spec) in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("circtune_no_such_module:make", "cannot import module 'circtune_no_such_module'"),
    ("circtune.models:", "must look like package.module:callable"),
])
def test_callable_import_errors(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        resolve_model(spec)
    assert repr(spec) in str(e.value)


# --- unknown names ---------------------------------------------------------------------------------


def test_unknown_name_lists_builtins_and_suggests():
    with pytest.raises(ValueError) as e:
        resolve_model("robreta-large")
    msg = str(e.value)
    assert msg.startswith("unknown model 'robreta-large' (did you mean 'roberta-large'?); built-in models: ")
    assert all(name in msg for name in builtin_names())
    assert "folder with config.json" in msg and "module:callable" in msg


def test_unknown_hub_id_is_not_downloaded(tmp_path):
    with pytest.raises(ValueError, match="no such folder here; circtune never downloads"):
        resolve_model(str(tmp_path / "missing"))


def test_a_hub_id_says_hub_models_need_a_local_folder_not_another_model():
    """microsoft/deberta-v3-base used to get "did you mean 'roberta-base'": another model entirely."""
    with pytest.raises(ValueError) as e:
        resolve_model("microsoft/deberta-v3-base")
    msg = str(e.value)
    assert msg.startswith("model 'microsoft/deberta-v3-base' is not a built-in name, and there is no such folder here "
                          "(circtune never downloads: a hub model needs a local folder holding its config.json")
    assert "did you mean" not in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"\(did you mean 'roberta-large'\? otherwise: circtune never downloads"):
        resolve_model("FacebookAI/roberta-larg")  # nearly a built-in's own hub id


def test_an_unknown_model_type_is_one_short_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(ValueError) as e:
        resolve_model(str(tmp_path))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300, str(e.value)  # transformers' list is ~12,000 chars


# --- CLI -------------------------------------------------------------------------------------------


def _run(argv, capsys):
    p = argparse.ArgumentParser()
    models_cli.add_arguments(p)
    assert models_cli.run(p.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_cli_lists_builtins(capsys):
    out = _run([], capsys)
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(BUILTIN_MODELS) <= set(lines)
    assert lines["llama-3-8b"].split()[1:4] == ["decoder", "4096", "32"]
    assert "224" in lines["llama-3-8b"].split() and "4096x1024" in lines["llama-3-8b"]


def test_cli_lists_builtins_json(capsys):
    rows = json.loads(_run(["--json"], capsys))
    assert [r["name"] for r in rows] == builtin_names()
    assert rows[1]["hidden_size"] == 1024 and len(rows[1]["targets"]) == 48


def test_cli_shows_one_model_compactly(capsys):
    out = _run(["roberta-large"], capsys)
    assert "roberta-large (encoder): 48 target layers matching query, value" in out
    assert any(line.split() == ["encoder.layer.{0..23}.attention.self.query", "24", "1024x1024"]
               for line in out.splitlines())
    assert any(line.split() == ["1024x1024", "48"] for line in out.splitlines())


def test_cli_targets_comma_and_repeated(capsys):
    out = _run(["llama-3-8b", "--targets", "q_proj, k_proj", "--targets", "down_proj", "--json"], capsys)
    d = json.loads(out)
    assert d == resolve_model("llama-3-8b", ["q_proj", "k_proj", "down_proj"]).to_dict()
    assert d["target_names"] == ["q_proj", "k_proj", "down_proj"] and len(d["targets"]) == 96


def test_cli_usage_errors():
    from circtune.errors import UsageError

    p = argparse.ArgumentParser()
    models_cli.add_arguments(p)
    with pytest.raises(UsageError, match="--targets needs a MODEL"):
        models_cli.run(p.parse_args(["--targets", "query"]))
    with pytest.raises(UsageError, match="--targets is empty"):
        models_cli.run(p.parse_args(["roberta-base", "--targets", ","]))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models_cli.run(p.parse_args(["nope"]))


def test_group_layers_folds_only_full_grids():
    info = ModelInfo("x", "x", "custom", ("w",), tuple(
        TargetLayer(n, 8, 8) for n in ["b.0.e.0.w", "b.0.e.1.w", "b.1.e.0.w", "b.1.e.1.w", "c.0.w", "c.2.w",
                                       "c.3.w", "d.0.w", "d.1.w"]))
    rows = models_cli.group_layers(info.targets)
    assert rows == [("b.{0..1}.e.{0..1}.w", 4, (8, 8)), ("c.{0,2..3}.w", 3, (8, 8)), ("d.{0..1}.w", 2, (8, 8))]
    ragged = (TargetLayer("b.0.e.0.w", 8, 8), TargetLayer("b.1.e.1.w", 8, 8))
    assert [r[0] for r in models_cli.group_layers(ragged)] == ["b.0.e.0.w", "b.1.e.1.w"]


def test_cli_errors_through_main(monkeypatch, capsys):
    from circtune.cli import main as cli_main

    monkeypatch.setattr(cli_main, "SUBCOMMANDS", (models_cli,))  # registration itself is main.py's business
    assert cli_main.main(["models", "roberta-base", "--targets", "qurey"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("circtune models: error: model 'roberta-base': target 'qurey' matches no nn.Linear module; "
                      "did you mean 'query'?")
    assert err[1] == "nn.Linear names found: dense, key, query, value"
    assert cli_main.main(["models", "bert-base-uncased"]) == 0
    assert "encoder.layer.{0..11}.attention.self.value" in capsys.readouterr().out
