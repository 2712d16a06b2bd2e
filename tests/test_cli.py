import re

import pytest

from circtune.cli.main import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_help_needs_no_torch_and_says_what_circtune_does():
    """`circtune --help` and every subcommand's parser are built without importing torch (or pandas, optuna,
    transformers): a fresh interpreter, so that no other test's imports count."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from circtune.cli.main import build_parser\n"
            "parser, parsers = build_parser()\n"
            "text = parser.format_help() + ''.join(p.format_help() for p in parsers.values())\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas', 'optuna', 'transformers'})\n"
            "print(heavy)\n"
            "print(text)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "[]"
    assert "picks, for each layer of your model, the adapter that trains fastest" in out
    assert "entry point" not in out and "dispatches" not in out


def test_search_help_states_the_search_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128 on the CPU (batch 1 x 128), 4096 on a GPU (8 x 512))" in text
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 512 on the CPU, 4096 on a GPU)" in text and "runs/<model>-<device>-profile" in text


@pytest.mark.slow  # end to end: builds a RoBERTa, trains C3A and CDVFT, saves, reloads
def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter.safetensors").exists()
    assert "reloaded into a fresh model: max |difference| 0.00e+00" in out


def test_usage_error_is_one_line(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "circtune demo: error: --steps must be at least 1, got 0" in err
    assert "Traceback" not in err


def _profile_args(tmp_path, *extra):
    space = tmp_path / "space.toml"
    space.write_text('methods = ["c3a"]\nblock_sizes = [16, 24]\ntransforms = ["rfft"]\nbackends = ["torch"]\n')
    return ["profile", "--model", "tiny_models:two_shapes", "--targets", "up,square", "--space", str(space),
            "--tokens", "12", "--warmup", "0", "--min-reps", "2", "--max-reps", "2", "--min-time", "0",
            "--no-peft", "--quiet", "--out", str(tmp_path / "out"), *extra]


def test_profile_writes_csv_and_a_second_run_measures_nothing(tmp_path, capsys):
    import pandas as pd

    from circtune.measure.store import CSV_COLUMNS

    assert main(_profile_args(tmp_path)) == 0
    out = capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "out" / "measurements.csv", keep_default_na=False)
    assert tuple(frame.columns[: len(CSV_COLUMNS)]) == CSV_COLUMNS
    # 48x96: c3a p=16, 24 + base + LoRA ranks; 64x64: p=16 + base + LoRA.
    assert set(frame.status) == {"ok"}
    assert sorted(frame[frame.method == "c3a"].block_size.astype(int).tolist()) == [16, 16, 24]
    assert "48 x 96 (2 layers), 12 tokens, fp32: base layer step" in out
    assert "fastest candidate" in out and "c3a p=16 rfft/torch" in out
    assert "excluded for 64x64: block_size=24: p=24 does not divide" in out
    assert f"{len(frame)} measured, 0 already in the store, 0 failed" in out
    assert (tmp_path / "out" / "circtune.db").exists() and (tmp_path / "out" / "profile.json").exists()

    assert main(_profile_args(tmp_path)) == 0
    assert f"0 measured, {len(frame)} already in the store" in capsys.readouterr().out


def test_threads_apply_to_the_command_only(tmp_path, capsys):
    """`main()` called from a program (a notebook, a test) leaves torch's thread count as it found it: the CPU
    fingerprint, and so every key in the store, includes it."""
    import torch

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert main(_profile_args(tmp_path, "--threads", str(other))) == 0
    assert torch.get_num_threads() == before
    assert f"({other} threads)" in capsys.readouterr().err
    assert main(_profile_args(tmp_path, "--threads", str(other))) == 0  # the same fingerprint: nothing measured
    assert re.search(r"(^|\s)0 measured, \d+ already in the store", capsys.readouterr().out)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "0"], "--tokens must be positive, got 0"),
    (["--min-reps", "5", "--max-reps", "3"], "--min-reps 5 is larger than --max-reps 3"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--targets", "nope"], "nope"),
])
def test_profile_usage_errors(tmp_path, capsys, extra, message):
    assert main(_profile_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("circtune profile: error:") and message in err and "Traceback" not in err


def test_profile_batch_and_seq_len_go_together(tmp_path, capsys):
    args = [a for a in _profile_args(tmp_path) if a not in ("--tokens", "12")]
    assert main([*args, "--batch-size", "2"]) == 2
    assert "--batch-size and --seq-len go together" in capsys.readouterr().err


def test_check_warns_about_a_backend_this_machine_cannot_run(tmp_path, capsys):
    """A config picked on a GPU machine may be checked anywhere (its shapes and weights are what check validates),
    but a triton layer cannot train on a machine without CUDA: check says so, and still exits 0."""
    import json

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine runs triton: nothing to warn about")
    config = {"format": "circtune.adapter/1", "base_model": "two_shapes",
              "layers": {"square": {"method": "c3a", "block_size": 16, "backend": "triton"},
                         "blocks.0.up": {"method": "c3a", "block_size": 16}}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert main(["check", str(tmp_path), "--model", "tiny_models:two_shapes"]) == 0
    out = capsys.readouterr().out
    assert ("warning: 1 layer(s) use backend triton, which cannot run on this machine (cpu: Triton kernels need a "
            "CUDA device") in out
    assert main(["check", str(tmp_path), "--model", "tiny_models:two_shapes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"][0].startswith("1 layer(s) use backend triton")
