"""Hostile and mistaken input: one-line error, exit status 2, the offending value named, nothing stored touched.

One module fixture holds a finished ``circtune profile`` run (``out/``), a finished ``circtune search`` run
(``search/``) and a folder of hostile input files (``in/``: adapter configs, safetensors files, search spaces).
Every case of the tables runs the CLI against them and checks the exit status, that the message is on the error
line, that no traceback is printed, and that every file and every row of both stores is unchanged.
"""

import json
import re
import shutil
import sqlite3

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import circtune
from circtune.adapters.inject import adapter_layers
from circtune.cli.main import main
from circtune.measure.store import MeasurementStore

MODEL = ["--model", "tiny_models:two_shapes", "--targets", "up,square"]
TIMING = ["--tokens", "8", "--warmup", "0", "--min-reps", "2", "--max-reps", "2", "--min-time", "0", "--no-peft",
          "--quiet"]
PROFILE = [*MODEL, *TIMING]  # the finished profile run, minus --space and --out
OTHER_MODEL = ["--model", "tiny_models:TwoShapes", "--targets", "up,square"]  # the same layers, another spec
SEARCH = ["--budget", "900", "--trials", "4", "--no-validate", "--plotlyjs", "cdn"]  # 832 parameters fit 810..900
SPACE = 'methods = ["c3a"]\nblock_sizes = [16]\ntransforms = ["rfft"]\nbackends = ["torch"]\n'
RUN_PROFILE = [*PROFILE, "--space", "{run}/space.toml"]  # the finished runs' own options

# The config every hostile adapter file is a variation of: tiny_models.TwoShapes has blocks.{0,1}.up (48 -> 96)
# and square (64 -> 64).
GOOD = {"format": circtune.FORMAT, "base_model": "two_shapes",
        "layers": {"blocks.0.up": {"method": "c3a", "block_size": 16},
                   "square": {"method": "cdvft", "block_size": 32, "factors": 3, "alpha": 2.0}}}


def _config(**layers):
    """GOOD with some layers replaced (a value of None drops the layer)."""
    merged = {**GOOD["layers"], **layers}
    return {**GOOD, "layers": {k: v for k, v in merged.items() if v is not None}}


CONFIGS = {  # in/<name>.json
    "good": GOOD,
    "format": {**GOOD, "format": "circtune.adapter/9"},
    "no_format": {k: v for k, v in GOOD.items() if k != "format"},
    "method": _config(square={"method": "lora", "block_size": 32}),
    "indivisible": _config(square={"method": "c3a", "block_size": 48}),
    "zero_block": _config(square={"method": "c3a", "block_size": 0}),
    "negative_block": _config(square={"method": "c3a", "block_size": -16}),
    "float_block": _config(square={"method": "c3a", "block_size": 16.0}),
    "missing_layer": _config(**{"blocks.0.upp": {"method": "c3a", "block_size": 16}}),
    "not_linear": _config(**{"blocks.0": {"method": "c3a", "block_size": 16}}),
    "backend": _config(square={"method": "c3a", "block_size": 16, "backend": "cuda_magic"}),
    "transform": _config(square={"method": "c3a", "block_size": 16, "transform": "dct"}),
    "unknown_key": _config(square={"method": "c3a", "block_size": 16, "colour": "red"}),
    "c3a_factors": _config(square={"method": "c3a", "block_size": 16, "factors": 3}),
    "cdvft_factors": _config(square={"method": "cdvft", "block_size": 16, "factors": 1}),
    "layer_not_object": _config(square="c3a"),
    "no_layers": {**GOOD, "layers": {}},
    "base_model": {**GOOD, "base_model": ["two_shapes"]},
    "not_object": [GOOD],
    "long_value": _config(square={"method": "x" * 5000, "block_size": 16}),
    "unknown_model": {**GOOD, "base_model": "my-own-model"},
}
RAW_CONFIGS = {  # in/<name>.json, written as bytes
    "empty": b"",
    "blank": b"  \n",
    "malformed": b'{"format": "circtune.adapter/1", "layers": {',
    "binary": b"\xff\xfe\x00{}",
    "nested": b"[" * 100_000 + b"]" * 100_000,
}
SPACES = {  # in/space_<name>.toml
    "unknown_key": 'method = ["c3a"]\n',
    "methods_type": "methods = 3\n",
    "methods_empty": "methods = []\n",
    "methods_table": "[methods]\nc3a = true\n",
    "zero_block": "block_sizes = [0, 16]\n",
    "negative_min": "block_sizes = { min = -4, max = 64 }\n",
    "float_block": "block_sizes = [16.5]\n",
    "bool_block": "block_sizes = [true]\n",
    "string_block": 'block_sizes = "16"\n',
    "min_over_max": "block_sizes = { min = 64, max = 16 }\n",
    "range_key": "block_sizes = { min = 16, maximum = 64 }\n",
    "method": 'methods = ["lora"]\n',
    "backend": 'backends = ["cuda_magic"]\n',
    "transform": 'transforms = ["dct"]\n',
    "dtype": 'dtypes = ["int8"]\n',
    "dtype_table": "dtypes = [{ name = 'fp32' }]\n",
    "dtype_nested": 'dtypes = [["fp32"]]\n',
    "factors": "factors = [1]\n",
    "description": "description = 5\n",
    "malformed": 'methods = ["c3a"\n',
}


def _write_inputs(folder):
    """Hostile adapter configs, safetensors files and search spaces, and one good config with its weights."""
    folder.mkdir()
    for name, data in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    for name, data in RAW_CONFIGS.items():
        (folder / f"{name}.json").write_bytes(data)
    for name, text in SPACES.items():
        (folder / f"space_{name}.toml").write_text(text)
    (folder / "space_binary.toml").write_bytes(b"\xff\xfe\x00methods")
    (folder / "space_misfit.toml").write_text("block_sizes = [7, 5]\n")  # divides neither 48x96 nor 64x64
    (folder / "space_half.toml").write_text("methods = ['c3a']\nblock_sizes = [32]\n")  # 64x64 only
    (folder / "unknown_type").mkdir()
    (folder / "unknown_type" / "config.json").write_text('{"model_type": "no-such-arch"}')
    from tiny_models import tiny_roberta

    tiny_roberta(folder / "tiny_roberta")  # 40 positions: sequences of up to 38 tokens
    (folder / "space_folder.toml").mkdir()
    (folder / "not_a_config").mkdir()

    from tiny_models import two_shapes

    def save(config, name):
        model = circtune.apply_adapter(two_shapes(), config)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                for _, p in layer.adapter_named_parameters():
                    p.normal_()
        circtune.save_adapter(model, folder / name)

    save(GOOD, "good.safetensors")
    save(_config(square={**GOOD["layers"]["square"], "block_size": 16}), "other_block_size.safetensors")
    save(_config(square={**GOOD["layers"]["square"], "alpha": 1.0}), "other_alpha.safetensors")
    save(_config(square={"method": "c3a", "block_size": 32}), "other_method.safetensors")
    save(_config(square=None), "fewer_layers.safetensors")
    good = load_file(folder / "good.safetensors")
    with safe_open(folder / "good.safetensors", framework="pt") as f:
        metadata = f.metadata()
    save_file({**good, "blocks.0.up.kernel": torch.zeros(6, 3, 8)}, folder / "wrong_shape.safetensors", metadata)
    save_file({k: v for k, v in good.items() if k != "square.circulants.1"}, folder / "missing_tensor.safetensors",
              metadata)
    save_file({**good, "blocks.1.up.kernel": torch.zeros(6, 3, 16)}, folder / "extra_tensor.safetensors", metadata)
    save_file({**good, "square.diagonals.0": torch.full((64,), float("nan"))}, folder / "nan.safetensors", metadata)
    save_file(good, folder / "no_metadata.safetensors")
    save_file(good, folder / "config_not_json.safetensors", {**metadata, "config": "{nope"})
    save_file(good, folder / "config_not_object.safetensors", {**metadata, "config": "[1, 2]"})
    save_file(good, folder / "config_bad_format.safetensors",
              {**metadata, "config": json.dumps({**GOOD, "format": "circtune.adapter/0"})})
    whole = (folder / "good.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[:-40])
    (folder / "junk.safetensors").write_bytes(b"\x00not a safetensors file")
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "huge_header.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b"{}")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished profile run (out/), a finished search run (search/) and the hostile inputs (in/)."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "space.toml").write_text(SPACE)
    space = ["--space", str(folder / "space.toml")]
    assert main(["profile", *PROFILE, *space, "--out", str(folder / "out")]) == 0
    assert main(["search", *PROFILE, *space, *SEARCH, "--out", str(folder / "search")]) == 0
    _write_inputs(folder / "in")
    return folder


def _snapshot(folder):
    """Every file's bytes (SQLite files aside) and every row of every table of every SQLite store."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and ".db" not in p.name}
    stores = {}
    for db in sorted(folder.rglob("circtune.db")):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            stores[str(db.relative_to(folder))] = list(con.iterdump())
        con.close()
    assert stores and all(stores.values())
    return files, stores


def _run(argv, capsys):
    """(exit status, stderr) of the CLI; argparse's own usage errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _error_line(err, command):
    lines = [line for line in err.splitlines() if line.startswith(f"circtune {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


CHECK = ["check", "--model", "tiny_models:two_shapes"]
GOOD_CONFIG = "{in}/good.json"

CASES = [
    # budgets and search options
    (["search", "--budget", "0"], "budget must be at least 1 parameter, got '0'"),
    (["search", "--budget", "-5"], "budget '-5' is not a number of parameters; accepted: 100k, 1.5M, 250000"),
    (["search", "--budget", "abc"], "budget 'abc' is not a number of parameters"),
    (["search", "--budget", "1e999"], "budget '1e999' is too large"),
    (["search", "--budget", "100kk"], "budget '100kk' is not a number of parameters"),
    (["search", "--budget", "1.2345k"], "is not a whole number of parameters"),
    (["search", "--budget", "10", "--min-fill", "1.5"], "--min-fill must be within [0, 1], got 1.5"),
    (["search", "--budget", "10", "--trials", "0"], "--trials must be at least 1, got 0"),
    (["search", "--budget", "10", "--top", "0"], "--top must be at least 1, got 0"),
    (["search", "--budget", "10", "--objective", "speed"], "argument --objective: invalid choice: 'speed'"),
    # models and targets
    (["profile", "--model", "robreta-large"], "unknown model 'robreta-large'"),
    (["profile", "--model", "no_such_module:factory"], "cannot import module 'no_such_module'"),
    (["profile", "--model", "{in}/not_a_config"], "holds no config.json"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "qurey"], "qurey"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", ","], "no target modules given"),
    # profile settings
    (["profile", *MODEL, "--space", "nope"], "search space nope: no such file"),
    (["profile", *MODEL, "--space", "{missing}/"], "missing/: no such file"),
    (["profile", *MODEL, "--tokens", "-3"], "--tokens must be positive, got -3"),
    (["profile", *MODEL, "--tokens", "0"], "--tokens must be positive, got 0"),
    (["profile", *MODEL, "--batch-size", "4"], "--batch-size and --seq-len go together"),
    (["profile", *MODEL, "--batch-size", "4", "--seq-len", "0"], "--seq-len must be positive, got 0"),
    (["profile", *MODEL, "--tokens", "8", "--batch-size", "4"], "argument --batch-size: not allowed with argument"),
    (["profile", *MODEL, "--min-reps", "5", "--max-reps", "2"], "--min-reps 5 is larger than --max-reps 2"),
    (["profile", *MODEL, "--warmup", "-1"], "--warmup must be zero or more, got -1"),
    (["profile", *MODEL, "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["profile", *MODEL, "--lora-ranks", "0"], "LoRA rank 0 is not a positive integer; accepted: ranks >= 1"),
    (["profile", *MODEL, "--lora-ranks=-2"], "LoRA rank -2 is not a positive integer"),
    (["profile", *MODEL, "--lora-ranks", "four"], "argument --lora-ranks: invalid int value: 'four'"),
    (["profile", *MODEL, "--threads", "0"], "--threads must be positive, got 0"),
    (["profile", *MODEL, "--device", "cuda:9"], "cuda:9"),
    (["profile", *MODEL, "--device", "tpu"], "device 'tpu' is not a device torch knows"),
    # search-space files
    (["profile", *MODEL, "--space", "{in}/space_unknown_key.toml"],
     "space_unknown_key.toml: method: unknown key (did you mean 'methods'?); accepted keys: description, methods"),
    (["profile", *MODEL, "--space", "{in}/space_methods_type.toml"],
     "methods: expected a non-empty list of strings, got 3; accepted: c3a, cdvft"),
    (["profile", *MODEL, "--space", "{in}/space_methods_empty.toml"], "methods: expected a non-empty list"),
    (["profile", *MODEL, "--space", "{in}/space_methods_table.toml"], "methods: expected a non-empty list"),
    (["profile", *MODEL, "--space", "{in}/space_zero_block.toml"], "block_sizes: expected an integer >= 1, got 0"),
    (["profile", *MODEL, "--space", "{in}/space_negative_min.toml"],
     "block_sizes.min: expected an integer >= 1, got -4"),
    (["profile", *MODEL, "--space", "{in}/space_float_block.toml"], "block_sizes: expected an integer >= 1, got 16.5"),
    (["profile", *MODEL, "--space", "{in}/space_bool_block.toml"], "block_sizes: expected an integer >= 1, got True"),
    (["profile", *MODEL, "--space", "{in}/space_string_block.toml"],
     "block_sizes: expected a table { min = .., max = .. } or a list of integers, got '16'"),
    (["profile", *MODEL, "--space", "{in}/space_min_over_max.toml"], "block_sizes: min=64 is larger than max=16"),
    (["profile", *MODEL, "--space", "{in}/space_range_key.toml"],
     "block_sizes.maximum: unknown key; accepted keys: min, max"),
    (["profile", *MODEL, "--space", "{in}/space_method.toml"], "methods: 'lora' is not accepted; accepted: c3a, cdvft"),
    (["profile", *MODEL, "--space", "{in}/space_backend.toml"],
     "backends: 'cuda_magic' is not accepted; accepted: torch, dense, triton"),
    (["profile", *MODEL, "--space", "{in}/space_transform.toml"], "transforms: 'dct' is not accepted; accepted: rfft"),
    (["profile", *MODEL, "--space", "{in}/space_dtype.toml"],
     "dtypes: 'int8' is not accepted; accepted: auto, fp32, bf16, fp16"),
    (["profile", *MODEL, "--space", "{in}/space_dtype_table.toml"], "dtypes: {'name': 'fp32'} is not accepted"),
    (["profile", *MODEL, "--space", "{in}/space_dtype_nested.toml"], "dtypes: ['fp32'] is not accepted"),
    (["profile", *MODEL, "--space", "{in}/space_factors.toml"], "factors: expected an integer >= 2, got 1"),
    (["profile", *MODEL, "--space", "{in}/space_description.toml"], "description: expected a string, got 5"),
    (["profile", *MODEL, "--space", "{in}/space_malformed.toml"], "space_malformed.toml: not valid TOML"),
    (["profile", *MODEL, "--space", "{in}/space_binary.toml"], "space_binary.toml: not a UTF-8 text file"),
    (["profile", *MODEL, "--space", "{in}/space_folder.toml"], "space_folder.toml: a folder, not a file"),
    # measurement stores: unknown, unreachable, in a missing folder, read-only
    (["profile", *RUN_PROFILE, "--store", "nosuchdb://x"], "cannot open the measurement store nosuchdb://x"),
    (["profile", *RUN_PROFILE, "--store", "postgresql://admin:hunter2@127.0.0.1:1/db"],
     "postgresql://admin:***@127.0.0.1:1/db"),
    (["profile", *RUN_PROFILE, "--store", "sqlite:///{missing}/store.db"], "missing does not exist"),
    (["search", *SEARCH, *RUN_PROFILE, "--store", "sqlite:///{missing}/store.db", "--out", "{missing}/search"],
     "missing does not exist"),
    # Read-only: the tests run as root, and root writes through chmod 444 (file) and 555 (folder), so a mode bit
    # would prove nothing. SQLite's own read-only open (a URI with mode=ro) refuses every write, root or not: the
    # finished run's own store, opened read-only, must be refused before anything is measured.
    (["profile", *PROFILE, "--space", "{run}/space.toml", "--store", "sqlite:///file:{out}/circtune.db?mode=ro&uri=true"],
     "the measurement store sqlite:///file:{out}/circtune.db?mode=ro&uri=true is read-only (attempt to write a "
     "readonly database)"),
    (["search", *SEARCH, *RUN_PROFILE, "--store", "sqlite:///file:{search}/circtune.db?mode=ro&uri=true",
      "--out", "{search}"], "is read-only"),
    # output folders: another model's run, another budget's
    (["profile", *OTHER_MODEL, *TIMING, "--out", "{search}"],
     "holds a run of another model 'tiny_models:two_shapes' (this run: 'tiny_models:TwoShapes')"),
    (["search", *SEARCH, *OTHER_MODEL, *TIMING, "--space", "{run}/space.toml", "--out", "{out}"],
     "holds a run of another model 'tiny_models:two_shapes' (this run: 'tiny_models:TwoShapes')"),
    (["search", *SEARCH[2:], "--budget", "880", *RUN_PROFILE, "--out", "{search}"],
     "holds a run of another budget 900 (this run: 880)"),
    # report and compare folders
    (["report", "{missing}"], "missing: not a folder (expected the output folder of 'circtune search')"),
    (["report", "{out}"], "missing adapter_config.json"),
    (["compare", "{out}"], "compare needs at least two folders, got 1"),
    (["compare", "{search}", "{out}"], "missing adapter_config.json"),
    # adapter configs (circtune check)
    (["check", "{missing}"], "missing: no such file or folder"),
    (["check", "{out}"], "folder holds no adapter_config.json"),
    (["check", "{search}"], "the config names the model 'tiny_models:two_shapes', a module:callable; circtune check "
                            "imports code only when the command line names it: pass --model tiny_models:two_shapes"),
    (["check", "{in}/unknown_model.json"], "cannot tell which model the config is for (base_model 'my-own-model'"),
    (["check", GOOD_CONFIG, "--model", "robreta-large"], "unknown model 'robreta-large'"),
    ([*CHECK, "{in}/format.json"], "format: 'circtune.adapter/9' is not supported; accepted: 'circtune.adapter/1'"),
    ([*CHECK, "{in}/no_format.json"], "format: None is not supported; accepted: 'circtune.adapter/1'"),
    ([*CHECK, "{in}/method.json"], "layers['square'].method: 'lora' is not a method; accepted: c3a, cdvft"),
    ([*CHECK, "{in}/indivisible.json"],
     "layers['square']: block_size=48 does not divide the layer's shape (d_in=64, d_out=64); valid block sizes: 1, "
     "2, 4, 8, 16, 32, 64"),
    ([*CHECK, "{in}/zero_block.json"], "layers['square'].block_size: 0 is not a positive integer"),
    ([*CHECK, "{in}/negative_block.json"], "layers['square'].block_size: -16 is not a positive integer"),
    ([*CHECK, "{in}/float_block.json"], "layers['square'].block_size: 16.0 is not a positive integer"),
    ([*CHECK, "{in}/missing_layer.json"],
     "layers['blocks.0.upp']: TwoShapes has no module of that name; did you mean 'blocks.0.up'"),
    ([*CHECK, "{in}/not_linear.json"], "layers['blocks.0']: is a ModuleDict, not an nn.Linear"),
    ([*CHECK, "{in}/backend.json"], "layers['square'].backend: 'cuda_magic' is not a backend here; accepted: torch"),
    ([*CHECK, "{in}/transform.json"], "layers['square'].transform: 'dct' is not a transform; accepted: rfft, fft, dft"),
    ([*CHECK, "{in}/unknown_key.json"], "layers['square'].colour: unknown key; accepted: method, block_size"),
    ([*CHECK, "{in}/c3a_factors.json"], "layers['square'].factors: 3 is not valid for c3a"),
    ([*CHECK, "{in}/cdvft_factors.json"], "layers['square'].factors: 1 is not valid for cdvft; accepted: an integer"),
    ([*CHECK, "{in}/layer_not_object.json"], "layers['square']: expected an object with keys method, block_size"),
    ([*CHECK, "{in}/no_layers.json"], "layers: expected a non-empty object of module name -> adapter, got {}"),
    ([*CHECK, "{in}/base_model.json"], "base_model: expected a non-empty string, got ['two_shapes']"),
    ([*CHECK, "{in}/not_object.json"], "top level: expected a JSON object, got list"),
    ([*CHECK, "{in}/long_value.json"], "layers['square'].method: 'xxxxxxxxxx"),
    ([*CHECK, "{in}/empty.json"], "empty.json: the file is empty; expected a JSON object like {\"format\": "),
    ([*CHECK, "{in}/blank.json"], "blank.json: the file is empty"),
    ([*CHECK, "{in}/malformed.json"], "malformed.json: not valid JSON: Expecting"),
    ([*CHECK, "{in}/binary.json"], "binary.json: not a UTF-8 text file"),
    ([*CHECK, "{in}/nested.json"], "nested.json: not usable JSON: nested too deeply"),
    # adapter weights (circtune check --weights)
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/nope.safetensors"], "adapter weights {in}/nope.safetensors: file not"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/junk.safetensors"],
     "adapter weights {in}/junk.safetensors: not a readable safetensors file"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/truncated.safetensors"], "not a readable safetensors file"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/empty.safetensors"], "not a readable safetensors file"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/huge_header.safetensors"], "not a readable safetensors file"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}"], "not a readable safetensors file"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/no_metadata.safetensors"],
     "format None is not 'circtune.adapter-weights/1' (not written by circtune.save_adapter"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/wrong_shape.safetensors"],
     "do not fit TwoShapes: blocks.0.up.kernel: file has shape [6, 3, 8], model expects [6, 3, 16]"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/missing_tensor.safetensors"],
     "square.circulants.1: in the model, not in the file"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/extra_tensor.safetensors"],
     "blocks.1.up.kernel: in the file, not in the model"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/fewer_layers.safetensors"], "square.diagonals.0: in the model, not in"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/other_block_size.safetensors"],
     "were saved for another config than {in}/good.json: layers['square'].block_size: the weights were saved with "
     "16, the config says 32"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/other_alpha.safetensors"],
     "layers['square'].alpha: the weights were saved with 1.0, the config says 2.0"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/other_method.safetensors"],
     "layers['square'].method: the weights were saved with 'c3a', the config says 'cdvft'"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/nan.safetensors"], "hold NaN or Inf: square.diagonals.0: not finite"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/config_not_json.safetensors"],
     "invalid adapter config stored in {in}/config_not_json.safetensors: not valid JSON"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/config_not_object.safetensors"],
     "stored in {in}/config_not_object.safetensors: top level: expected a JSON object, got list"),
    ([*CHECK, GOOD_CONFIG, "--weights", "{in}/config_bad_format.safetensors"],
     "format: 'circtune.adapter/0' is not supported"),
]


def _ids(cases):
    return [f"{i:03d}-{argv[0]}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', message[:40]).strip('_')}"
            for i, (argv, message) in enumerate(cases)]


def _fill(text, paths):
    """``{name}`` placeholders replaced by the fixture's paths (messages hold other braces: no str.format)."""
    for name, path in paths.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _paths(run_folder, tmp_path):
    return {"run": run_folder, "out": run_folder / "out", "search": run_folder / "search", "in": run_folder / "in",
            "missing": tmp_path / "missing"}


@pytest.mark.parametrize("argv, message", CASES, ids=_ids(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(run_folder, tmp_path, capsys, argv, message):
    before = _snapshot(run_folder)
    paths = _paths(run_folder, tmp_path)
    argv = [_fill(a, paths) for a in argv]
    if argv[0] in ("search", "profile") and "--out" not in argv:
        argv += ["--out", str(paths["out"])]  # aimed at the finished run's folder: nothing there may change
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert _fill(message, paths) in _error_line(err, argv[0])
    assert "Traceback" not in err and "hunter2" not in err
    assert _snapshot(run_folder) == before


# Checks that need no measurement: each must be refused before anything is measured or written. Search and profile
# cases write (if they fail to refuse) into a fresh folder and a fresh, empty store: afterwards the folder must not
# exist and the store must hold no measurement.
PREFLIGHT = [
    (["search", "--model", "roberta-large", "--budget", "40k", "--no-validate"],
     "budget 40k cannot be met: the 48 target layers of roberta-large with search space built-in default.toml take "
     "from 49,152 to 4,915,200 adapter parameters; budgets from 49.2k to 5.46M work (--min-fill 0.9)"),
    (["search", "--model", "roberta-large", "--budget", "3"], "budget 3 cannot be met"),
    (["search", *SEARCH, *MODEL, "--space", "{run}/space.toml", "--min-fill", "1"],
     "budget 900 cannot be met: the 3 target layers of two_shapes with search space {run}/space.toml take from 832 "
     "to 832 adapter parameters; budgets from 832 to 832 work (--min-fill 1)"),
    (["search", "--model", "{in}/tiny_roberta", "--budget", "300", "--batch-size", "1", "--seq-len", "4096"],
     "--seq-len 4096 is longer than tiny_roberta takes (38 positions); use --seq-len 38 or less"),
    (["search", "--budget", "900", *MODEL, "--space", "{run}/space.toml"],
     "model 'tiny_models:two_shapes' cannot be validated as a whole: cannot feed embeddings to TwoShapes"),
    (["search", "--budget", "900", *MODEL, "--space", "{run}/space.toml"], "; pass --no-validate to search without"),
    (["profile", *MODEL, "--tokens", "1000000000"],
     "--tokens 1,000,000,000: one training step of the 48x96 layer needs at least 1.05 TiB, more than the"),
    (["profile", *MODEL, "--space", "{in}/space_misfit.toml"],
     "search space {in}/space_misfit.toml: no block size in it (5, 7) divides both dimensions of the 48x96 target "
     "layer(s) blocks.0.up, blocks.1.up (and 1 more shape(s)); a block size must divide gcd(d_in, d_out)=48"),
    (["search", *SEARCH, *MODEL, "--space", "{in}/space_half.toml"],
     "space_half.toml: no block size in it (32) divides both dimensions of the 48x96 target layer(s)"),
    (["search", *SEARCH, *MODEL, "--space", "{run}/space.toml", "--backends", "triton"],
     "no candidate of search space {run}/space.toml for the 48x96 target layers with --methods c3a,cdvft "
     "--backends triton"),
    (["search", "--methods", "lora"], "--methods: 'lora' is not accepted; accepted: c3a, cdvft"),
    (["search", "--backends", "cuda_magic"], "--backends: 'cuda_magic' is not accepted; accepted: torch, dense"),
    (["search", "--trials", "1000000000"], "--trials 1000000000 is more than one study runs (at most 100,000"),
    (["profile", *MODEL, "--min-time", "nan"], "--min-time must be a number of seconds, zero or more, got nan"),
    (["profile", *MODEL, "--min-time", "inf"], "--min-time must be a number of seconds, zero or more, got inf"),
    (["profile", *MODEL, "--device", "cpu:1"], "device 'cpu:1': the CPU has no index"),
    (["search", *SEARCH, *MODEL, "--device", "tpu"], "device 'tpu' is not a device torch knows"),
    (["profile", "--model", "microsoft/deberta-v3-base"],
     "model 'microsoft/deberta-v3-base' is not a built-in name, and there is no such folder here (circtune never "
     "downloads: a hub model needs a local folder holding its config.json"),
    (["profile", "--model", "{in}/unknown_type"],
     "{in}/unknown_type/config.json: model_type 'no-such-arch' is not known to transformers"),
    (["search", "--objective", "speed"],
     "argument --objective: invalid choice: 'speed' (choose from 'latency', 'memory', 'balanced'); see `circtune "
     "search --help`"),
    (["profile", "--tokens", "1e9"], "argument --tokens: invalid int value: '1e9'; see `circtune profile --help`"),
    (["search", "--budget", "900", *MODEL, "--space", "{run}/space.toml", "--no-validate", "--out", "{in}/good.json"],
     "--out {in}/good.json is a file, not a folder"),
    (["profile", *MODEL, "--out", "{in}/good.json/sub"], "--out {in}/good.json/sub: {in}/good.json is a file"),
    # /proc cannot hold a new file, whoever runs the test (root writes through permission bits)
    (["profile", *MODEL, "--out", "/proc/circtune-out"], "--out /proc/circtune-out: cannot write in /proc"),
    (["report", "{search}", "-o", "{search}/trials.csv"],
     "-o {search}/trials.csv: the file exists and it was written by 'circtune search'; pass another -o, or --force"),
    (["report", "{search}", "-o", "{in}/good.json"],
     "the file exists and it is not a circtune report page; pass another -o, or --force"),
    (["report", "{search}", "-o", "{in}"], "-o {in} is a folder; pass the HTML file to write, e.g. {in}/report.html"),
    (["compare", "{search}", "{search}", "-o", "{search}/adapter_config.json"],
     "-o {search}/adapter_config.json: the file exists and it was written by 'circtune search'"),
    (["compare", "{search}", "{search}", "-o", "{search}/report.html"],
     "the file exists and it is a circtune report page; pass another -o, or --force"),
]


@pytest.mark.parametrize("argv, message", PREFLIGHT, ids=_ids(PREFLIGHT))
def test_cheap_checks_refuse_before_measuring_in_one_line(run_folder, tmp_path, capsys, argv, message):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    MeasurementStore(fresh / "store.db").close()  # an empty store: the tables, no row
    before, before_fresh = _snapshot(run_folder), sorted(p.name for p in fresh.iterdir())
    paths = _paths(run_folder, tmp_path)
    argv = [_fill(a, paths) for a in argv]
    if argv[0] in ("search", "profile"):
        if "--out" not in argv:
            argv += ["--out", str(fresh / "out")]
        argv += ["--store", f"sqlite:///{fresh / 'store.db'}"]
    code, err = _run(argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"circtune {argv[0]}: error: "), err
    assert _fill(message, paths) in lines[0]
    assert sorted(p.name for p in fresh.iterdir()) == before_fresh  # no output folder
    store = MeasurementStore(fresh / "store.db")
    assert store.query() == []  # nothing was measured
    store.close()
    assert _snapshot(run_folder) == before


def test_threads_beyond_the_cpus_are_clamped_with_a_note(run_folder, tmp_path, capsys):
    import os

    folder = _copy(run_folder, tmp_path)
    argv = ["profile", *PROFILE, "--space", str(folder / "space.toml"), "--out", str(folder / "out"),
            "--threads", "1000", "--store", f"sqlite:///{tmp_path / 'threads.db'}"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    cpus = len(os.sched_getaffinity(0))
    assert f"note: --threads 1000 is more than the {cpus} CPUs here; using {cpus}" in err
    assert f"({cpus} threads)" in err


def test_the_table_covers_every_hostile_file(run_folder):
    used = {a.rsplit("/", 1)[-1] for argv, _ in CASES + PREFLIGHT for a in argv if a.startswith("{in}/")}
    written = {p.name for p in (run_folder / "in").iterdir()} - {"good.json", "good.safetensors", "not_a_config"}
    assert written <= used, written - used


def _copy(run_folder, tmp_path):
    """The finished runs copied (a case that is not refused writes into the copy, never into the fixture)."""
    for name in ("out", "search"):
        shutil.copytree(run_folder / name, tmp_path / name)
    shutil.copy(run_folder / "space.toml", tmp_path / "space.toml")
    return tmp_path


def test_the_same_command_on_its_own_folder_resumes_and_force_overwrites_another(run_folder, tmp_path, capsys):
    folder = _copy(run_folder, tmp_path)
    space = ["--space", str(folder / "space.toml")]
    rows = {}
    for name in ("out", "search"):
        store = MeasurementStore(folder / name / "circtune.db")
        rows[name] = sorted((m.key.candidate.label, m.step.median, m.timestamp) for m in store.query())
        store.close()
    config = (folder / "search" / "adapter_config.json").read_bytes()
    capsys.readouterr()
    assert main(["profile", *PROFILE, *space, "--out", str(folder / "out")]) == 0
    assert "0 measured, 6 already in the store" in capsys.readouterr().out
    assert main(["search", *PROFILE, *space, *SEARCH, "--out", str(folder / "search")]) == 0
    assert "is complete and its outputs for these options were written by" in capsys.readouterr().err
    assert (folder / "search" / "adapter_config.json").read_bytes() == config
    for name in ("out", "search"):
        store = MeasurementStore(folder / name / "circtune.db")
        assert sorted((m.key.candidate.label, m.step.median, m.timestamp) for m in store.query()) == rows[name]
        store.close()
    # Another model's run: refused (see CASES), written over with --force.
    other = ["profile", *OTHER_MODEL, *TIMING, *space, "--out", str(folder / "out")]
    assert main(other) == 2
    assert main([*other, "--force"]) == 0
    assert json.loads((folder / "out" / "profile.json").read_text())["model"]["spec"] == "tiny_models:TwoShapes"


# Another command's folder, and option values checked before anything runs. Each runs on a copy of the finished runs,
# so that a refusal that fails to happen cannot damage the shared fixture.
FOLDER_CLASHES = [
    (["profile", *PROFILE, "--space", "{run}/space.toml", "--out", "{search}"],
     "holds a run of another command 'search' (this run: 'profile')"),
    (["search", *SEARCH, *PROFILE, "--space", "{run}/space.toml", "--out", "{out}"],
     "holds a run of another command 'profile' (this run: 'search')"),
    (["profile", *PROFILE, "--space", "{run}/space.toml", "--out", "{out}", "--top", "0"],
     "--top must be at least 1, got 0"),
    (["profile", *PROFILE, "--space", "{run}/space.toml", "--out", "{out}", "--claim-timeout", "-1"],
     "--claim-timeout must be zero or more, got -1.0"),
    (["profile", *PROFILE, "--space", "{run}/space.toml", "--out", "{out}", "--claim-timeout", "nan"],
     "--claim-timeout must be zero or more, got nan"),
]


@pytest.mark.parametrize("argv, message", FOLDER_CLASHES, ids=_ids(FOLDER_CLASHES))
def test_another_commands_folder_and_bad_profile_options_are_refused(run_folder, tmp_path, capsys, argv, message):
    folder = _copy(run_folder, tmp_path / "copy")
    before = _snapshot(folder)
    paths = {**_paths(folder, tmp_path), "run": folder}
    argv = [_fill(a, paths) for a in argv]
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert message in _error_line(err, argv[0])
    assert "Traceback" not in err
    assert _snapshot(folder) == before


def test_debug_shows_the_traceback_and_plain_mode_does_not(tmp_path, capsys):
    argv = ["check", str(tmp_path / "nope.json")]
    code, err = _run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert _error_line(err, "check").endswith("nope.json: no such file or folder (expected an adapter_config.json "
                                              "or a folder holding one)")
    code, err = _run([*argv[:1], "--debug", *argv[1:]], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ValueError" in err
    assert "nope.json: no such file or folder" in _error_line(err, "check")


def test_debug_before_the_command_shows_the_traceback_too(tmp_path, capsys):
    code, err = _run(["--debug", "check", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err


def test_corrupt_adapter_files_name_the_problem(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Linear(16, 16))
    bad = tmp_path / "adapter_config.json"
    bad.write_text(json.dumps({"format": "circtune.adapter/9", "base_model": "x",
                               "layers": {"0": {"method": "lora", "block_size": 5}, "9": {"method": "c3a",
                                                                                       "block_size": 4}}}))
    with pytest.raises(circtune.AdapterConfigError) as e:
        circtune.apply_adapter(model, bad)
    text = str(e.value)
    assert text.splitlines()[0].endswith("format: 'circtune.adapter/9' is not supported; accepted: "
                                         "'circtune.adapter/1' (and 1 more below)")
    assert "method: 'lora' is not a method" in text
    junk = tmp_path / "adapter.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="adapter.safetensors"):
        circtune.load_adapter(model, junk)
    # A stored config that is JSON but not an object used to raise AttributeError from load_adapter.
    save_file({"0.kernel": torch.zeros(4, 4, 4)}, tmp_path / "list.safetensors",
              {"format": "circtune.adapter-weights/1", "config": "[]"})
    with pytest.raises(circtune.AdapterConfigError, match="top level: expected a JSON object, got list"):
        circtune.load_adapter(model, tmp_path / "list.safetensors")


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())["files"]


def test_other_options_in_a_folder_are_refused_and_a_forced_run_is_never_reported_as_written(run_folder, tmp_path,
                                                                                             capsys):
    """A re-run with other --backends used to replace the pick silently, and the original command then said its
    outputs "were written" there. Now: refused before measuring; with --force written and recorded; the original
    command refused in turn; with --force it writes its outputs again rather than claiming them."""
    folder = tmp_path  # a run of its own (a copy's study would say its outputs are in the copied folder)
    shutil.copy(run_folder / "space.toml", folder / "space.toml")
    space = ["--space", str(folder / "space.toml")]
    original = ["search", *PROFILE, *space, *SEARCH, "--out", str(folder / "search")]
    other = [*original, "--backends", "torch"]
    assert main(original) == 0
    capsys.readouterr()
    before = _snapshot(folder)
    code, err = _run(other, capsys)
    assert code == 2
    assert "holds a search run with other options: backends None (this run: ['torch'])" in _error_line(err, "search")
    assert _snapshot(folder) == before

    assert main([*other, "--force"]) == 0
    assert "wrote trials.csv, validation.csv, adapter_config.json" in capsys.readouterr().err
    files = _manifest(folder / "search")
    assert files["adapter_config.json"]["options"]["backends"] == ["torch"]
    assert files["measurements.csv"]["options"]["backends"] == ["torch"]
    assert files["adapter_config.json"]["subcommand"] == "search" and "command" in files["adapter_config.json"]

    code, err = _run(original, capsys)
    assert code == 2 and "were written" not in err
    assert "backends ['torch'] (this run: None)" in _error_line(err, "search")

    assert main([*original, "--force"]) == 0
    err = capsys.readouterr().err
    assert "were written" not in err and "wrote trials.csv, validation.csv, adapter_config.json" in err
    assert _manifest(folder / "search")["adapter_config.json"]["options"]["backends"] is None
    # And now the same command again: the outputs are there, written by this study with these options.
    assert main(original) == 0
    assert "is complete and its outputs for these options were written by" in capsys.readouterr().err


def test_a_study_name_of_another_search_is_refused(run_folder, tmp_path, capsys):
    """An explicit --study-name with another budget used to print "outputs ... were written" (exit 0, nothing
    written); now it is refused before anything is written."""
    folder = _copy(run_folder, tmp_path)
    space = ["--space", str(folder / "space.toml")]
    store = ["--store", str(folder / "search" / "circtune.db")]
    first = ["search", *PROFILE, *space, *SEARCH, *store, "--study-name", "mine", "--out", str(folder / "a")]
    assert main(first) == 0
    capsys.readouterr()
    second = ["search", *PROFILE, *space, *SEARCH[2:], "--budget", "880", *store, "--study-name", "mine",
              "--out", str(folder / "b")]
    code, err = _run(second, capsys)
    assert code == 2
    assert "study 'mine' in sqlite:///" in _error_line(err, "search")
    assert "was made for another search: budget 900 (this run: 880); pass another --study-name" in err
    assert not (folder / "b").exists()


def test_report_and_compare_rebuild_their_own_pages_and_force_overrides(run_folder, tmp_path, capsys):
    folder = _copy(run_folder, tmp_path)
    run = folder / "search"
    assert main(["report", str(run), "--plotlyjs", "cdn"]) == 0  # the search's own report.html: rebuilt
    assert _manifest(run)["report.html"]["subcommand"] == "report"
    page = tmp_path / "cmp.html"
    assert main(["compare", str(run), str(run), "-o", str(page), "--plotlyjs", "cdn"]) == 0
    assert main(["compare", str(run), str(run), "-o", str(page), "--plotlyjs", "cdn"]) == 0  # its own page again
    trials = (run / "trials.csv").read_bytes()
    assert main(["report", str(run), "-o", str(run / "trials.csv"), "--plotlyjs", "cdn"]) == 2
    assert (run / "trials.csv").read_bytes() == trials
    assert main(["report", str(run), "-o", str(run / "trials.csv"), "--plotlyjs", "cdn", "--force"]) == 0
    assert (run / "trials.csv").read_text().startswith("<!DOCTYPE html>")
