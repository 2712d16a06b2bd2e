"""FLOP counts (fvcore forward, FlopCounterMode forward + backward) against the closed forms in measure.flops."""

import importlib.util
import math
import os

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from circtune import C3ALinear, CDVFTLinear
from circtune.measure.flops import FLOP_COUNTER_FORMULAS, FVCORE_HANDLES, analytic_flops, count_flops

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny layers: see conftest.one_thread

# Before the kernel modules are imported (the triton rows below), as in tests/test_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# d_in=48, d_out=96: q_out·q_in = 512, 288, 128, 32, 18 block pairs (complex bmm) for p = 3..16 and 8, 2 (the
# multiply-add loop) for p = 24, 48; CDVFT's second product has 4 and 16 pairs there. p = 3, 6, 12, 24, 48 are
# not powers of two.
BLOCK_SIZES = [3, 4, 6, 12, 16, 24, 48]
PATHS = [("torch", "rfft"), ("torch", "fft"), ("torch", "dft"), ("dense", "rfft")]
# (input shape, d_in, d_out): token counts that are not powers of two, a 3-D input, both aspect ratios.
INPUTS = [((5, 48), 48, 96), ((2, 3, 96), 96, 48)]


def _approx(expected):
    return pytest.approx(expected, rel=0.01)


def _assert_counts(counted, expected):
    assert counted.fwd == _approx(expected.fwd), f"forward: counted {counted.fwd}, closed form {expected.fwd}"
    assert counted.fwd_bwd == _approx(expected.fwd_bwd), \
        f"forward + backward: counted {counted.fwd_bwd}, closed form {expected.fwd_bwd}"


def _inputs(shape, d_out):
    return torch.randn(shape, requires_grad=True), torch.randn(*shape[:-1], d_out)


def _make(method, d_in, d_out, p, backend, transform, factors):
    base = nn.Linear(d_in, d_out)
    if method == "c3a":
        return C3ALinear(base, p, transform=transform, backend=backend, init="gaussian")
    return CDVFTLinear(base, p, factors, transform=transform, backend=backend)


class _LoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x)) * 0.5


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# The dense route's count does not depend on p (ΔW is gathered, not computed): three block sizes are enough.
GRID = [(backend, transform, p) for backend, transform in PATHS for p in BLOCK_SIZES
        if backend == "torch" or p in (3, 16, 48)]


@pytest.mark.parametrize("method,factors", [("c3a", None), ("cdvft", 2), ("cdvft", 3)])
@pytest.mark.parametrize("backend,transform,p", GRID)
def test_adapter_counts_match_closed_form(method, factors, backend, transform, p):
    shape, d_in, d_out = INPUTS[0]
    layer = _make(method, d_in, d_out, p, backend, transform, factors)
    x, g = _inputs(shape, d_out)
    expected = analytic_flops(method, d_in, d_out, 5, block_size=p, factors=factors, transform=transform,
                              backend=backend)
    _assert_counts(count_flops(layer, x, g), expected)


# 96 -> 48 with p = 12: 32 block pairs (bmm) in the first product, 16 (loop) in CDVFT's second.
@pytest.mark.parametrize("method,factors", [("c3a", None), ("cdvft", 3)])
@pytest.mark.parametrize("backend,transform", PATHS)
def test_adapter_counts_wide_to_narrow_3d_input(method, factors, backend, transform):
    shape, d_in, d_out = INPUTS[1]
    layer = _make(method, d_in, d_out, 12, backend, transform, factors)
    x, g = _inputs(shape, d_out)
    expected = analytic_flops(method, d_in, d_out, 6, block_size=12, factors=factors, transform=transform,
                              backend=backend)
    _assert_counts(count_flops(layer, x, g), expected)


@pytest.mark.parametrize("shape,d_in,d_out", INPUTS)
def test_base_layer_and_lora_match_closed_form(shape, d_in, d_out):
    tokens = math.prod(shape[:-1])
    x, g = _inputs(shape, d_out)
    _assert_counts(count_flops(nn.Linear(d_in, d_out).requires_grad_(False), x, g),
                   analytic_flops("none", d_in, d_out, tokens))
    _assert_counts(count_flops(_LoRA(nn.Linear(d_in, d_out), 4), x, g),
                   analytic_flops("lora", d_in, d_out, tokens, rank=4))


@pytest.mark.parametrize("p", [6, 24])
def test_peft_c3a_is_counted_inside_its_autograd_function(p):
    peft = pytest.importorskip("peft")
    from peft.tuners.c3a.layer import C3ALinear as PeftC3ALinear

    shape, d_in, d_out = INPUTS[0]
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = PeftC3ALinear(base, "default", peft.C3AConfig(block_size=p, init_weights="gaussian"), p)
    x, g = _inputs(shape, d_out)
    counted = count_flops(layer, x, g)
    _assert_counts(counted, analytic_flops("peft-c3a", d_in, d_out, 5, block_size=p))
    # PEFT runs our transform="fft" algorithm on the bmm path, without our kernel-scale multiplies
    # (6·q_out·q_in·p FLOPs: a few percent at 5 tokens). p = 24 takes our loop path: within 5% all the same.
    ours = analytic_flops("c3a", d_in, d_out, 5, block_size=p, transform="fft")
    assert counted.fwd == pytest.approx(ours.fwd, rel=0.05)
    assert counted.fwd_bwd == pytest.approx(ours.fwd_bwd, rel=0.05)
    assert counted.fwd > analytic_flops("none", d_in, d_out, 5).fwd


# fn, input dtype, input length, transform length n, real (2.5 n log2 n) or complex (5 n log2 n)
FFTS = [(torch.fft.fft, torch.complex64, 12, 12, False), (torch.fft.ifft, torch.complex64, 8, 8, False),
        (torch.fft.fft, torch.float32, 12, 12, True), (torch.fft.rfft, torch.float32, 12, 12, True),
        (lambda v: torch.fft.irfft(v, n=12), torch.complex64, 7, 12, True)]


@pytest.mark.parametrize("fn,dtype,length,n,real", FFTS)
def test_fft_handles_count_nominal_flops(fn, dtype, length, n, real):
    x = torch.randn(3, 4, length, dtype=dtype)
    expected = 12 * (2.5 if real else 5.0) * n * math.log2(n)  # 12 transforms
    analysis = (FlopCountAnalysis(_Fn(fn), (x,)).set_op_handle(**FVCORE_HANDLES)
                .unsupported_ops_warnings(False).uncalled_modules_warnings(False))
    assert 2 * analysis.total() == pytest.approx(expected)
    with FlopCounterMode(display=False, custom_mapping=dict(FLOP_COUNTER_FORMULAS)) as counter:
        fn(x)
    assert counter.get_total_flops() == pytest.approx(expected)


def test_complex_arithmetic_conventions():
    a, b = torch.randn(4, 5, dtype=torch.complex64), torch.randn(4, 5, dtype=torch.complex64)
    r = torch.randn(4, 5)
    cases = [(lambda: a * b, 6 * 20), (lambda: a * r, 2 * 20), (lambda: a * 0.5, 2 * 20), (lambda: a + b, 2 * 20),
             (lambda: a.sum(0), 2 * 15), (lambda: torch.bmm(a[None], b.T[None]), 8 * 4 * 5 * 4),
             (lambda: r * r + r, 0)]
    for fn, expected in cases:
        with FlopCounterMode(display=False, custom_mapping=dict(FLOP_COUNTER_FORMULAS)) as counter:
            fn()
        assert counter.get_total_flops() == expected


def test_count_flops_leaves_no_grad_behind():
    layer = _make("cdvft", 48, 96, 12, "torch", "rfft", 3)
    x, g = _inputs((5, 48), 96)
    kept = torch.ones(48)
    layer.diagonals[0].grad = kept
    count_flops(layer, x, g)
    assert x.grad is None
    assert layer.diagonals[0].grad is kept and torch.equal(kept, torch.ones(48))
    assert all(p.grad is None for n, p in layer.named_parameters() if n != "diagonals.0")


def test_tracing_does_not_grow_the_circulant_index_cache():
    from circtune.adapters._circulant import _circulant_index_cpu

    layer = _make("cdvft", 48, 96, 12, "dense", "rfft", 3)
    x, g = _inputs((5, 48), 96)
    count_flops(layer, x, g)
    size = _circulant_index_cpu.cache_info().currsize
    count_flops(layer, x, g)
    assert _circulant_index_cpu.cache_info().currsize == size


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("backend,transform", PATHS)
def test_traced_layer_shows_its_ops_and_computes_the_same(backend, transform):
    layer = _make("c3a", 48, 96, 12, backend, transform, None)
    x = torch.randn(5, 48)
    traced = torch.jit.trace(layer, (x,), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds
    if backend == "torch":
        # dft: the transforms are GEMMs against the bases (aten::matmul), the mixing four bmm.
        ops = {"aten::matmul"} if transform == "dft" else {f"aten::fft_{transform}"}
        assert ops | {"aten::bmm"} <= kinds
    torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "vera"}, r"method='vera' is not supported"),
    ({"method": "lora"}, r"rank=None is not valid for method='lora'"),
    ({"method": "c3a", "block_size": 5}, r"block_size=5 does not divide"),
    ({"method": "cdvft", "block_size": 4, "backend": "cuda"}, r"backend='cuda' has no closed form; valid backends: "
                                                             r"torch, dense, triton"),
    ({"method": "c3a", "block_size": 4, "transform": "dct"}, r"transform='dct' is not supported"),
])
def test_analytic_flops_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        analytic_flops(d_in=48, d_out=96, tokens=5, **kwargs)


@pytest.mark.parametrize("route", ["gemm", "rfft", "dft"])
@pytest.mark.parametrize("method,factors", [("c3a", None), ("cdvft", 2), ("cdvft", 3)])
@pytest.mark.parametrize("shape,d_in,d_out,p", [((5, 48), 48, 96, 16), ((2, 3, 96), 96, 48, 24)])
def test_triton_kernels_are_counted_by_every_counter(method, factors, shape, d_in, d_out, p, route, monkeypatch):
    """The kernels are custom ops with FLOP formulas: FlopCounterMode counts them exactly as the closed form says
    (a bare launch would count 0, and the row's 'added' FLOPs would be negative), for each kernel-gradient route the
    backward takes; fvcore's forward trace runs the plain-torch product, which counts the same. Under the
    interpreter on the CPU, compiled on a GPU."""
    pytest.importorskip("triton")
    from circtune.kernels import block_circulant_linear as linear_module

    monkeypatch.setattr(linear_module, "choose_kernel_grad_route", lambda *args: route)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = _make(method, d_in, d_out, p, "triton", "rfft", factors or 2).to(device)
    x, g = (t.to(device) for t in _inputs(shape, d_out))
    tokens = math.prod(shape[:-1])
    expected = analytic_flops(method, d_in, d_out, tokens, block_size=p, factors=factors, backend="triton",
                              kernel_grad_route=route)
    counted = count_flops(layer, x, g)
    assert (counted.fwd, counted.fwd_bwd) == (expected.fwd, expected.fwd_bwd)
    with FlopCounterMode(display=False) as counter:  # a counter of one's own, no custom mapping
        layer(x).backward(g)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    kgrad_op = "circtune.block_circulant_kernel_grad" + ("" if route == "gemm" else "_spectral")
    assert {"circtune.block_circulant_linear", "circtune.block_circulant_input_grad", kgrad_op} <= ops
    assert counter.get_total_flops() == expected.fwd_bwd
    none = analytic_flops("none", d_in, d_out, tokens)
    assert expected.fwd_bwd > none.fwd_bwd and expected.fwd >= none.fwd  # never negative "added" FLOPs


def test_kernel_gradient_route_rules_agree_and_spectral_is_cheaper_where_taken():
    """The closed forms' rules are the modules' rules, and where a rule takes a spectral route its FLOPs are below
    the GEMM form's (at every p >= 8 for the layer sizes of a real model)."""
    from circtune.adapters import _circulant
    from circtune.measure import flops

    assert flops.SPECTRAL_MIN_P == _circulant.DENSE_SPECTRAL_MIN_P
    if importlib.util.find_spec("triton") is not None:
        from circtune.kernels import block_circulant_linear as linear_module

        assert linear_module.SPECTRAL_MIN_P == flops.SPECTRAL_MIN_P
        assert [linear_module.default_kernel_grad_route(p) for p in (1, 4, 7, 8, 12)] == \
            ["gemm", "gemm", "gemm", "rfft", "rfft"]
    for p in (8, 16, 64, 128, 1024):
        q = 4096 // p
        gemm = flops.spectral_kernel_grad_flops(4096, q, q, p, "gemm")
        assert gemm == 2 * 4096 * 4096 * 4096
        # rfft: 0.31 of the GEMM's FLOPs at p = 8, 0.02 at p = 128; dft (O(p) transforms): 0.32 and 0.08, 0.5 at 1024
        assert flops.spectral_kernel_grad_flops(4096, q, q, p, "rfft") < 0.35 * gemm
        assert flops.spectral_kernel_grad_flops(4096, q, q, p, "dft") < 0.55 * gemm
    with pytest.raises(ValueError, match=r"transform='fft' is not supported; valid kernel-gradient routes"):
        flops.spectral_kernel_grad_flops(8, 2, 2, 4, "fft")


def test_triton_custom_ops_pass_torch_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the three ops, as torch's own
    checker sees them (fp64 on the interpreter; compiled on a GPU)."""
    pytest.importorskip("triton")
    from circtune.kernels import block_circulant_linear  # noqa: F401  (defines the ops)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"dtype": torch.float64, "device": device}
    x, w = torch.randn(7, 12, **kw, requires_grad=True), torch.randn(2, 3, 4, **kw, requires_grad=True)
    weight, bias, g = torch.randn(8, 12, **kw), torch.randn(8, **kw), torch.randn(7, 8, **kw)
    ops = torch.ops.circtune
    for route in ("", "gemm", "rfft", "dft"):
        torch.library.opcheck(ops.block_circulant_linear.default, (x, w, 0.5, weight, bias, [], [], [], route))
    torch.library.opcheck(ops.block_circulant_input_grad.default, (g, w.detach(), 0.5, weight, []))
    torch.library.opcheck(ops.block_circulant_kernel_grad.default, (g, x.detach(), 4, 0.5, [16, 32, 32, 4, 1, 2]))
    # Spectral kernel gradient: 6 block pairs (loop) and 30 (bmm); under AOT dispatch (torch.compile) a lazy conj
    # view inside the op would be lost, which this catches.
    g2, x2 = torch.randn(7, 40, **kw), torch.randn(7, 48, **kw)
    for transform in ("rfft", "dft"):
        torch.library.opcheck(ops.block_circulant_kernel_grad_spectral.default, (g, x.detach(), 4, 0.5, transform))
        torch.library.opcheck(ops.block_circulant_kernel_grad_spectral.default, (g2, x2, 8, 0.5, transform))
