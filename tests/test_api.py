"""The library API: circtune.profile() / circtune.search() with typed options, checked in one place, result
objects, and no process-wide state left changed (signal handlers, torch's thread count) after a call or an error."""

from __future__ import annotations

import dataclasses
import signal

import pandas as pd
import pytest
import torch
from tiny_models import tiny_roberta

import circtune
from circtune.errors import OptionError, UsageError
from circtune.options import BACKEND_CHOICES, METHOD_CHOICES, SearchOptions

FAST = {"warmup": 0, "min_reps": 2, "max_reps": 2, "min_time": 0, "progress": False, "device": "cpu"}
SPACE = 'methods = ["c3a"]\nblock_sizes = [16, 32, 64]\ntransforms = ["rfft"]\nbackends = ["torch", "dense"]\n'


def test_option_choices_are_the_vocabularies_of_config_and_space():
    from circtune.adapters.methods import method_names
    from circtune.space import KNOWN_BACKENDS

    assert METHOD_CHOICES == method_names("adapter") and BACKEND_CHOICES == KNOWN_BACKENDS


def test_options_are_normalised_and_frozen():
    opts = SearchOptions(budget="1.5M", methods="c3a, cdvft", targets=["query,value", "dense"], device=" CUDA:1 ",
                         lora_ranks=[4, 8])
    assert opts.budget == 1_500_000 and opts.methods == ("c3a", "cdvft")
    assert opts.targets == ("query", "value", "dense") and opts.device == "cuda:1" and opts.lora_ranks == (4, 8)
    assert SearchOptions(budget=100_000).budget == SearchOptions(budget="100k").budget == 100_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.trials = 3  # type: ignore[misc]
    assert dataclasses.replace(opts, trials=5).trials == 5


@pytest.mark.parametrize("options, option, message", [
    ({"budget": "lots"}, "budget", "budget 'lots' is not a number of parameters; accepted: 100k, 1.5M, 250000"),
    ({"budget": 0}, "budget", "budget must be at least 1 parameter"),
    ({"trials": 0}, "trials", "--trials must be at least 1, got 0"),
    ({"trials": "many"}, "trials", "--trials must be a whole number, got 'many'"),
    ({"top": 0}, "top", "--top must be at least 1, got 0"),
    ({"min_fill": 1.5}, "min_fill", "--min-fill must be within [0, 1], got 1.5"),
    ({"methods": "c3a,lora"}, "methods", "--methods: 'lora' is not accepted; accepted: c3a, cdvft"),
    ({"backends": ""}, "backends", "--backends is empty; accepted: torch, dense, triton"),
    ({"objective": "speed"}, "objective", "--objective: 'speed' is not accepted; accepted: latency, memory"),
    ({"tokens": 0}, "tokens", "--tokens must be positive, got 0"),
    ({"tokens": 8, "batch_size": 2, "seq_len": 4}, "tokens", "--tokens and --batch-size exclude each other"),
    ({"batch_size": 2}, "batch_size", "--batch-size and --seq-len go together"),
    ({"min_reps": 9, "max_reps": 3}, "min_reps", "--min-reps 9 is larger than --max-reps 3"),
    ({"min_time": float("nan")}, "min_time", "--min-time must be a number of seconds"),
    ({"claim_timeout": -1}, "claim_timeout", "--claim-timeout must be zero or more"),
    ({"device": "mps"}, "device", "device 'mps' is not a device torch knows"),
    ({"dtype": "fp8"}, "dtype", "--dtype: 'fp8' is not accepted; accepted: auto, fp32, bf16, fp16"),
    ({"targets": ","}, "targets", "no target modules given"),
    ({"validate_min_time": -1}, "validate_min_time", "--validate-min-time must be a number of seconds"),
    ({"peft": "no"}, "peft", "--peft is True or False"),
    ({"trails": 3}, "trails", "unknown option 'trails'; did you mean 'trials'"),
    ({"allocation": "even"}, "allocation", "--allocation: 'even' is not accepted; accepted: balanced, free"),
    ({"capacity_tolerance": 1.0}, "capacity_tolerance", "--capacity-tolerance must be within [0, 1)"),
    ({"capacity_tolerance": float("nan")}, "capacity_tolerance", "--capacity-tolerance must be within [0, 1)"),
    ({"capacity_tolerance": "5%"}, "capacity_tolerance", "--capacity-tolerance must be a number, got '5%'"),
    ({"calibration": "texts.txt"}, "calibration", "--calibration needs --model to be a local model folder"),
    ({"calibration": ""}, "calibration", "--calibration must be a path"),
])
def test_a_refused_option_is_a_value_error_naming_it(options, option, message):
    with pytest.raises(OptionError) as caught:
        circtune.search("tiny_models:two_shapes", **options)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, UsageError)
    assert caught.value.option == option and message in str(caught.value)


def test_a_missing_calibration_file_is_refused_before_anything_runs(tmp_path):
    folder = tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)
    with pytest.raises(OptionError, match=r"--calibration .*nope.txt: no such file; accepted: a text file") as caught:
        circtune.search(str(folder), "1k", calibration=tmp_path / "nope.txt", out=tmp_path / "out")
    assert caught.value.option == "calibration" and not (tmp_path / "out").exists()
    opts = SearchOptions(model=str(folder), calibration=str(folder / "config.json"), allocation="free",
                         capacity_tolerance=0)
    assert opts.allocation == "free" and opts.capacity_tolerance == 0.0 and opts.calibration.endswith("config.json")


def test_profile_options_have_no_search_options():
    with pytest.raises(OptionError, match="unknown option 'budget'"):
        circtune.profile("tiny_models:two_shapes", budget="100k")
    with pytest.raises(OptionError, match="options must be a SearchOptions"):
        circtune.search(options=circtune.ProfileOptions())


def _handlers() -> dict:
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}


@pytest.fixture
def callers_state():
    """The caller's own handlers and thread count, put back after the test whatever happens."""
    def mine(signum, frame):  # pragma: no cover - never delivered
        pass

    before, threads = _handlers(), torch.get_num_threads()
    for s in before:
        signal.signal(s, mine)
    torch.set_num_threads(2)
    try:
        yield _handlers(), 2
    finally:
        for s, h in before.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        torch.set_num_threads(threads)


def test_profile_returns_the_measurements_and_leaves_the_process_as_it_was(tmp_path, callers_state):
    handlers, threads = callers_state
    result = circtune.profile("tiny_models:two_shapes", targets="up,square", out=tmp_path / "out", tokens=8,
                              threads=1, peft=False,
                              **FAST)
    assert isinstance(result, circtune.ProfileResult) and result.folder == tmp_path / "out"
    assert (result.folder / "measurements.csv").is_file() and (result.folder / "profile.json").is_file()
    assert isinstance(result.measurements, pd.DataFrame) and len(result.measurements) == result.measured
    assert set(result.measurements.status) == {"ok"} and result.failed == 0
    assert all(e.what and e.reason for e in result.exclusions)  # e.g. triton without CUDA
    assert _handlers() == handlers and torch.get_num_threads() == threads


def test_after_an_error_the_handlers_and_threads_are_the_callers(tmp_path, callers_state):
    handlers, threads = callers_state
    folder = tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)
    with pytest.raises(ValueError, match="budget 5 cannot be met"):  # refused once the model is known
        circtune.search(str(folder), 5, out=tmp_path / "out", threads=1, **FAST)
    assert _handlers() == handlers and torch.get_num_threads() == threads
    assert not (tmp_path / "out" / "measurements.csv").exists()


@pytest.mark.slow
def test_search_returns_the_pick_and_its_files(tmp_path, callers_state):
    handlers, threads = callers_state
    folder = tiny_roberta(tmp_path / "tiny", hidden=64, layers=2)
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    options = SearchOptions(model=str(folder), budget=900, space=str(space), batch_size=2, seq_len=8, trials=8,
                            top=2, validate_min_time=0, out=str(tmp_path / "out"), **FAST)
    result = circtune.search(options=options)
    assert isinstance(result, circtune.SearchResult) and result.skipped is None
    assert isinstance(result.config, circtune.AdapterConfig) and result.folder == tmp_path / "out"
    assert 810 <= result.config.metadata["total_params"] <= 900 == result.summary["budget"]
    assert result.config == circtune.load_config(result.folder / "adapter_config.json")
    assert len(result.trials) >= 8 and result.validation.picked.sum() == 1
    assert result.report_path == result.folder / "report.html" and result.report_path.is_file()
    assert {"adapter_config.json", "trials.csv", "validation.csv", "report.html"} <= set(result.written)
    assert set(result.measurements.method) >= {"c3a", "none"}
    assert _handlers() == handlers and torch.get_num_threads() == threads
    # Again with the same options: the study is complete and its outputs are there, so the result reads them.
    again = circtune.search(options=options)
    assert again.skipped and again.config == result.config and again.written == ()
