"""Independent float64 references for the tests: ΔW built by index arithmetic (torch.roll), never by circtune."""

from __future__ import annotations

import torch


def circulant_block_rows(v: torch.Tensor) -> torch.Tensor:
    """``[..., p] -> [..., p, p]`` with row u = v rolled right by u, i.e. ``C[u, t] = v[(t - u) mod p]``."""
    p = v.shape[-1]
    return torch.stack([torch.roll(v, shifts=u, dims=-1) for u in range(p)], dim=-2)


def block_circulant_reference(w: torch.Tensor) -> torch.Tensor:
    """Dense ``[q_out·p, q_in·p]`` float64 matrix of kernel ``w[q_out, q_in, p]`` (differentiable through roll)."""
    q_out, q_in, p = w.shape
    blocks = circulant_block_rows(w.double())  # [q_out, q_in, p(u), p(t)]
    return blocks.permute(0, 2, 1, 3).reshape(q_out * p, q_in * p)


def c3a_delta_reference(kernel: torch.Tensor, d_in: int) -> torch.Tensor:
    return block_circulant_reference(kernel) / d_in


def cdvft_delta_reference(diagonals, circulants, alpha: float) -> torch.Tensor:
    """``α · D_m C_{m−1} D_{m−1} ⋯ C_1 D_1`` as dense float64 matrices multiplied out."""
    delta = block_circulant_reference(circulants[0]) * diagonals[0].double()  # C_1 D_1: scale the columns
    for k in range(1, len(circulants)):
        delta = block_circulant_reference(circulants[k]) @ (diagonals[k].double().unsqueeze(1) * delta)
    return alpha * diagonals[-1].double().unsqueeze(1) * delta


def layer_delta_reference(layer, params) -> torch.Tensor:
    """ΔW of a C3A or CDVFT layer from its named float64 parameters (``kernel``, or ``diagonals.k`` and
    ``circulants.k``), built by the index arithmetic above."""
    if hasattr(layer, "kernel"):
        return c3a_delta_reference(params["kernel"], layer.in_features)
    m = layer.factors
    return cdvft_delta_reference([params[f"diagonals.{k}"] for k in range(m)],
                                 [params[f"circulants.{k}"] for k in range(m - 1)], layer.alpha)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    """allclose with a message that says where and by how much, and NaN never passes."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the result"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any():
        flat = int((err - bound).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"max abs err {float(err.max()):.3e}; worst at {idx}: got {float(actual[idx]):.6g}, "
            f"expected {float(expected[idx]):.6g}")
