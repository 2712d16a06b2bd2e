"""The method registry: what each method says about itself, checked against the layer it builds; and a method
registered from outside reaches the search space, the candidate key, the adapter config, the model, the FLOP closed
form and the capacity score with no other change."""

import pytest
import torch
from reference import c3a_delta_reference
from torch import nn

import circtune
from circtune.adapters import methods as registry
from circtune.adapters.c3a import C3ALinear
from circtune.adapters.methods import Method, get_method, method_names, register_method
from circtune.capacity import captured_fraction
from circtune.errors import OptionError
from circtune.measure.flops import analytic_flops, count_flops
from circtune.measure.modules import build_module, peft_available
from circtune.options import SearchOptions
from circtune.space import Candidate, expand, parse_space

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# (d_in, d_out, p): non-square, block sizes that are not powers of two
SHAPES = [(48, 96, 6), (96, 48, 12), (60, 60, 5)]


def _candidate(name: str, p: int) -> Candidate:
    spec = get_method(name)
    factors = {"m": 3, "r": 5}.get(spec.factors)
    backend = "torch" if spec.is_adapter else None
    return Candidate(name, p if spec.block_size else None, factors, "rfft" if backend else None, backend)


def test_the_built_in_methods_and_their_roles():
    assert method_names("adapter") == ("c3a", "cdvft")
    assert method_names("reference") == ("none", "lora", "peft-c3a")
    assert [get_method(n).expresses for n in method_names()] == [
        "block-circulant", "circulant-diagonal", "nothing", "low-rank", "block-circulant"]
    with pytest.raises(ValueError, match=r"method='dora' is not supported; valid methods: c3a, cdvft, none, lora, "
                                         r"peft-c3a"):
        get_method("dora")
    with pytest.raises(ValueError, match="'c3a' is already registered"):
        register_method(get_method("c3a"))
    c3a = get_method("c3a")
    with pytest.raises(ValueError, match="role 'baseline' is not one of adapter, reference"):
        Method("x", "baseline", "X", "low-rank", c3a.num_params, c3a.build, c3a.flops)
    with pytest.raises(ValueError, match="expresses 'sparse' is not one of"):
        Method("x", "adapter", "X", "sparse", c3a.num_params, c3a.build, c3a.flops)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", method_names())
def test_each_method_counts_the_parameters_its_layer_trains_and_its_flops_are_what_it_runs(name, shape):
    if name == "peft-c3a" and not peft_available():
        pytest.skip("PEFT is not installed")
    d_in, d_out, p = shape
    candidate = _candidate(name, p)
    torch.manual_seed(0)
    layer = build_module(candidate, nn.Linear(d_in, d_out))
    trainable = sum(t.numel() for t in layer.parameters() if t.requires_grad)
    assert candidate.params(d_in, d_out) == trainable
    x = torch.randn(7, d_in, requires_grad=True)
    counted = count_flops(layer, x, torch.randn(7, d_out))
    closed = analytic_flops(name, d_in, d_out, 7, block_size=candidate.block_size, factors=candidate.factors,
                            rank=candidate.factors, transform=candidate.transform or "rfft",
                            backend=candidate.backend or "torch")
    assert counted.fwd_bwd == closed.fwd_bwd


class XavierC3A(C3ALinear):
    """A method that is not built in: C3A whose kernel starts Xavier-uniform (nonzero), under its own name."""

    def __init__(self, base, block_size, *, transform="rfft", backend="torch"):
        super().__init__(base, block_size, transform=transform, backend=backend, init="xavier_uniform")


def _xavier(base, *, block_size, transform="rfft", backend="torch", **_):
    return XavierC3A(base, block_size, transform=transform, backend=backend)


@pytest.fixture
def xavier_method(monkeypatch):
    c3a = get_method("c3a")
    spec = Method("c3a-xavier", "adapter", "C3A (Xavier init)", "block-circulant", c3a.num_params, _xavier, c3a.flops,
                  layer_class=XavierC3A)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)  # removed again after the test
    return spec


def test_a_registered_method_goes_through_space_key_config_model_flops_and_capacity(xavier_method, tmp_path):
    d_in, d_out, p = 48, 96, 6
    space = parse_space({"methods": ["c3a-xavier"], "block_sizes": [p], "backends": ["torch"],
                         "transforms": ["rfft"]})
    (candidate,), _ = expand(space, d_in, d_out)
    assert candidate == Candidate("c3a-xavier", p, None, "rfft", "torch")
    assert candidate.label == "c3a-xavier p=6 rfft/torch" and candidate.params(d_in, d_out) == d_in * d_out // p

    config = circtune.AdapterConfig.from_dict({"format": circtune.FORMAT, "base_model": "toy", "layers": {
        "proj": {"method": "c3a-xavier", "block_size": p}}})
    assert config.layers["proj"].to_dict() == {"method": "c3a-xavier", "block_size": p, "factors": None,
                                               "transform": "rfft", "backend": "torch"}
    assert Candidate.from_layer(config.layers["proj"]) == candidate

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d_in, d_out).double())
    x = torch.randn(5, d_in, dtype=torch.float64)
    frozen = model.proj(x)
    circtune.apply_adapter(model, config)
    assert type(model.proj) is XavierC3A
    kernel = model.proj.kernel.detach().double()
    assert kernel.abs().sum() > 0  # its own init, not C3A's zeros
    delta = c3a_delta_reference(kernel, d_in)
    torch.testing.assert_close(model.proj(x), frozen + x @ delta.T, atol=1e-10, rtol=1e-8)
    assert circtune.config_from_model(model, "toy").layers["proj"] == config.layers["proj"]

    assert analytic_flops("c3a-xavier", d_in, d_out, 9, block_size=p) == analytic_flops("c3a", d_in, d_out, 9,
                                                                                       block_size=p)
    g = torch.randn(d_out, d_in, dtype=torch.float64)
    assert captured_fraction(g, candidate) == captured_fraction(g, Candidate("c3a", p))
    # the library's options take it too (the CLI's --methods has only the built-in ones: nothing registers there)
    assert SearchOptions(methods="c3a, c3a-xavier").methods == ("c3a", "c3a-xavier")
    with pytest.raises(OptionError, match="accepted: c3a, cdvft, c3a-xavier"):
        SearchOptions(methods="dora")


def test_an_unknown_method_in_a_file_is_named_not_crashed_on():
    """A measurement row of a method this installation does not know (a newer circtune's file) still has a key
    and a label; anything that needs the method's rules says it is not supported."""
    c = Candidate.from_row({"method": "dora", "block_size": 0, "factors": 4, "transform": "", "backend": ""})
    assert c == Candidate("dora", None, 4, None, None) and c.label == "dora factors=4"
    with pytest.raises(ValueError, match="method='dora' is not supported"):
        c.params(8, 8)
