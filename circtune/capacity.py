"""Capacity: the share of a layer's full-weight gradient that an adapter configuration can express.

For a frozen ``nn.Linear`` with weight gradient ``G = Σ_tokens g xᵀ`` (``[d_out, d_in]``), an update ``ΔW`` taken
from the set ``S`` of updates a configuration can make lowers the loss, to first order, by ``⟨G, ΔW⟩``; over unit
updates in ``S`` the best rate is ``‖Π_S(G)‖`` where Π_S is the best approximation of ``G`` in ``S``. The
*captured fraction* ``‖Π_S(G)‖² / ‖G‖²`` in [0, 1] is therefore what the configuration makes available of the
layer's gradient, and weighting it by the layer's share of ``Σ_l ‖G_l‖²`` makes scores add up over layers (an
assignment's capacity is the sum of its layers' scores, so the exact knapsack still applies).

The sets, by method:

* ``c3a`` / ``peft-c3a`` at block size p: every block-circulant matrix with p × p blocks, a linear space of
  dimension ``d_in·d_out/p``. circtune's blocks are ``C(v)[u, t] = v[(t − u) mod p]`` (PEFT's orientation); the
  orthogonal projection replaces each entry of a block by the mean of its circulant diagonal ``(t − u) mod p``.
  (The transposed convention ``v[(u − t) mod p]`` is the same set of blocks — each such block is a circulant of
  the other kind with its kernel re-indexed — so the energy is the same for either.) At zero init this is what
  the C3A kernel gradient computes: ``∂L/∂w[i, j, s] = scale · Σ_diagonal s of block (i, j) G``, hence
  ``‖∂L/∂w‖² = p · scale² · ‖P_p(G)‖²`` (scale = the layer's ``1/d_in``).
* ``lora`` at rank r (``Candidate.factors``): matrices of rank ≤ r; by Eckart–Young the top-r singular energy.
* ``cdvft`` with m factors at block size p: ``ΔW = D_m C_{m−1} D_{m−1} ⋯ C_1 D_1`` (diagonals D, block-circulant C
  of block p; α and scales are absorbed). Not a linear set, so it is fitted by least squares, deterministically
  (seeded), in float32 on G scaled to unit RMS, on the CPU:

  - m = 2 by alternating least squares (``als_cdvft2`` in :mod:`circtune._capacity_fit`, which holds the fits'
    numerics): each of D_2, D_1, C_1 in turn has a closed-form least-squares update given the others, so the fit
    never gets worse; it starts at the C3A projection with D = 1 and stops when a sweep gains less than
    ``1e-4·‖G‖²`` or after 15 sweeps.
  - m ≥ 3 (``refine_cdvft``) starts from the (m − 1) fit with the new factors at the identity (slightly
    perturbed, seeded, to leave that saddle) and takes :data:`CDVFT_STEPS` Adam steps on all factors (the circulant
    products through the real FFT), keeping the best iterate. Each m captures at least what m − 1 does.
  - Cost cap: fits run on strided sub-blocks of G (every k-th block row and column, same p): the fraction is
    C3A's exact share on the whole of G, plus the m = 2 fit's gain over C3A's projection on a sub-block of at most
    512 × 512 entries, plus (m ≥ 3) the m-factor fit's gain over the 2-factor one on a sub-block of at most
    :data:`CDVFT_FIT_ENTRIES` (128 × 128) entries, clamped to [C3A's share, 1]. Where a sub-block is the whole of G
    (small layers), its term is the fit itself. A single block larger than a sub-block's cap is fitted whole with
    fewer ALS sweeps and Adam steps, in proportion (at least 4 and 5); one larger than 1024 × 1024 (p > 1024) is
    not fitted (CDVFT's share is C3A's there). Measured on this project's shared 2-core CPU under a load of ~6
    (1024 × 1024 layer, all 18 (p, m) of the default space, p = 32 … 1024, m = 2, 3, 4): 16 s of CPU, 30 s wall;
    0.3–0.5 s CPU for each m = 2 fit, 0.6–2.9 s for each m ≥ 3 (C3A's projection: 0.01–0.04 s per p).

  What this is not: the optimum. ALS stops in a local optimum (a CDVFT update with positive diagonals, as a
  trained CDVFT's are near their init of one, is recovered whole; one with mixed-sign diagonals can stop at
  0.75–0.99 in the tests' small shapes); the Adam refinement is short (a Gaussian 512 × 512 G at p = 32: m = 3
  reaches 0.106 after 25 steps, 0.136 after 150); and the sub-block keeps the circulants' ``d²/p`` share of the
  dimension but not structure of absolute size (a gradient of rank k is relatively richer in a smaller block).
  Measured on a 1024 × 1024 rank-16-plus-noise G at p = 32: m = 2 is 0.094 here against 0.086 from the
  full-size fit, m = 3 is 0.20 against 0.50 (the same steps). Read CDVFT's fractions at m ≥ 3 as conservative.
* ``none``: 0.

Without data (built-in models have random weights) :func:`uniform_fraction` gives the expected share for an
isotropic Gaussian ``G``: exactly ``dim/N`` for linear sets (C3A: ``1/p``), and a seeded estimate for LoRA and CDVFT.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ._capacity_fit import FIT_SEED, als_cdvft2, diagonal_sums, refine_cdvft
from .adapters.methods import find_method, get_method, method_names
from .candidate import Candidate
from .models import TargetLayer

# ALS for CDVFT m = 2: at most this many sweeps; Adam refinement for m >= 3: this many steps per extra factor pair.
_ALS_SWEEPS = 15
CDVFT_STEPS = 25
# CDVFT fits run on a strided sub-block of G (every k-th block row and column, same p) of at most this many
# entries (never less than one p x p block); on a block larger than the cap, the Adam steps (and, past
# _ALS_ENTRIES, the ALS sweeps) shrink in proportion to its size (at least 5 and 4). See _GradientFractions._cdvft.
CDVFT_FIT_ENTRIES = 128 * 128
# ... except the m = 2 fit (ALS: cheap per sweep), which runs on a sub-block of up to this many entries; and a
# single block larger than _MAX_BLOCK_ENTRIES (p > 1024) is not fitted at all (CDVFT's share is C3A's there).
_ALS_ENTRIES = 512 * 512
_MAX_BLOCK_ENTRIES = 1024 * 1024
# uniform_fraction for LoRA: Gaussian samples larger than this many entries are replaced by a proportional proxy.
_PROXY_ENTRIES = 256 * 256
# ... and small shapes average several samples, so that the estimate does not depend on one draw.
_MIN_SAMPLE_ENTRIES = 1 << 14


def _name(candidate: Candidate) -> str:
    """The candidate's set, for messages (its label needs a backend, which a set does not have)."""
    return candidate.spec.label(candidate.block_size, candidate.factors)


def _expresses(candidate: Candidate) -> str:
    """The set of updates the candidate's method makes (the registry's ``expresses``): each has its rule here."""
    spec = find_method(candidate.method)
    if spec is None:
        raise ValueError(f"no capacity rule for method {candidate.method!r}; known: {', '.join(method_names())}")
    return spec.expresses


def _factors(candidate: Candidate) -> int:
    spec, f = candidate.spec, candidate.factors
    if not isinstance(f, int) or f < spec.min_factors:
        raise ValueError(f"{_name(candidate)}: {spec.title} needs {spec.factors} >= {spec.min_factors} in factors, "
                         f"got {f!r}")
    return f


def _check_block(d_out: int, d_in: int, p: int | None, what: str) -> int:
    if not isinstance(p, int) or p < 1 or d_out % p or d_in % p:
        raise ValueError(f"{what}: block size {p!r} does not divide the layer's shape (d_out={d_out}, d_in={d_in})")
    return p


class _GradientFractions:
    """The captured fractions of one gradient, with what several candidates share computed once: ‖G‖², the
    singular values (every LoRA rank), the projection energy per p, and the CDVFT fits per (p, m), each m started
    from m − 1."""

    def __init__(self, grad: torch.Tensor):
        if grad.dim() != 2:
            raise ValueError(f"a layer gradient must be a [d_out, d_in] matrix, got shape {tuple(grad.shape)}")
        g = grad.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(g).all():
            raise ValueError("the layer gradient has non-finite values (NaN or inf); capacity needs a finite one")
        self.g = g
        self.total = float(g.square().sum())
        self._subs: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}
        self._energy: dict[tuple, float] = {}
        self._fits: dict[tuple[int, int, int], tuple[list[torch.Tensor], float]] = {}
        self._cum: torch.Tensor | None = None

    def fraction(self, candidate: Candidate) -> float:
        expresses = _expresses(candidate)
        if expresses == "nothing" or self.total == 0.0:
            return 0.0
        d_out, d_in = self.g.shape
        if expresses == "low-rank":
            energy = self._rank_energy(_factors(candidate))
        else:
            p = _check_block(d_out, d_in, candidate.block_size, _name(candidate))
            if expresses == "block-circulant":
                energy = self._projection_energy(p)
            else:  # circulant-diagonal
                energy = self._cdvft(p, _factors(candidate)) * self.total
        return min(1.0, max(0.0, energy / self.total))

    def _projection_energy(self, p: int) -> float:
        key = ("block-circulant", p)
        if key not in self._energy:
            self._energy[key] = float(diagonal_sums(self.g, p).square().sum()) / p
        return self._energy[key]

    def _rank_energy(self, r: int) -> float:
        if self._cum is None:
            self._cum = torch.linalg.svdvals(self.g).square().cumsum(0)
        return float(self._cum[min(r, self._cum.numel()) - 1])

    def _sub_block(self, p: int, k: int) -> tuple[torch.Tensor, float]:
        """(the sub-block of every k-th block row and column of G, scaled to unit RMS in float32; its squared
        norm). The fraction is scale-free; float32 halves the memory traffic of the fits, which are O(N) per step."""
        key = (p, k)
        if key not in self._subs:
            d_out, d_in = self.g.shape
            sub = self.g.reshape(d_out // p, p, d_in // p, p)[::k, :, ::k, :]
            sub = sub.reshape(sub.shape[0] * p, sub.shape[2] * p)
            norm = float(sub.square().sum())
            sub = (sub * math.sqrt(sub.numel() / norm)).float() if norm > 0 else sub.float()
            self._subs[key] = sub, float(sub.double().square().sum())
        return self._subs[key]

    def _chain(self, p: int, m: int, k: int) -> float:
        """Captured fraction of the CDVFT fit with m factors on the sub-block of stride k; m = 2 by ALS, each
        further m refined from m − 1."""
        key = (p, m, k)
        if key not in self._fits:
            sub, total = self._sub_block(p, k)
            if total == 0.0:
                factors, captured = [], 0.0
            elif m == 2:
                sweeps = max(4, min(_ALS_SWEEPS, _ALS_SWEEPS * _ALS_ENTRIES // sub.numel()))
                factors, captured = als_cdvft2(sub, p, sweeps)
            else:
                self._chain(p, m - 1, k)
                start, fraction = self._fits[(p, m - 1, k)]
                steps = max(5, min(CDVFT_STEPS, CDVFT_STEPS * CDVFT_FIT_ENTRIES // sub.numel()))
                factors, captured = refine_cdvft(sub, p, start, fraction * total, steps)
            self._fits[key] = factors, (captured / total if total else 0.0)
        return self._fits[key][1]

    def _cdvft(self, p: int, m: int) -> float:
        """The CDVFT fraction (see the module docstring): C3A's exact share, plus the m = 2 fit's gain over C3A's
        projection on a sub-block of up to _ALS_ENTRIES, plus the m-factor fit's gain over the 2-factor one on a
        sub-block of up to CDVFT_FIT_ENTRIES; clamped to [C3A's share, 1]. Where a sub-block is the whole of G, its
        term is the fit itself."""
        exact = self._projection_energy(p) / self.total
        if p * p > _MAX_BLOCK_ENTRIES:
            return exact
        q_out, q_in = self.g.shape[0] // p, self.g.shape[1] // p
        k2 = _stride(q_out, q_in, p, _ALS_ENTRIES)
        sub, total = self._sub_block(p, k2)
        if total == 0.0:
            return exact
        gain = self._chain(p, 2, k2) - float(diagonal_sums(sub.double(), p).square().sum()) / p / total
        if m > 2:
            k = _stride(q_out, q_in, p, CDVFT_FIT_ENTRIES)
            gain += self._chain(p, m, k) - self._chain(p, 2, k)
        return min(1.0, max(exact, exact + gain))


def _stride(q_out: int, q_in: int, p: int, limit: int) -> int:
    """The smallest k whose strided sub-block (every k-th block row and column) has at most ``limit`` entries
    (1 when the whole matrix fits; at most one block, whatever the limit)."""
    k = 1
    while k < max(q_out, q_in) and math.ceil(q_out / k) * math.ceil(q_in / k) * p * p > limit:
        k += 1
    return k


def captured_fraction(grad: torch.Tensor, candidate: Candidate) -> float:
    """Share of ``‖G‖²`` (``grad``: the ``[d_out, d_in]`` full-weight gradient) that ``candidate``'s set of updates
    can express, in [0, 1]; 0 for a zero gradient. See the module docstring for each method's rule."""
    return _GradientFractions(grad).fraction(candidate)


# ---------------------------------------------------------------------------------------------------------------
# Without data: an isotropic Gaussian gradient


@functools.lru_cache(maxsize=256)
def _gaussian_samples(d_out: int, d_in: int) -> tuple[_GradientFractions, ...]:
    count = max(1, min(8, math.ceil(_MIN_SAMPLE_ENTRIES / (d_out * d_in))))
    gen = torch.Generator().manual_seed(FIT_SEED + 1000 * d_out + d_in)
    return tuple(_GradientFractions(torch.randn(d_out, d_in, generator=gen, dtype=torch.float64))
                 for _ in range(count))


def _proxy_shape(d_out: int, d_in: int, unit: int) -> tuple[int, int, float]:
    """The largest shrink ``k`` (dims divided by k, keeping them multiples of ``unit``) that brings ``d_out·d_in``
    to at most _PROXY_ENTRIES: (proxy d_out, proxy d_in, k). k = 1 when the shape is small or cannot shrink."""
    q_out, q_in = d_out // unit, d_in // unit
    g = math.gcd(q_out, q_in)
    for k in sorted(k for k in range(1, g + 1) if g % k == 0):
        if d_out * d_in / (k * k) <= _PROXY_ENTRIES:
            return d_out // k, d_in // k, float(k)
    return d_out // g, d_in // g, float(g)


@functools.lru_cache(maxsize=4096)
def uniform_fraction(d_in: int, d_out: int, candidate: Candidate) -> float:
    """Expected share of an isotropic Gaussian ``G`` (``[d_out, d_in]``) that ``candidate`` can express: the share
    to expect when nothing is known about the layer's gradient.

    Linear sets are exact: ``dim/N`` (C3A and PEFT's C3A at block p: ``1/p``). LoRA and CDVFT are estimated on a
    seeded Gaussian sample (the mean of several for small shapes), cached per shape. LoRA on shapes above
    256 × 256 entries uses a proxy with both dimensions divided by the same k: the top-r share of a Gaussian
    matrix depends, up to O(d^-2/3) edge effects, only on r / min(d) and the aspect ratio (Marchenko–Pastur), so
    the proxy is read at rank r/k (interpolated). CDVFT follows the same rule as with data (C3A's share plus the
    fit's gain on the strided sub-block, whose entries a Gaussian G leaves Gaussian), so it is the fit on a
    Gaussian of the sub-block's shape.
    """
    expresses = _expresses(candidate)
    if expresses == "nothing":
        return 0.0
    if expresses == "block-circulant":
        p = _check_block(d_out, d_in, candidate.block_size, _name(candidate))
        return 1.0 / p
    if expresses == "low-rank":
        r = _factors(candidate)
        if r >= min(d_in, d_out):
            return 1.0
        po, pi, k = _proxy_shape(d_out, d_in, 1)
        rank = r / k  # an integer when k == 1: exact on the sample
        lo, t = math.floor(rank), rank - math.floor(rank)
        values = []
        for sample in _gaussian_samples(po, pi):
            # linear in the rank between the integer ranks around it (rank 0 captures nothing)
            below = sample._rank_energy(lo) if lo >= 1 else 0.0
            above = sample._rank_energy(lo + 1) if t > 0 else below
            values.append(((1 - t) * below + t * above) / sample.total)
        return min(1.0, sum(values) / len(values))
    # circulant-diagonal
    p = _check_block(d_out, d_in, candidate.block_size, _name(candidate))
    # As for data: C3A's share (1/p at any shape) plus the gains measured on sub-blocks; a strided sub-block of
    # a Gaussian is Gaussian, so the fraction at the larger sub-block's shape is the same estimate.
    if p * p > _MAX_BLOCK_ENTRIES:
        return 1.0 / p
    k = _stride(d_out // p, d_in // p, p, _ALS_ENTRIES)
    po, pi = math.ceil(d_out // p / k) * p, math.ceil(d_in // p / k) * p
    if (po, pi) != (d_out, d_in):
        return uniform_fraction(pi, po, candidate)
    proxy = Candidate(candidate.method, p, candidate.factors)
    samples = _gaussian_samples(po, pi)
    return sum(s.fraction(proxy) for s in samples) / len(samples)


# ---------------------------------------------------------------------------------------------------------------
# Per layer: energy × fraction


def _key(candidate: Candidate) -> tuple:
    # Transform and backend compute the same ΔW: the fraction depends on the set only.
    return (candidate.method, candidate.block_size, candidate.factors)


@dataclass(frozen=True)
class Capacity:
    """Capacity scores for a model's target layers.

    ``source``: ``"calibration"`` (gradients measured on calibration texts) or ``"uniform"`` (none: every layer
    weighs the same and fractions are the Gaussian expectations of :func:`uniform_fraction`). ``energy``: per
    target-layer name, ``‖G_l‖² / Σ_l ‖G_l‖²`` (uniform: ``1/L``); sums to 1. ``score(layer, candidate) =
    energy[layer] · fraction(layer, candidate)`` adds up over layers to the share of the model's total gradient
    energy that an assignment can express.
    """

    source: str
    energy: Mapping[str, float]
    _gradients: Mapping[str, _GradientFractions] = field(default_factory=dict, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def fraction(self, layer: TargetLayer, candidate: Candidate) -> float:
        key = (layer.name, layer.d_in, layer.d_out, _key(candidate))
        if key not in self._cache:
            stats = self._gradients.get(layer.name)
            if stats is None:
                value = uniform_fraction(layer.d_in, layer.d_out, Candidate(*_key(candidate)))
            else:
                value = stats.fraction(candidate)
            self._cache[key] = value
        return self._cache[key]

    def score(self, layer: TargetLayer, candidate: Candidate) -> float:
        return self.energy.get(layer.name, 0.0) * self.fraction(layer, candidate)

    def precompute(self, layers: Sequence[TargetLayer], candidates: Sequence[Candidate], *,
                   progress: bool = False) -> None:
        """Compute every (layer, candidate) fraction now, with a progress bar: CDVFT fits on calibration gradients
        take seconds per layer (see the module docstring), which a caller may want to show."""
        from tqdm.auto import tqdm

        sets = sorted({_key(c) for c in candidates}, key=lambda k: (k[0], k[1] or 0, k[2] or 0))
        for layer in tqdm(layers, desc="capacity", unit="layer", disable=not progress):
            for key in sets:
                divides = key[1] is None or not (layer.d_in % key[1] or layer.d_out % key[1])
                if get_method(key[0]).expresses == "nothing" or not divides:
                    continue
                self.fraction(layer, Candidate(*key))


def capacity_from_gradients(layers: Sequence[TargetLayer], gradients: Mapping[str, torch.Tensor] | None
                            ) -> Capacity:
    """Capacity for ``layers`` from their full-weight gradients (name -> ``[d_out, d_in]``), or uniform when
    ``gradients`` is None. Every layer needs a gradient of its shape; if all of them are zero the energies fall
    back to uniform (there is nothing to weigh them by) while the source stays ``"calibration"``."""
    layers = list(layers)
    if not layers:
        raise ValueError("capacity needs at least one target layer")
    if gradients is None:
        return Capacity("uniform", {t.name: 1.0 / len(layers) for t in layers})
    missing = [t.name for t in layers if t.name not in gradients]
    if missing:
        raise ValueError(f"no calibration gradient for {len(missing)} target layer(s), e.g. {missing[0]!r}")
    stats: dict[str, _GradientFractions] = {}
    for t in layers:
        grad = gradients[t.name]
        if tuple(grad.shape) != (t.d_out, t.d_in):
            raise ValueError(f"the gradient of {t.name!r} has shape {tuple(grad.shape)}; the layer needs "
                             f"[d_out, d_in] = [{t.d_out}, {t.d_in}]")
        stats[t.name] = _GradientFractions(grad)
    total = sum(s.total for s in stats.values())
    if total > 0:
        energy = {name: s.total / total for name, s in stats.items()}
    else:
        energy = {t.name: 1.0 / len(layers) for t in layers}
    return Capacity("calibration", energy, stats)
