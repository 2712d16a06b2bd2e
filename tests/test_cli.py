import pytest

from circtune.cli.main import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


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
