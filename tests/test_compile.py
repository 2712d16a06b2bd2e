"""circtune's adapter layers under ``torch.compile``: outputs and gradients equal eager's, on every CPU path.

One small model holds a layer for every (method, transform, backend) path at each shape, all non-square with block
sizes that are not powers of two or small: 24x36 at p = 12 (6 block pairs: the broadcast-multiply mixing; the dense
backend's spectral kernel gradient), 64x96 at p = 8 (96 pairs: frequency-major bmm mixing and spectral kernel
gradient) and 48x60 at p = 6 (80 pairs; the dense backend's GEMM-form kernel gradient below p = 8). It is compiled
once with ``fullgraph=True`` (a graph break is an error here, so none creeps back in), then a forward and backward
are compared with the same model run eagerly. The fast test compiles the first two shapes with ``aot_eager``
(Dynamo's capture and AOTAutograd's functionalized forward and backward, where a hand-written ``autograd.Function``
or a conjugate view would break); the slow one all three with Inductor, which also generates the C++ code (minutes
of compilation on a 2-core CPU).

The ``triton`` backend is not here: its kernels need a CUDA device (off CUDA only Triton's interpreter runs them,
which is for correctness tests, not a compile target); its custom ops pass ``torch.library.opcheck``
(tests/test_flops.py), and the ``gpu`` test below compiles it on a GPU.
"""

import copy

import pytest
import torch
from torch import nn

from circtune.adapters import C3ALinear, CDVFTLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

PATHS = [("c3a", "rfft", "torch"), ("c3a", "fft", "torch"), ("c3a", "dft", "torch"), ("c3a", "rfft", "dense"),
         ("cdvft", "rfft", "torch"), ("cdvft", "dft", "torch"), ("cdvft", "rfft", "dense")]
SHAPES = [(24, 36, 12), (64, 96, 8), (48, 60, 6)]  # (d_in, d_out, p)
FAST_SHAPES = SHAPES[:2]  # compile time grows with the layers: the fast test leaves out the p = 6 GEMM-form route


class AllPaths(nn.Module):
    """Every path's layer applied to the input of its width; the outputs concatenated."""

    def __init__(self, paths, shapes, device: str = "cpu"):
        super().__init__()
        self.layers = nn.ModuleList()
        for method, transform, backend in paths:
            for d_in, d_out, p in shapes:
                base = nn.Linear(d_in, d_out)
                layer = (C3ALinear(base, p, transform=transform, backend=backend, init="gaussian")
                         if method == "c3a" else CDVFTLinear(base, p, factors=3, transform=transform, backend=backend))
                with torch.no_grad():  # non-trivial adapters: CDVFT's default initialisation makes ΔW zero
                    for name, param in layer.adapter_named_parameters():
                        param.normal_(0.0, 1.0 if name.startswith("diag") else 0.3)
                self.layers.append(layer)
        self.to(device)

    def forward(self, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([layer(inputs[layer.in_features]).flatten() for layer in self.layers])


def _step(model: nn.Module, run, inputs: dict[int, torch.Tensor], weights: torch.Tensor):
    """``run`` (the model or its compiled form) forward and backward; ``model``'s gradients by name."""
    y = run(inputs)
    (y * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads, {d: x.grad for d, x in inputs.items()}


def _inputs(shapes, device: str):
    return {d_in: torch.randn(2, 5, d_in, device=device) for d_in, _, _ in shapes}


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: max |compiled - eager| {err:.2e} against max |eager| {scale:.2e}"


def _compare(backend: str, paths, shapes=SHAPES, device: str = "cpu") -> None:
    torch._dynamo.reset()
    model = AllPaths(paths, shapes, device)
    eager = copy.deepcopy(model)
    inputs = _inputs(shapes, device)
    weights = torch.randn(sum(2 * 5 * d_out for _, d_out, _ in shapes) * len(paths), device=device)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y, grads, dx = _step(model, compiled, {d: x.clone().requires_grad_() for d, x in inputs.items()}, weights)
    y_ref, grads_ref, dx_ref = _step(eager, eager, {d: x.clone().requires_grad_() for d, x in inputs.items()}, weights)
    _close(y, y_ref, "output")
    assert grads.keys() == grads_ref.keys() and all(g is not None for g in grads.values())
    for name in grads:
        _close(grads[name], grads_ref[name], f"gradient of {name}")
    for d in dx:
        _close(dx[d], dx_ref[d], f"input gradient (width {d})")


def test_every_cpu_path_compiles_without_graph_breaks_and_matches_eager():
    _compare("aot_eager", PATHS, FAST_SHAPES)


@pytest.mark.slow  # Inductor compiles C++ for every graph: minutes on a 2-core CPU
def test_every_cpu_path_matches_eager_under_inductor():
    _compare("inductor", PATHS)


@pytest.mark.gpu
def test_every_path_and_triton_match_eager_under_inductor_on_cuda():
    _compare("inductor", [*PATHS, ("c3a", "rfft", "triton"), ("cdvft", "rfft", "triton")], SHAPES, "cuda")
