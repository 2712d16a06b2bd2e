"""circtune.kernels (the triton backend) against the float64 reference: forward, input and kernel gradients.

Without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before the kernel
modules are imported, which is when Triton reads it) at small shapes in fp32, fp16 and fp64; bf16 ``tl.dot`` is
wrong in the interpreter, so bf16 is checked by the GPU tests at real sizes. With CUDA the same small tests run
compiled on the GPU.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch
from reference import (
    assert_close,
    block_circulant_reference,
    c3a_delta_reference,
    layer_delta_reference,
)
from torch import nn

from circtune.adapters import C3ALinear, CDVFTLinear, available_backends, get_backend
from circtune.space import expand, parse_space

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# Before the kernel modules are imported (circtune itself imports neither them nor Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from circtune.kernels import _tuning  # noqa: E402
from circtune.kernels import block_circulant_kernel_grad as kernel_grad_module  # noqa: E402
from circtune.kernels import block_circulant_matmul as matmul_module  # noqa: E402
from circtune.kernels._tuning import TileConfig  # noqa: E402
from circtune.kernels.block_circulant_kernel_grad import (  # noqa: E402
    block_circulant_kernel_grad,
    block_circulant_kernel_grad_reference,
)
from circtune.kernels.block_circulant_linear import (  # noqa: E402
    block_circulant_linear,
    block_circulant_linear_reference,
)
from circtune.kernels.block_circulant_matmul import (  # noqa: E402
    block_circulant_matmul,
    block_circulant_matmul_reference,
    transpose_kernel,
)
from circtune.kernels.triton_backend import MAX_BLOCK_SIZE  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (q_out, q_in, p): odd p, non-square both ways, one block of p = 64 (wider than a tile), p = 24 (not a power of
# two, straddles tiles), many tiny blocks, p = 1 (a plain matrix).
SHAPES = [(2, 3, 5), (3, 2, 16), (1, 1, 64), (4, 3, 24), (6, 5, 3), (5, 4, 1)]
TOKENS = [7, 40]  # neither a multiple of the tile (16 or 32)
# Tolerances relative to each tensor's largest reference value: fp16 rounds operands to 11 bits.
DTYPES = [(torch.float32, 2e-6, 1e-5), (torch.float16, 4e-3, 1e-2)]


def _case(shape, tokens, dtype, with_base):
    q_out, q_in, p = shape
    d_in, d_out = q_in * p, q_out * p
    w = torch.randn(shape, device=DEVICE)
    x = torch.randn(tokens, d_in, device=DEVICE).to(dtype)
    weight = (torch.randn(d_out, d_in, device=DEVICE) / d_in**0.5).to(dtype) if with_base else None
    bias = torch.randn(d_out, device=DEVICE).to(dtype) if with_base else None
    return w, x, weight, bias


def _close(actual, expected, atol, rtol, what):
    assert_close(actual, expected, atol=atol * float(expected.detach().abs().max()), rtol=rtol, what=what)


def _check_linear(w, x, weight, bias, scale, atol, rtol, **configs):
    """Forward, input gradient and kernel gradient of block_circulant_linear against the float64 reference."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = block_circulant_linear(x, w, scale=scale, weight=weight, bias=bias, **configs)
    assert y.dtype == x.dtype
    g = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(g)

    x_ref = x.detach().double().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    matrix = scale * block_circulant_reference(w_ref)
    if weight is not None:
        matrix = matrix + weight.double()
    y_ref = x_ref @ matrix.T + (bias.double() if bias is not None else 0)
    y_ref.backward(g.double())
    _close(y, y_ref, atol, rtol, "forward")
    _close(x.grad, x_ref.grad, atol, rtol, "input gradient")
    assert w.grad.dtype == w.dtype
    _close(w.grad, w_ref.grad, atol, rtol, "kernel gradient")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_reference(shape, tokens, with_base, dtype, atol, rtol):
    """The GEMM kernel-gradient route here (the spectral ones are torch ops: tested below without the kernels)."""
    w, x, weight, bias = _case(shape, tokens, dtype, with_base)
    _check_linear(w, x, weight, bias, 1.0 / x.shape[1], atol, rtol, kernel_grad_route="gemm")


# fp16: the rfft route transforms in fp32 (fp16 tolerance is generous); dft runs its transforms as fp16 GEMMs.
SPECTRAL_DTYPES = [(torch.float32, 2e-6, 1e-5), (torch.float16, 4e-3, 1e-2), (torch.float64, 1e-12, 1e-12)]


@pytest.mark.parametrize("dtype, atol, rtol", SPECTRAL_DTYPES)
@pytest.mark.parametrize("route", ["rfft", "dft"])
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 7), (2, 7, 12)])
def test_spectral_kernel_gradient_op_matches_reference(shape, route, dtype, atol, rtol):
    """The spectral kernel-gradient op against the float64 oracle (the gradient of x · (scale·C(w))ᵀ), odd and
    non-power-of-two p, non-square both ways, up to 35 block pairs (bmm) and down to one (loop)."""
    q_out, q_in, p = shape
    x = torch.randn(13, q_in * p, device=DEVICE).to(dtype)
    g = torch.randn(13, q_out * p, device=DEVICE).to(dtype)
    w_ref = torch.zeros(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    (x.double() @ (0.3 * block_circulant_reference(w_ref)).T).backward(g.double())
    dw = torch.ops.circtune.block_circulant_kernel_grad_spectral(g, x, p, 0.3, route)
    assert dw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dw.isfinite().all()
    _close(dw, w_ref.grad, atol, rtol, f"{route} kernel gradient")


@pytest.mark.parametrize("route", ["rfft", "dft", None])
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 3, 24), (3, 2, 16)])
def test_linear_with_each_kernel_gradient_route_matches_reference(shape, route):
    w, x, weight, bias = _case(shape, 7, torch.float32, True)
    _check_linear(w, x, weight, bias, 0.25, *DTYPES[0][1:], kernel_grad_route=route)


@pytest.mark.parametrize("route", ["rfft", "dft"])
def test_gradcheck_float64_spectral_routes(route):
    kw = {"dtype": torch.float64, "device": DEVICE, "requires_grad": True}
    x, w = torch.randn(3, 3 * 6, **kw), torch.randn(2, 3, 6, **kw)
    assert torch.autograd.gradcheck(lambda x, w: block_circulant_linear(x, w, scale=0.5, kernel_grad_route=route),
                                    (x, w))


def test_kernel_gradient_route_follows_the_rule_and_an_explicit_tile(monkeypatch):
    """Off CUDA: GEMM below p = 8, rfft from 8 on; an explicit kernel-gradient tile means the GEMM route; a route
    that takes no tile refuses one; an unknown route is named."""
    from circtune.kernels import block_circulant_linear as linear_module

    taken = []
    run = linear_module._run_kernel_grad
    monkeypatch.setattr(linear_module, "_run_kernel_grad", lambda route, *a: taken.append(route) or run(route, *a))
    for p, config in ((5, None), (8, None), (24, None), (24, TileConfig(16, 16, 16))):
        w, x, _, _ = _case((2, 3, p), 5, torch.float32, False)
        block_circulant_linear(x.requires_grad_(), w.requires_grad_(), kernel_grad_config=config).sum().backward()
    if DEVICE.type != "cuda":
        assert taken == ["gemm", "rfft", "rfft", "gemm"]
    else:
        assert taken[-1] == "gemm"
    with pytest.raises(ValueError, match=r"kernel_grad_config is a tile of the GEMM route; kernel_grad_route='dft'"):
        block_circulant_linear(x, w, kernel_grad_config=TileConfig(16, 16, 16), kernel_grad_route="dft")
    with pytest.raises(ValueError, match=r"kernel_grad_route='fft' is not supported; valid routes: None"):
        block_circulant_linear(x, w, kernel_grad_route="fft")


def test_select_tile_chooses_among_routes_by_name():
    """autotune_route's selection: the fastest route, a failing one skipped, every reason named when none works."""
    gpu = ("GPU", (9, 0))
    assert _tuning.select_tile((*gpu, "route", 1), ["gemm", "rfft", "dft"],
                               {"gemm": 3.0, "rfft": 1.0, "dft": 2.0}.__getitem__, name=str) == "rfft"

    def failing(route):
        raise RuntimeError(f"{route} broke")

    with pytest.raises(_tuning.NoTileWorks, match=r"gemm: RuntimeError: gemm broke; rfft: RuntimeError: rfft broke"):
        _tuning.select_tile((*gpu, "route", 2), ["gemm", "rfft"], failing, name=str)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_one_block_wider_than_every_tile_not_a_power_of_two(dtype, atol, rtol):
    w, x, weight, bias = _case((1, 1, 96), 33, dtype, True)
    _check_linear(w, x, weight, bias, 1.0 / 96, atol, rtol)


@pytest.mark.parametrize("config", [TileConfig(16, 16, 16), TileConfig(16, 64, 32), TileConfig(64, 16, 16)])
@pytest.mark.parametrize("split", [1, 2, 3, 50])
def test_tile_sizes_and_token_splits(config, split):
    """Every tile shape gives the same answer; ``split`` exercises the atomic path, uneven splits and more splits
    than tokens."""
    w, x, weight, bias = _case((3, 2, 12), 23, torch.float32, True)
    kg = TileConfig(config.block_m, config.block_n, config.block_k, split=split)
    _check_linear(w, x, weight, bias, 0.25, *DTYPES[0][1:], forward_config=config, input_grad_config=config,
                  kernel_grad_config=kg)


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 2, 4)])
def test_gradcheck_float64(shape):
    """The kernels run in fp64 (fp64 tl.dot, fp64 accumulator), so gradcheck applies: x, w, weight and bias."""
    q_out, q_in, p = shape
    kw = {"dtype": torch.float64, "device": DEVICE, "requires_grad": True}
    x = torch.randn(3, q_in * p, **kw)
    w = torch.randn(shape, **kw)
    weight = torch.randn(q_out * p, q_in * p, **kw)
    bias = torch.randn(q_out * p, **kw)
    # scale = 0.5 is exact in fp32 (the kernels take scale as an fp32 scalar).
    assert torch.autograd.gradcheck(lambda *a: block_circulant_linear(*a[:2], scale=0.5, weight=a[2], bias=a[3]),
                                    (x, w, weight, bias))


def test_leading_dims_strided_inputs_and_zero_tokens():
    w = torch.randn(2, 3, 8, device=DEVICE)
    big = torch.randn(2, 5, 48, device=DEVICE)
    x = big[..., ::2]  # [2, 5, 24], non-contiguous last axis
    weight = torch.randn(24, 16, device=DEVICE).T  # [16, 24] as a transposed view
    y = block_circulant_linear(x, w, scale=0.5, weight=weight)
    assert y.shape == (2, 5, 16)
    expected = x.double() @ (0.5 * block_circulant_reference(w) + weight.double()).T
    _close(y, expected, 2e-6, 1e-5, "strided forward")
    empty = torch.zeros(0, 24, device=DEVICE)
    assert block_circulant_matmul(empty, w).shape == (0, 16)
    assert torch.equal(block_circulant_kernel_grad(torch.zeros(0, 16, device=DEVICE), empty, 8),
                       torch.zeros(2, 3, 8, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 2, 12)])
def test_references_beside_the_kernels_match_the_oracle(shape):
    """The pure-torch references shipped with the kernels (the profiling baseline) agree with tests/reference.py,
    and transpose_kernel really is the transpose."""
    q_out, q_in, p = shape
    w = torch.randn(shape, dtype=torch.float64)
    x = torch.randn(6, q_in * p, dtype=torch.float64)
    g = torch.randn(6, q_out * p, dtype=torch.float64)
    assert_close(block_circulant_matmul_reference(x, w, scale=0.3), 0.3 * x @ block_circulant_reference(w).T,
                 atol=1e-12, rtol=1e-12, what="matmul reference")
    assert_close(block_circulant_reference(transpose_kernel(w)), block_circulant_reference(w).T, atol=0, rtol=0,
                 what="transpose_kernel")
    w_ref = w.clone().requires_grad_()
    (x @ block_circulant_reference(w_ref).T).backward(g)
    assert_close(block_circulant_kernel_grad_reference(g, x, p), w_ref.grad, atol=1e-12, rtol=1e-12,
                 what="kernel-gradient reference")
    y = block_circulant_linear_reference(x.view(2, 3, -1), w, scale=0.3)
    assert y.shape == (2, 3, q_out * p)


# --------------------------------------------------------------------------------------------------------- layers


def _layer(method, d_in, d_out, p, factors=2):
    base = nn.Linear(d_in, d_out).to(DEVICE)
    with torch.no_grad():
        base.weight.mul_(0.1)  # keep outputs O(1) so one tolerance means the same for both methods
    if method == "c3a":
        return C3ALinear(base, p, backend="triton", init="gaussian")
    layer = CDVFTLinear(base, p, factors, alpha=0.7, backend="triton")
    with torch.no_grad():  # the last diagonal starts at zero; make every factor count
        for d in layer.diagonals:
            d.normal_()
    return layer


def _check_layer(layer, x, atol, rtol):
    x = x.clone().requires_grad_()
    y = layer(x)
    assert y.dtype == x.dtype
    g = torch.randn(y.shape, dtype=torch.float64, device=DEVICE)
    y.backward(g.to(y.dtype))
    params = {n: p.detach().double().clone().requires_grad_() for n, p in layer.adapter_named_parameters()}
    x_ref = x.detach().double().requires_grad_()
    base = layer.base_layer
    y_ref = x_ref @ (base.weight.double() + layer_delta_reference(layer, params)).T + base.bias.double()
    y_ref.backward(g)
    _close(y, y_ref, atol, rtol, "forward")
    _close(x.grad, x_ref.grad, atol, rtol, "input gradient")
    assert base.weight.grad is None and base.bias.grad is None, "the frozen base layer got a gradient"
    for n, p in layer.adapter_named_parameters():
        _close(p.grad, params[n].grad, atol, rtol, f"gradient of {n}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("method, factors", [("c3a", None), ("cdvft", 2), ("cdvft", 3)])
@pytest.mark.parametrize("d_in, d_out, p", [(96, 48, 24), (40, 60, 20), (32, 32, 32)])
def test_layers_with_triton_backend_match_reference(d_in, d_out, p, method, factors, dtype, atol, rtol):
    layer = _layer(method, d_in, d_out, p, factors or 2)
    layer.base_layer.to(dtype)
    _check_layer(layer, torch.randn(2, 17, d_in, device=DEVICE).to(dtype), atol, rtol)


def test_layer_gradcheck_float64():
    layer = _layer("cdvft", 12, 8, 4).double()
    names = [n for n, _ in layer.adapter_named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.adapter_named_parameters()]
    x = torch.randn(2, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_autocast_runs_the_gemm_in_the_autocast_dtype():
    layer = _layer("c3a", 48, 24, 12)  # fp32 base and kernel, as a model under autocast keeps them
    x = torch.randn(2, 9, 48, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = layer(x)
        assert y.dtype == layer.base_layer(x).dtype == torch.float16, "the GEMM runs in fp16, as F.linear's does"
    base = layer.base_layer
    delta = c3a_delta_reference(layer.kernel.detach(), 48)
    expected = x.detach().double() @ (base.weight.double() + delta).T + base.bias.double()
    _close(y, expected, *DTYPES[1][1:], "autocast forward")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.kernel.grad.dtype == torch.float32


def test_triton_backend_agrees_with_torch_backend_and_merges():
    layer = _layer("c3a", 48, 96, 12)
    x = torch.randn(9, 48, device=DEVICE)
    y = layer(x)
    layer.backend = "torch"
    assert_close(y, layer(x), atol=1e-5, rtol=1e-5, what="triton vs torch backend")
    layer.backend = "triton"
    with torch.no_grad():
        layer.merge()
        assert_close(layer(x), y, atol=1e-5, rtol=1e-5, what="merged")


# -------------------------------------------------------------------------------------------- registry and arguments


def test_backend_registered_and_declares_its_range():
    assert "triton" in available_backends()
    backend = get_backend("triton")
    assert not backend.uses_transform
    assert "need a CUDA device" in backend.unavailable_reason(torch.device("cpu"))
    assert backend.block_size_reason(MAX_BLOCK_SIZE, 1024, 1024) is None
    assert backend.block_size_reason(48, 96, 96) is None  # not a power of two: covered
    assert "declared range" in backend.block_size_reason(2 * MAX_BLOCK_SIZE, 1024, 1024)


def test_search_space_excludes_block_sizes_outside_the_range():
    space = parse_space({"methods": ["c3a"], "block_sizes": [64, 256, 512, 1024], "backends": ["torch", "triton"],
                         "transforms": ["rfft"]})
    # On a CUDA device (the space does not touch it): triton is available, but only up to p = 256.
    candidates, excluded = expand(space, 1024, 1024, "cuda")
    triton_sizes = sorted(c.block_size for c in candidates if c.backend == "triton")
    assert triton_sizes == [64, 256]
    assert sorted(c.block_size for c in candidates if c.backend == "torch") == [64, 256, 512, 1024]
    reasons = {e.block_size: e.reason for e in excluded if e.backend == "triton"}
    assert set(reasons) == {512, 1024} and "declared range p <= 256" in reasons[512]
    # On the CPU the whole backend is out, with the reason, and no per-p noise.
    candidates, excluded = expand(space, 1024, 1024, "cpu")
    assert not any(c.backend == "triton" for c in candidates)
    assert [e.block_size for e in excluded if e.backend == "triton"] == [None]


def test_import_circtune_without_triton():
    """Triton stays optional: without it circtune imports and simply has no triton backend; with it, importing
    circtune does not import Triton (so TRITON_INTERPRET can still be set afterwards)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import circtune\n"
            "assert 'triton' not in circtune.available_backends(), circtune.available_backends()\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    code = "import sys, circtune\nassert 'triton' not in sys.modules\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow  # a child process
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter order matters only without CUDA")
def test_interpreter_works_when_triton_was_imported_first():
    """torch.utils.flop_counter (imported by circtune.measure.flops) imports Triton before TRITON_INTERPRET can be
    set in a full test run: the kernels must still run interpreted (they use only builtins, see _tuning.py)."""
    code = ("import os, torch, torch.utils.flop_counter, sys\n"
            "assert 'triton' in sys.modules\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from circtune.kernels.block_circulant_linear import block_circulant_linear\n"
            "from circtune.kernels.block_circulant_matmul import block_circulant_matmul_reference\n"
            "x, w = torch.randn(5, 12, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)\n"
            "block_circulant_linear(x, w, scale=0.5).sum().backward()\n"
            "expected = block_circulant_matmul_reference(x.detach(), w.detach(), scale=0.5)\n"
            "assert torch.allclose(block_circulant_linear(x, w, scale=0.5), expected, atol=1e-5)\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_launcher_argument_checks(monkeypatch):
    w = torch.randn(2, 3, 4, device=DEVICE)
    x = torch.randn(5, 12, device=DEVICE)
    with pytest.raises(ValueError, match=r"block_m must be a power of two >= 16, got 24"):
        block_circulant_matmul(x, w, config=TileConfig(24, 16, 16))
    with pytest.raises(ValueError, match=r"block_k must be a power of two >= 16, got 8"):
        block_circulant_matmul(x, w, config=TileConfig(16, 16, 8))
    with pytest.raises(ValueError, match=r"num_warps must be a power of two >= 1, got 3"):
        block_circulant_matmul(x, w, config=TileConfig(16, 16, 16, num_warps=3))
    with pytest.raises(ValueError, match=r"num_stages must be an int >= 1, got 0"):
        block_circulant_matmul(x, w, config=TileConfig(16, 16, 16, num_stages=0))
    with pytest.raises(ValueError, match=r"split must be None or an int >= 1, got 0"):
        block_circulant_kernel_grad(torch.randn(5, 8, device=DEVICE), x, 4, config=TileConfig(16, 16, 16, split=0))
    with pytest.raises(ValueError, match=r"kernel of shape \(2, 3, 4\) does not fit a of shape \(5, 10\)"):
        block_circulant_matmul(torch.randn(5, 10, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"w must have shape \[q_out, q_in, p\], got \(6, 4\)"):
        block_circulant_matmul(x, w.reshape(6, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \[q_out \* p, q_in \* p\] = \(8, 12\), "
                                         r"got \(12, 8\)"):
        block_circulant_matmul(x, w, weight=torch.randn(12, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must have shape \[8\], got \(12,\)"):
        block_circulant_matmul(x, w, bias=torch.randn(12, device=DEVICE))
    with pytest.raises(ValueError, match=r"a must be float32, bfloat16, float16 or float64, got torch.int64"):
        block_circulant_matmul(x.long(), w)
    with pytest.raises(ValueError, match=r"block_size=5 must divide both g's width 8 and x's width 12"):
        block_circulant_kernel_grad(torch.randn(5, 8, device=DEVICE), x, 5)
    with pytest.raises(ValueError, match=r"same number of tokens, got shapes \(4, 8\) and \(5, 12\)"):
        block_circulant_kernel_grad(torch.randn(4, 8, device=DEVICE), x, 4)
    with pytest.raises(ValueError, match=r"does not fit input of shape \(5, 10\)"):
        block_circulant_linear(torch.randn(5, 10, device=DEVICE), w)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"Triton kernels need CUDA tensors, got tensors on cpu; TRITON_INTERPRET"):
            block_circulant_matmul(x, w)


# ----------------------------------------------------------------------------------------- autotune (CPU-testable)


def _tile_timer(times: dict, failures: dict):
    def time(config):
        if config in failures:
            raise failures[config]
        return times[config]
    return time


def test_select_tile_takes_the_fastest_and_skips_a_tile_that_fails_for_any_reason(caplog):
    a, b, c, d = (TileConfig(16, 16, 16), TileConfig(32, 32, 32), TileConfig(64, 64, 32), TileConfig(16, 64, 32))
    gpu = ("NVIDIA H200", (9, 0))
    failures = {a: RuntimeError("PassManager::run failed\nmore detail"),
                d: triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")}
    time = _tile_timer({b: 2e-3, c: 1e-3}, failures)
    with caplog.at_level(logging.INFO, logger=_tuning.__name__):
        assert _tuning.select_tile((*gpu, "op", 1), [a, b, c, d], time) == c
        # Another problem on the same GPU: the same failures are not logged again.
        assert _tuning.select_tile((*gpu, "op", 2), [a, b, d], _tile_timer({b: 1.0}, failures)) == b
    skipped = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(skipped) == 2, skipped
    assert skipped[0][0] == logging.WARNING and "16x16x16 warps=4 stages=3" in skipped[0][1] \
        and "RuntimeError: PassManager::run failed" in skipped[0][1]
    # Too little shared memory on a smaller GPU is expected: logged, but as information.
    assert skipped[1][0] == logging.INFO and "OutOfResources" in skipped[1][1]
    # A NaN or infinite time cannot be ranked: that tile is skipped too.
    assert _tuning.select_tile((*gpu, "op", 3), [a, b, c], _tile_timer({b: float("nan"), c: 5.0}, failures)) == c


def test_select_tile_lets_out_of_memory_through_and_names_every_reason_when_nothing_works():
    a, b = TileConfig(16, 16, 16), TileConfig(32, 32, 32)
    key = ("NVIDIA A100", (8, 0), "block_circulant_matmul", torch.bfloat16, 4096)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _tuning.select_tile(key, [a, b], _tile_timer({b: 1.0}, {a: oom}))
    failures = {a: RuntimeError("ptxas fatal"), b: ValueError("bad\nsecond line")}
    with pytest.raises(_tuning.NoTileWorks) as info:
        _tuning.select_tile(key, [a, b], _tile_timer({}, failures))
    message = str(info.value)
    assert "block_circulant_matmul" in message and "NVIDIA A100" in message and "4096" in message
    assert "16x16x16 warps=4 stages=3: RuntimeError: ptxas fatal" in message
    assert "32x32x32 warps=4 stages=3: ValueError: bad" in message and "second line" not in message


def test_autotune_keys_separate_call_sites_precision_and_dtypes(monkeypatch):
    """A square layer's forward and input gradient, TF32 on and off, and fp16 against fp32 are tuned separately:
    each compiles to a different kernel, so each needs its own tile."""
    keys = []

    def record(key, candidates, bench, device):
        keys.append(key)
        return candidates[0]

    monkeypatch.setattr(matmul_module, "autotune", record)
    monkeypatch.setattr(kernel_grad_module, "autotune", record)
    w, x, weight, bias = _case((3, 3, 8), 40, torch.float32, True)
    tf32_before = torch.backends.cuda.matmul.allow_tf32  # (a property monkeypatch cannot restore)
    try:
        for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            xd = x.to(dtype).requires_grad_()
            block_circulant_linear(xd, w.clone().requires_grad_(), weight=weight.to(dtype), bias=bias.to(dtype),
                                   kernel_grad_route="gemm").sum().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    assert len(keys) == 9  # forward, input gradient, kernel gradient, three times
    forward, input_grad, kernel_grad = keys[0], keys[1], keys[2]
    assert forward != input_grad, "a square layer's forward and input gradient share a key"
    assert "ieee" in forward and "tf32" in keys[3] and keys[3:6] != keys[0:3] and kernel_grad != keys[5]
    assert torch.float16 in keys[6] and set(keys[6:9]).isdisjoint(keys[0:6])
    assert len(set(keys)) == 9


def test_cuda_tile_lists_depend_on_dtype_and_precision():
    half = matmul_module.cuda_configs(torch.bfloat16, "ieee")
    assert matmul_module.cuda_configs(torch.float16, "ieee") == half
    ieee, tf32 = matmul_module.cuda_configs(torch.float32, "ieee"), matmul_module.cuda_configs(torch.float32, "tf32")
    fp64 = matmul_module.cuda_configs(torch.float64, "ieee")
    assert len({half, ieee, tf32, fp64}) == 4
    # FMA-unit dots (ieee fp32, fp64) hold operand fragments in registers: small K tiles only.
    assert all(c.block_k <= 32 and c.block_m * c.block_n <= 128 * 64 for c in ieee + fp64)
    for q_out, rows in ((3, 16), (32, 32), (192, 128)):
        for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"),
                                 (torch.float64, "ieee")):
            tiles = kernel_grad_module.cuda_configs(q_out, dtype, precision)
            # Never more rows than q_out needs (padding); duplicates from the clamping removed.
            assert tiles and len(set(tiles)) == len(tiles) and all(c.block_m <= rows for c in tiles)
            assert all(c.check("kernel_grad") for c in tiles)
        assert max(c.block_m for c in kernel_grad_module.cuda_configs(q_out, torch.bfloat16, "ieee")) == rows
    assert not any(c.block_k > 32 for c in kernel_grad_module.cuda_configs(192, torch.float32, "ieee"))


# ---------------------------------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4096 + 3])
@pytest.mark.parametrize("d_in, d_out, p", [(1024, 1024, 64), (1024, 4096, 256), (768, 3072, 48), (4096, 1024, 32)])
def test_gpu_bf16_real_sizes(d_in, d_out, p, tokens):
    w, x, weight, bias = _case((d_out // p, d_in // p, p), tokens, torch.bfloat16, True)
    _check_linear(w, x, weight, bias, 1.0 / d_in, 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["c3a", "cdvft"])
def test_gpu_bf16_layers(method):
    layer = _layer(method, 1024, 1024, 128)
    layer.base_layer.to(torch.bfloat16)
    _check_layer(layer, torch.randn(8, 512, 1024, device=DEVICE).to(torch.bfloat16), 2e-2, 2e-2)
