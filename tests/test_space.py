import dataclasses

import pytest
import torch
from torch import nn

from circtune.measure.modules import build_module
from circtune.space import (
    Candidate,
    SpaceError,
    builtin_spaces,
    expand,
    load_space,
    lora_rank_for,
    parse_space,
    references,
    resolve_dtype,
)


def test_builtin_spaces_parse_and_default_is_documented():
    names = builtin_spaces()
    assert {"default", "encoder", "vision", "decoder"} <= set(names)
    assert all(names.values()), "every shipped space has a description"
    default = load_space()
    assert default == load_space("default")
    assert default.methods == ("c3a", "cdvft") and default.factors == (2, 3, 4)
    assert (default.block_size_min, default.block_size_max) == (32, 1024)
    # default.toml writes out every key with its built-in value: leaving them all out gives the same space.
    assert parse_space({}, default.source) == dataclasses.replace(default, description="")


def test_default_space_for_1024_square_on_cpu():
    candidates, excluded = expand(load_space(), 1024, 1024, "cpu")
    sizes = sorted({c.block_size for c in candidates})
    assert sizes == [32, 64, 128, 256, 512, 1024]
    # c3a: torch x {rfft, fft, dft} + dense = 4 per p; cdvft: the same for each of m = 2, 3, 4.
    assert len(candidates) == 6 * 4 + 6 * 4 * 3
    assert len(set(candidates)) == len(candidates)
    assert all(c.transform is None for c in candidates if c.backend == "dense")
    assert not any(c.backend == "triton" for c in candidates)
    reasons = {e.backend: e.reason for e in excluded}
    assert "triton" in reasons and "unavailable on cpu" in reasons["triton"]
    assert "does not use a transform" in reasons["dense"]


def test_block_sizes_that_do_not_divide_are_excluded_with_the_reason():
    space = parse_space({"methods": ["c3a"], "block_sizes": {"min": 16, "max": 128}, "backends": ["torch"],
                         "transforms": ["rfft"]})
    candidates, excluded = expand(space, 48, 96)
    assert sorted(c.block_size for c in candidates) == [16, 24, 48]
    why = {e.block_size: e.reason for e in excluded if e.block_size}
    assert 32 in why and 96 in why and 64 in why
    assert "does not divide both d_in=48 and d_out=96" in why[32] and "gcd=48" in why[32]

    listed = parse_space({"block_sizes": [5, 12], "methods": ["c3a"], "backends": ["dense"]})
    candidates, excluded = expand(listed, 48, 96)
    assert [c.block_size for c in candidates] == [12]
    assert [e.block_size for e in excluded if e.block_size] == [5]


def test_nothing_divides_is_recorded():
    space = parse_space({"block_sizes": [7]})
    candidates, excluded = expand(space, 48, 96)
    assert candidates == []
    assert any("no block size in the space divides" in e.reason for e in excluded)


@pytest.mark.parametrize("data, key, accepted", [
    ({"method": ["c3a"]}, "method", "did you mean 'methods'"),
    ({"methods": ["c3a", "lora"]}, "methods", "accepted: c3a, cdvft"),
    ({"methods": []}, "methods", "non-empty list"),
    ({"transforms": ["dct"]}, "transforms", "accepted: rfft, fft, dft"),
    ({"backends": ["cuda"]}, "backends", "accepted: torch, dense, triton"),
    ({"dtypes": ["int8"]}, "dtypes", "accepted: auto, fp32, bf16, fp16"),
    ({"factors": [1, 2]}, "factors", "integer >= 2"),
    ({"factors": 3}, "factors", "non-empty list of integers"),
    ({"block_sizes": {"min": 64, "max": 32}}, "block_sizes", "min=64 is larger than max=32"),
    ({"block_sizes": {"min": 0}}, "block_sizes.min", "integer >= 1"),
    ({"block_sizes": {"lo": 8}}, "block_sizes.lo", "accepted keys: min, max"),
    ({"block_sizes": [64, True]}, "block_sizes", "integer >= 1"),
    ({"block_sizes": "64"}, "block_sizes", "a table { min = .., max = .. } or a list"),
    ({"description": 3}, "description", "expected a string"),
])
def test_every_bad_value_names_file_key_and_what_is_accepted(tmp_path, data, key, accepted):
    with pytest.raises(SpaceError) as e:
        parse_space(data, "my.toml")
    assert str(e.value).startswith(f"search space my.toml: {key}:")
    assert accepted in str(e.value)


def test_load_space_errors(tmp_path):
    with pytest.raises(SpaceError, match="no such file.*built-in name: decoder, default"):
        load_space(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("methods = [c3a")
    with pytest.raises(SpaceError, match=f"search space {bad}: not valid TOML"):
        load_space(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('methods = ["c3a"]\nbackend = ["torch"]\n')
    with pytest.raises(SpaceError, match=rf"{unknown}: backend: unknown key \(did you mean 'backends'\?\)"):
        load_space(unknown)
    good = tmp_path / "good.toml"
    good.write_text('methods = ["cdvft"]\nfactors = [3]\ndtypes = "bfloat16"\n')
    space = load_space(good)
    assert space.methods == ("cdvft",) and space.factors == (3,) and space.dtypes == ("bf16",)


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == "fp32"
    assert resolve_dtype("bfloat16", cpu) == "bf16"
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; accepted: auto, fp32, bf16, fp16"):
        resolve_dtype("int8", cpu)


@pytest.mark.parametrize("d_in, d_out", [(48, 96), (64, 64), (96, 24)])
def test_candidate_params_match_the_built_layers(d_in, d_out):
    space = parse_space({"block_sizes": {"min": 3, "max": 96}, "factors": [2, 3], "backends": ["torch", "dense"]})
    candidates, _ = expand(space, d_in, d_out)
    assert candidates
    for c in [*candidates, *references(candidates, d_in, d_out, peft=True)]:
        layer = build_module(c, nn.Linear(d_in, d_out))
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert trainable == c.params(d_in, d_out), c


def test_baselines_cover_every_candidate_with_the_closest_lora_rank():
    candidates, _ = expand(load_space(), 1024, 1024)
    extra = references(candidates, 1024, 1024, peft=True, lora_ranks=[8])
    assert extra[0] == Candidate("none")
    ranks = {c.factors for c in extra if c.method == "lora"}
    assert 8 in ranks
    for c in candidates:
        r = lora_rank_for(c.params(1024, 1024), 1024, 1024)
        assert r in ranks
        # closest: neither neighbour is nearer
        assert abs(r * 2048 - c.params(1024, 1024)) <= abs((r + 1) * 2048 - c.params(1024, 1024))
    assert sorted(c.block_size for c in extra if c.method == "peft-c3a") == [32, 64, 128, 256, 512, 1024]
    assert not any(c.method == "peft-c3a" for c in references(candidates, 1024, 1024, peft=False))


def test_candidate_labels_and_configs():
    assert Candidate("c3a", 64, None, "rfft", "torch").label == "c3a p=64 rfft/torch"
    assert Candidate("cdvft", 64, 3, None, "dense").label == "cdvft p=64 m=3 dense"
    assert Candidate("lora", factors=8).label == "lora r=8"
    lc = Candidate("cdvft", 64, 3, None, "dense").layer_config()
    assert (lc.method, lc.block_size, lc.factors, lc.transform, lc.backend) == ("cdvft", 64, 3, "rfft", "dense")
    with pytest.raises(ValueError, match="the reference lora r=8 has no circtune adapter config"):
        Candidate("lora", factors=8).layer_config()


@pytest.mark.parametrize("candidate", [
    Candidate("none"), Candidate("lora", factors=8), Candidate("peft-c3a", block_size=16),
    Candidate("c3a", 16, None, "rfft", "torch"), Candidate("c3a", 32, None, "dft", "torch"),
    Candidate("c3a", 16, None, None, "dense"), Candidate("c3a", 64, None, None, "triton"),
    Candidate("cdvft", 32, 3, "fft", "torch"), Candidate("cdvft", 32, 2, None, "triton")])
def test_the_candidate_key_round_trips_through_every_form(candidate):
    import pandas as pd

    assert Candidate.from_row(candidate.store_values()) == candidate
    frame = pd.DataFrame([candidate.frame_values()])  # NaN for the absent numbers, as measurements.csv reads back
    assert Candidate.from_row(next(frame.itertuples())) == candidate
    assert Candidate.from_row(frame.iloc[0].to_dict()) == candidate
    if not candidate.is_reference:
        layer = candidate.layer_config()
        assert Candidate.from_layer(layer) == candidate
        assert Candidate.from_layer(layer.to_dict()) == candidate  # the adapter_config.json entry
