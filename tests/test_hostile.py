"""Hostile and mistaken input: one-line error, exit status 2, the offending value named, nothing stored touched."""

import json

import pytest

from circtune.cli.main import main
from circtune.measure.store import MeasurementStore

PROFILE = ["--model", "tiny_models:two_shapes", "--targets", "up,square", "--tokens", "8", "--warmup", "0",
           "--min-reps", "2", "--max-reps", "2", "--min-time", "0", "--no-peft", "--quiet"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A folder with a finished profile run and its store."""
    folder = tmp_path_factory.mktemp("run")
    space = folder / "space.toml"
    space.write_text('methods = ["c3a"]\nblock_sizes = [16]\ntransforms = ["rfft"]\nbackends = ["torch"]\n')
    assert main(["profile", *PROFILE, "--space", str(space), "--out", str(folder / "out")]) == 0
    return folder


def _snapshot(folder):
    store = MeasurementStore(folder / "out" / "circtune.db")
    rows = sorted((m.key.candidate.label, m.step.median, m.timestamp) for m in store.query())
    store.close()
    files = {p.name: p.read_bytes() for p in (folder / "out").iterdir() if p.suffix in (".csv", ".json")}
    return rows, files


CASES = [
    (["search", "--budget", "0"], "budget must be at least 1 parameter, got '0'"),
    (["search", "--budget", "-5"], "budget '-5' is not a number of parameters; accepted: 100k, 1.5M, 250000"),
    (["search", "--budget", "abc"], "budget 'abc' is not a number of parameters"),
    (["search", "--budget", "1e999"], "budget '1e999' is too large"),
    (["search", "--budget", "100kk"], "budget '100kk' is not a number of parameters"),
    (["search", "--budget", "1.2345k"], "is not a whole number of parameters"),
    (["search", "--budget", "10", "--min-fill", "1.5"], "--min-fill must be within [0, 1], got 1.5"),
    (["search", "--budget", "10", "--trials", "0"], "--trials must be at least 1, got 0"),
    (["profile", "--model", "robreta-large"], "unknown model 'robreta-large'"),
    (["profile", "--model", "no_such_module:factory"], "cannot import module 'no_such_module'"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "qurey"], "qurey"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "up", "--space", "nope"],
     "search space nope: no such file"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "up", "--tokens", "-3"],
     "--tokens must be positive, got -3"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "up", "--threads", "0"],
     "--threads must be positive, got 0"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "up", "--device", "cuda:9"], "cuda:9"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "up", "--store", "nosuchdb://x"],
     "cannot open the measurement store nosuchdb://x"),
    (["profile", "--model", "tiny_models:two_shapes", "--targets", "up", "--store",
      "postgresql://admin:hunter2@127.0.0.1:1/db"], "postgresql://admin:***@127.0.0.1:1/db"),
    (["report", "{missing}"], "missing: not a folder (expected the output folder of 'circtune search')"),
    (["report", "{out}"], "missing adapter_config.json"),
    (["compare", "{out}"], "compare needs at least two folders, got 1"),
]


@pytest.mark.parametrize("argv, message", CASES)
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(run_folder, tmp_path, capsys, argv, message):
    before = _snapshot(run_folder)
    argv = [a.format(missing=tmp_path / "missing", out=run_folder / "out") for a in argv]
    if argv[0] in ("search", "profile"):  # aimed at the finished run's folder: nothing there may change
        argv += ["--out", str(run_folder / "out")]
    code = None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors (missing or invalid arguments)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and "hunter2" not in err
    assert _snapshot(run_folder) == before


def test_a_folder_of_another_model_is_refused_unless_forced(run_folder, tmp_path, capsys):
    before = _snapshot(run_folder)
    other = ["profile", "--model", "tiny_models:two_shapes", "--targets", "up", *PROFILE[4:]]
    profile_json = json.loads((run_folder / "out" / "profile.json").read_text())
    profile_json["model"]["spec"] = "roberta-large"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "profile.json").write_text(json.dumps(profile_json))
    assert main([*other, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another model 'roberta-large' (this run: 'tiny_models:two_shapes')" in err
    assert main([*other, "--out", str(tmp_path / "out"), "--force"]) == 0
    assert _snapshot(run_folder) == before


def test_corrupt_adapter_files_name_the_problem(tmp_path):
    from torch import nn

    import circtune

    model = nn.Sequential(nn.Linear(16, 16))
    bad = tmp_path / "adapter_config.json"
    bad.write_text(json.dumps({"format": "circtune.adapter/9", "base_model": "x",
                               "layers": {"0": {"method": "lora", "block_size": 5}, "9": {"method": "c3a",
                                                                                       "block_size": 4}}}))
    with pytest.raises(circtune.AdapterConfigError) as e:
        circtune.apply_adapter(model, bad)
    text = str(e.value)
    assert "format: 'circtune.adapter/9' is not supported" in text and "method: 'lora' is not a method" in text
    junk = tmp_path / "adapter.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="adapter.safetensors"):
        circtune.load_adapter(model, junk)
