"""Colorization's colour maths (Zhang, Isola & Efros 2016) as pure functions: the in-gamut ab bins, soft
encoding, the smoothed prior and its class-rebalancing weights, the rebalanced soft cross-entropy, the L2
regression loss (Larsson et al.'s variant) and the annealed mean that turns a predicted distribution
into a colour.

The bins are computed, not downloaded. Rule: the centres of the 10 x 10 ab cells (centres on multiples of
10, a cell is every ab that rounds to its centre) hit by the sRGB cube through Kornia's `rgb_to_lab`,
sampled as a 65-level grid of the whole cube (every 4th 8-bit level) plus its six faces at 1,025 levels
per side (the faces carry the gamut's outline; denser sampling, or all 256^3 8-bit colours, hits no
other cell). That gives Q = 262 bins (`IN_GAMUT_BINS`), sorted by (a, b); the paper's released set has
313, from a convex hull of a gamut that is not exactly Kornia's sRGB.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

GRID = 10.0  # ab units between bin centres
IN_GAMUT_BINS = 262  # Q of the rule above (tests/test_colorization.py checks it)
CUBE_LEVELS, FACE_LEVELS = 65, 1025


def _hit_cells(rgb: Tensor) -> Tensor:
    """The (a, b) cell indices (centre / GRID) hit by (N, 3) sRGB colours in [0, 1], (cells, 2), sorted by
    (a, b): an occupancy count over a 64 x 64 index grid (sRGB's ab stay within +-13 cells)."""
    import kornia

    lab = kornia.color.rgb_to_lab(rgb.t().reshape(1, 3, -1, 1))[0, 1:, :, 0]
    cells = torch.round(lab / GRID).long() + 32
    occupied = torch.bincount(cells[0] * 64 + cells[1], minlength=64 * 64).nonzero()[:, 0]
    return torch.stack([occupied // 64, occupied % 64], dim=1) - 32


@functools.lru_cache(maxsize=1)
def ab_bins() -> Tensor:
    """The in-gamut bin centres (Q, 2) as (a, b) in Lab units, float32 on the CPU; deterministic (the module
    docstring's rule), about a second on one CPU core, made once per process."""
    with torch.no_grad():
        levels = torch.linspace(0.0, 1.0, CUBE_LEVELS)
        cube = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij"), dim=-1).reshape(-1, 3)
        found = [_hit_cells(cube)]
        levels = torch.linspace(0.0, 1.0, FACE_LEVELS)
        u, v = (t.reshape(-1) for t in torch.meshgrid(levels, levels, indexing="ij"))
        for axis in range(3):
            for value in (0.0, 1.0):
                columns = [u, v]
                columns.insert(axis, torch.full_like(u, value))
                found.append(_hit_cells(torch.stack(columns, dim=-1)))
        cells = torch.unique(torch.cat(found), dim=0)  # sorted by (a, b)
    return cells.float() * GRID


def nearest_bins(ab: Tensor, bins: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The `k` nearest bins of each ab value: (squared distances, indices), both (N, k), nearest first.
    `ab` is (N, 2)."""
    distances = torch.cdist(ab.float(), bins.float()).square()
    found = distances.topk(k, dim=1, largest=False)
    return found.values, found.indices


def soft_encode(ab: Tensor, bins: Tensor, k: int = 5, sigma: float = 5.0) -> tuple[Tensor, Tensor]:
    """Zhang et al.'s soft targets: each (N, 2) ab value spread over its `k` nearest bins with Gaussian
    weights exp(-d^2 / (2 sigma^2)), normalised to sum 1. Returns (targets (N, Q), the nearest bin (N,))."""
    distances, indices = nearest_bins(ab, bins, k)
    weights = torch.softmax(-distances / (2 * sigma ** 2), dim=1)
    targets = torch.zeros(ab.shape[0], bins.shape[0], device=ab.device, dtype=weights.dtype)
    return targets.scatter_(1, indices, weights), indices[:, 0]


def bin_counts(ab: Tensor, bins: Tensor) -> Tensor:
    """How many of the (N, 2) ab values have each bin as their nearest: (Q,) float64."""
    _, nearest = nearest_bins(ab, bins, 1)
    return torch.bincount(nearest[:, 0], minlength=bins.shape[0]).double()


def smoothed_prior(counts: Tensor, bins: Tensor, sigma: float = 5.0) -> Tensor:
    """The empirical colour distribution p (Q,) from nearest-bin `counts`, smoothed with a Gaussian of
    `sigma` ab units over the bins (as the paper smooths ImageNet's) and normalised to sum 1; uniform
    when nothing was counted."""
    counts = counts.double()
    if counts.sum() <= 0:
        return torch.full_like(counts, 1.0 / counts.numel())
    kernel = torch.exp(-torch.cdist(bins.double(), bins.double()).square() / (2 * sigma ** 2))
    smoothed = kernel @ (counts / counts.sum())
    return smoothed / smoothed.sum()


def rebalancing_weights(prior: Tensor, mix: float = 0.5) -> Tensor:
    """Class-rebalancing weights w proportional to ((1 - mix) p + mix / Q)^-1, scaled so that the expected
    weight under the prior is 1: sum_q p_q w_q = 1."""
    prior = prior.double()
    weights = 1.0 / ((1 - mix) * prior + mix / prior.numel())
    return weights / (prior * weights).sum()


def rebalanced_cross_entropy(logits: Tensor, targets: Tensor, nearest: Tensor, weights: Tensor,
                             keep: Tensor) -> Tensor:
    """Zhang et al.'s loss: per position, w[nearest bin] x the cross-entropy of the soft `targets` (N, Q)
    against softmax(`logits`) (N, Q), averaged over the positions `keep` (N,) marks (zero if none)."""
    per_position = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1) * weights.float()[nearest]
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


def ab_regression_loss(predicted: Tensor, ab: Tensor, keep: Tensor, scale: float = 100.0) -> Tensor:
    """The plain L2 on ab: the squared error summed over a and b, in units of `scale` ab (predictions
    and targets divided by it), averaged over the positions `keep` (N,) marks. `predicted` and `ab` are
    (N, 2), `predicted` already in those units."""
    per_position = (predicted.float() - ab.float() / scale).square().sum(dim=1)
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


def annealed_mean(logits: Tensor, bins: Tensor, temperature: float = 0.38) -> Tensor:
    """The paper's point estimate of a predicted distribution: the mean of the bins under the
    distribution re-normalised at `temperature` (softmax(logits / T)); `logits` (..., Q), result (..., 2)."""
    return torch.softmax(logits.float() / temperature, dim=-1) @ bins.float()
